"""LM head + cross-entropy.

Shape legend: N scored positions (B*T flattened), d width, V (padded) vocabulary.

    loss = mean over rows i with t_i != ignore_index of  logsumexp(h_i W^T) - (h_i W^T)[t_i]

``plain`` materialises the (N, V) logits (and an fp32 copy, and the fp32 softmax for the
backward): at N = 16384, V = 50304 that is several GiB. ``chunked`` (the training default)
never holds more than one chunk of logits: for each chunk of rows it computes the logits,
the loss contribution and, already in the forward pass, the gradient wrt the logits,

    G = softmax(logits) - onehot(t)              (zero on ignored rows; |G| <= 1)

turned at once into dL/dh = G W / n_valid for that chunk and accumulated into
dL/dW += G^T h / n_valid. The backward only scales the stored gradients by grad_output
(the "fused linear cross-entropy" trick of Liger-Kernel).

Precision (fp16/bf16 inputs): G is cast to the input dtype UNSCALED, where it lies in
[-1, 1] (G / n_valid is subnormal or zero in fp16 at realistic N, V); both products
accumulate in fp32 inside the matmul (``out_dtype=float32`` on CUDA: dW goes straight into
its fp32 buffer), the 1/n_valid and grad_output scales are applied in fp32, and only the
final gradients are cast back. A loss scale of 65536 (DeepSpeed's initial fp16 scale) is
therefore as safe as in ``plain``.

Memory traffic: one chunk's elementwise part (logsumexp, target logit, softmax - onehot,
the cast) is ONE fused pass (a Triton kernel on CUDA; the same math in torch elsewhere),
and the chunk height comes from a memory budget (``default_chunk_rows``), so the fp32 dW
buffer is read and written once per chunk, a few times per step rather than 32.
``liger`` calls Liger-Kernel's Triton implementation when it is installed (CUDA only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cratelm.kernels import outside_autocast
from cratelm.kernels.registry import LOSS_IMPLS

CHUNK_BYTES = 256 << 20  # logits of one chunk (in the input dtype), rows = a power of two
_HALF = (torch.float16, torch.bfloat16)


def default_chunk_rows(n_rows: int, vocab: int, itemsize: int = 2, budget: int = CHUNK_BYTES) -> int:
    """Rows per chunk: the largest power of two with rows * vocab * itemsize <= budget
    (at least 1, at most n_rows). 256 MiB of bf16 logits at V = 50304: 2048 rows."""
    rows = 1
    while rows * 2 * vocab * itemsize <= budget:
        rows *= 2
    return max(1, min(rows, n_rows))


def _fp32_matmul(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b (+ acc, in place) with fp32 accumulation and an fp32 result for half inputs.
    CUDA (and meta, for counting) do it inside one GEMM; elsewhere the inputs are upcast,
    which gives the same fp32 sums."""
    if a.dtype not in _HALF:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if a.device.type in ("cuda", "meta"):
        try:
            if acc is None:
                return torch.mm(a, b, out_dtype=torch.float32)
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype: upcast
            pass
    return torch.mm(a.float(), b.float()) if acc is None else acc.addmm_(a.float(), b.float())


@torch.library.custom_op("cratelm::xent_grad_", mutates_args=("logits",))
def xent_grad_(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One fused pass over a chunk of logits (n, V): returns the per-row loss (fp32, 0 on
    ignored rows) and overwrites ``logits`` with softmax(logits) - onehot(targets) (0 on
    ignored rows), in the logits' dtype. ``targets`` must be in range on every row."""
    if logits.is_cuda and logits.dtype != torch.float64:
        from cratelm.kernels import loss_triton
        return loss_triton.xent_grad_(logits, targets, valid)
    return _xent_grad_torch(logits, targets, valid)


@xent_grad_.register_fake
def _(logits, targets, valid):
    return logits.new_empty(logits.shape[0], dtype=torch.float32 if logits.dtype != torch.float64 else logits.dtype)


def _xent_grad_torch(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)                                              # a copy for half types
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0)
    g = x.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, targets[:, None], torch.full_like(target_logit[:, None], -1.0))
    g.mul_(valid.to(acc)[:, None])
    if g is not logits:
        logits.copy_(g)
    return loss


def chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int, chunk_rows: int, need_h: bool = True, need_w: bool = True,
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and its gradients wrt hidden (N, d) and weight (V, d) (fp32 for half types),
    one chunk of ``chunk_rows`` rows of logits at a time. No autograd."""
    N = hidden.shape[0]
    valid = targets != ignore_index
    n_valid = valid.sum()                                  # a tensor: no host sync on CUDA
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    safe_t = torch.where(valid, targets, 0)

    for start in range(0, N, chunk_rows):
        h = hidden[start:start + chunk_rows]                            # (n, d)
        logits = h @ weight.t()                                         # (n, V), fp32 accumulation
        loss_sum += xent_grad_(logits, safe_t[start:start + chunk_rows], valid[start:start + chunk_rows]).sum()
        grad = logits                                                   # now G = softmax - onehot
        if need_h:
            grad_h[start:start + chunk_rows] = _fp32_matmul(grad, weight)           # (n, d)
        if need_w:
            _fp32_matmul(grad.t(), h, acc=grad_w)                                   # (V, d) += G^T h
    inv_n = 1.0 / n_valid.clamp(min=1).to(acc)             # all rows ignored: zero gradients
    if need_h:
        grad_h.mul_(inv_n)
    if need_w:
        grad_w.mul_(inv_n)
    return loss_sum / n_valid.to(acc), grad_h, grad_w                 # nan when all are ignored, as plain


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden (N, d) @ weight (V, d)^T against targets (N,); the
    gradients are computed in the forward pass (in fp32) and only scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int) -> torch.Tensor:
        loss, grad_h, grad_w = chunked_loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows,
                                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.to(grad_h.dtype if grad_h is not None else grad_w.dtype)  # fp32 (or fp64)
        dh = None if grad_h is None else (grad_h * scale).to(ctx.dtypes[0])
        dw = None if grad_w is None else (grad_w * scale).to(ctx.dtypes[1])
        return dh, dw, None, None, None


def _liger_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if not h.is_cuda:
        raise RuntimeError(f"impl='liger' needs CUDA tensors, got {h.device}; use impl='chunked'")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise RuntimeError("impl='liger' needs liger-kernel (pip install liger-kernel); "
                           "impl='chunked' needs nothing") from e
    try:
        return liger_fused_linear_cross_entropy(h, weight, t, ignore_index=ignore_index,
                                                accum_dtype=torch.float32)
    except TypeError:  # releases before accum_dtype
        return liger_fused_linear_cross_entropy(h, weight, t, ignore_index=ignore_index)


def lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 impl: str = "plain", ignore_index: int = -1, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight^T`` against ``targets``.

    hidden (..., d), weight (V, d), targets (...) int64; targets equal to ``ignore_index``
    are not scored. ``impl="chunked"`` (the training default) holds one chunk of
    ``chunk_rows`` rows of logits at a time (default: ``default_chunk_rows``).
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss implementation {impl!r}; choose one of {LOSS_IMPLS}")
    if hidden.shape[-1] != weight.shape[-1] or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"lm_head_loss: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} "
                         f"and targets {tuple(targets.shape)} do not fit (want (..., d), (V, d), (...))")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if impl == "plain":
        logits = h @ weight.t()
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits, t, ignore_index=ignore_index)
    if impl == "liger":
        return _liger_loss(h, weight, t, ignore_index)
    rows = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0], weight.element_size())
    if rows < 1:
        raise ValueError(f"lm_head_loss: chunk_rows={chunk_rows} must be >= 1")
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return outside_autocast(chunked_loss_and_grads, h, weight, t, ignore_index, rows, False, False)[0]
    return outside_autocast(ChunkedLinearCrossEntropy.apply, h, weight, t, ignore_index, rows)

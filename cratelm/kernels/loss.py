"""LM head + cross-entropy.

Shape legend: N scored positions (B*T flattened), d width, V (padded) vocabulary.

    loss = mean over rows i with t_i != ignore_index of  logsumexp(h_i W^T) - (h_i W^T)[t_i]

``plain`` materialises the (N, V) logits (and an fp32 copy, and the fp32 softmax for the
backward): at N = 16384, V = 50304 that is several GiB. ``chunked`` (the recommended
training default) never holds more than one chunk of logits: for each chunk of rows it
computes the logits, the loss contribution and, already in the forward pass, the
gradient of the loss wrt the logits,

    dL/dlogits = (softmax(logits) - onehot(t)) / n_valid     (zero on ignored rows)

turned at once into dL/dh = dL/dlogits W for that chunk and accumulated into
dL/dW += dL/dlogits^T h (fp32). The backward only scales the stored gradients by
grad_output (the "fused linear cross-entropy" trick of Liger-Kernel). ``liger`` calls
Liger-Kernel's Triton implementation when it is installed (CUDA only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cratelm.kernels import outside_autocast

LOSS_IMPLS = ("plain", "chunked", "liger")
RECOMMENDED_LOSS_IMPL = "chunked"  # for training; "plain" stays the function default
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (32M: 128 MiB in fp32); rows = a power of two


def default_chunk_rows(n_rows: int, vocab: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: the largest power of two with rows * vocab <= budget (at least 1)."""
    rows = 1
    while rows * 2 * vocab <= budget:
        rows *= 2
    return max(1, min(rows, n_rows))


def chunked_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           ignore_index: int, chunk_rows: int, need_h: bool = True, need_w: bool = True,
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean loss and its gradients wrt hidden (N, d) and weight (V, d) (fp32 for half types),
    one chunk of ``chunk_rows`` rows of logits at a time. No autograd."""
    N = hidden.shape[0]
    valid = targets != ignore_index
    n_valid = valid.sum()                                  # a tensor: no host sync on CUDA
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    inv_n = 1.0 / n_valid.clamp(min=1).to(acc)            # all rows ignored: zero gradients
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None

    for start in range(0, N, chunk_rows):
        h = hidden[start:start + chunk_rows]                            # (n, d)
        t = targets[start:start + chunk_rows]
        ok = valid[start:start + chunk_rows]
        logits = (h @ weight.t()).to(acc)                              # (n, V) fp32, like plain
        lse = torch.logsumexp(logits, dim=-1)                           # (n,)
        safe_t = torch.where(ok, t, 0)
        target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
        loss_sum += torch.where(ok, lse - target_logit, 0.0).sum()
        if not (need_h or need_w):
            continue
        # softmax - onehot, scaled by 1/n_valid, zero on ignored rows: reuse the logits buffer
        grad = logits.sub_(lse[:, None]).exp_()
        grad.scatter_add_(1, safe_t[:, None], torch.full_like(target_logit[:, None], -1.0))
        grad.mul_((ok.to(acc) * inv_n)[:, None])
        grad = grad.to(hidden.dtype)
        if need_h:
            torch.mm(grad, weight, out=grad_h[start:start + chunk_rows])  # (n, d)
        if need_w and grad_w.dtype == h.dtype:
            grad_w.addmm_(grad.t(), h)                                  # (V, d)
        elif need_w:
            grad_w.add_(torch.mm(grad.t(), h))                          # bf16/fp16 product, fp32 sum
    return loss_sum / n_valid.to(acc), grad_h, grad_w                 # nan when all are ignored, as plain


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of hidden (N, d) @ weight (V, d)^T against targets (N,); the
    gradients are computed in the forward pass and only scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int) -> torch.Tensor:
        loss, grad_h, grad_w = chunked_loss_and_grads(hidden, weight, targets, ignore_index, chunk_rows,
                                                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype)
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
    are not scored. ``impl="chunked"`` (recommended for training) holds one chunk of
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
    rows = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0])
    if rows < 1:
        raise ValueError(f"lm_head_loss: chunk_rows={chunk_rows} must be >= 1")
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return outside_autocast(chunked_loss_and_grads, h, weight, t, ignore_index, rows, False, False)[0]
    return outside_autocast(ChunkedLinearCrossEntropy.apply, h, weight, t, ignore_index, rows)

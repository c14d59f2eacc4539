"""One fused pass of the chunked loss's elementwise part, in Triton (CUDA, or the interpreter).

For a chunk of logits X (n, V) and targets t (n,), per row i (fp32 inside)::

    lse_i  = logsumexp_j X_ij                  pass 1: online max and sum over V
    loss_i = lse_i - X_i,t_i                   (0 on ignored rows)
    X_ij  <- exp(X_ij - lse_i) - [j == t_i]    pass 2: written back in X's dtype (0 on ignored rows)

Two reads and one write of the logits, where eager torch makes about eight passes
(the fp32 copy, logsumexp, subtract, exp, scatter, scale, the cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cratelm.kernels.triton_mssa import INTERPRET

BLOCK_V = 1024 if INTERPRET else 4096


@triton.jit
def _xent_grad_kernel(X, T, OK, LOSS, V, stride_x, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride_x
    t = tl.load(T + row)
    ok = tl.load(OK + row)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -1e30, tl.float32)     # finite: masked lanes add exp(-inf) = 0
    s = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_all = tl.max(m, 0)
    lse = m_all + tl.log(tl.sum(s * tl.exp(m - m_all), 0))
    x_t = tl.load(base + t).to(tl.float32)
    tl.store(LOSS + row, tl.where(ok != 0, lse - x_t, 0.0))
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
        g = tl.where(ok != 0, g, 0.0)
        tl.store(base + cols, g.to(X.dtype.element_ty), mask=cols < V)


def xent_grad_(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """See ``cratelm.kernels.loss.xent_grad_``: per-row loss (fp32); logits become softmax - onehot."""
    if logits.dtype == torch.float64 or logits.stride(1) != 1:
        raise ValueError(f"xent_grad_: logits of fp16/bf16/fp32 with unit column stride, got {logits.dtype} "
                         f"with strides {logits.stride()}")
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _xent_grad_kernel[(n,)](logits, targets, valid.to(torch.int8), loss, V, logits.stride(0),
                                BLOCK_V=BLOCK_V, num_warps=8)
    return loss

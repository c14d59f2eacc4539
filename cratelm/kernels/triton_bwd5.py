"""A 5-product backward for the tied-QKV Triton attention (selectable; not the default).

Legend as in triton_mssa: W (B, H, T, p) is query, key and value; P = softmax(S),
S = W W^T / sqrt(p); delta_i = sum_c dO_ic O_ic; dS = P * (dP - delta) / sqrt(p).

The default backward (triton_mssa._bwd_kernel) does 7 tile products and 2 exponentials per
score: each row block computes its key/value part AND its query part in registers. This
one does FlashAttention-2's 5: one program per key block j loops over the query blocks m,

    S^T = W_j W_m^T,  dP^T = W_j dO_m^T                       (2 products, 1 exponential)
    acc_j += P^T dO_m + dS^T W_m                              (key and value part, registers)
    dW_m  += dS W_j      -> atomically into an fp32 buffer    (query part)

then adds acc_j to its own rows of the buffer (atomically: other programs add query parts
there) and the buffer is cast to W's dtype. Atomics make it non-deterministic in the last
bits. Call ``cratelm.kernels.triton_bwd5.attention(w, causal)`` (the same forward); the default stays
until a GPU measures both (make gpu-check: bench-kernels row ``triton-bwd5``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cratelm.kernels.triton_mssa import INTERPRET, LOG2E, TiedFlashAttention, _load_rows, _p_pad, _precision

if INTERPRET:
    CONFIGS = [triton.Config({"BLOCK": 32, "BLOCK_IN": 16}, num_warps=4, num_stages=1)]
else:
    CONFIGS = [triton.Config({"BLOCK": b, "BLOCK_IN": bi}, num_warps=w, num_stages=s)
                for b, bi, w, s in [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)]]


@triton.autotune(configs=CONFIGS, key=["T", "P_PAD", "CAUSAL"], reset_to_zero=["DW32"])
@triton.jit
def _bwd5_kernel(W, DO, DW32, LSE, DELTA, stride_wb, stride_wh, stride_wt, stride_db, stride_dh, stride_dt,
                 H, T, qk_scale, sm_scale, P: tl.constexpr, P_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                 PREC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_IN: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    w_base = W + b * stride_wb + h * stride_wh
    do_base = DO + b * stride_db + h * stride_dh
    g_base = DW32 + bh.to(tl.int64) * T * P          # (B*H, T, p) fp32, contiguous
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T
    start = tl.program_id(0) * BLOCK
    offs_r = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, P_PAD)
    kv = _load_rows(w_base, offs_r, offs_d, stride_wt, T, P, P_PAD, True)
    acc = tl.zeros([BLOCK, P_PAD], tl.float32)
    lo = start if CAUSAL else 0
    for start_m in range(lo, T, BLOCK_IN):
        offs_m = start_m + tl.arange(0, BLOCK_IN)
        q = _load_rows(w_base, offs_m, offs_d, stride_wt, T, P, P_PAD, True)
        do = _load_rows(do_base, offs_m, offs_d, stride_dt, T, P, P_PAD, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        p_t = tl.math.exp2(tl.dot(kv, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
        keep = (offs_m[None, :] < T) & (offs_r[:, None] < T)
        if CAUSAL:
            keep = keep & (offs_m[None, :] >= offs_r[:, None])
        p_t = tl.where(keep, p_t, 0.0)
        dp_t = tl.dot(kv, tl.trans(do), input_precision=PREC)
        ds_t = (p_t * (dp_t - delta[None, :]) * sm_scale).to(kv.dtype)
        acc = tl.dot(p_t.to(kv.dtype), do, acc, input_precision=PREC)          # dV
        acc = tl.dot(ds_t, q, acc, input_precision=PREC)                       # dK
        dq = tl.dot(tl.trans(ds_t), kv, input_precision=PREC)                  # dQ of block m
        tl.atomic_add(g_base + offs_m[:, None] * P + offs_d[None, :], dq,
                      mask=(offs_m[:, None] < T) & (offs_d[None, :] < P))
    tl.atomic_add(g_base + offs_r[:, None] * P + offs_d[None, :], acc,
                  mask=(offs_r[:, None] < T) & (offs_d[None, :] < P))


def bwd5_launch(w: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                causal: bool) -> tuple[tuple, dict, torch.Tensor]:
    """Launch arguments (args, constexpr kwargs, the zeroed fp32 dW buffer (B*H, T, p))."""
    B, H, T, p = w.shape
    dw32 = torch.zeros(B * H, T, p, dtype=torch.float32, device=w.device)
    args = (w, do, dw32, lse, delta, *w.stride()[:3], *do.stride()[:3], H, T,
            LOG2E / math.sqrt(p), 1.0 / math.sqrt(p))
    return args, dict(P=p, P_PAD=_p_pad(p), CAUSAL=causal, PREC=_precision(w.dtype)), dw32


def backward5(w: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
              causal: bool) -> torch.Tensor:
    """dW from the saved log-sum-exp and delta (see the module doc)."""
    B, H, T, p = w.shape
    args, kw, dw32 = bwd5_launch(w, do, lse, delta, causal)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK"]), B * H)  # noqa: E731
    _bwd5_kernel[grid](*args, **kw)
    return dw32.view(B, H, T, p).to(w.dtype)


def attention(w: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """triton_mssa.attention with this module's 5-product backward."""
    return TiedFlashAttention.apply(w, causal, backward5)

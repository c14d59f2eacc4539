"""Tied-QKV flash attention for CRATE's MSSA, written in Triton.

Shape legend: B batch, H heads, T tokens, p head width (any p <= 128; tested 32, 64, 80, 128),
padded inside the kernels to P_PAD = next power of two (>= 16). BLOCK_* are tile heights.

MSSA uses ONE tensor W (B, H, T, p) as query, key and value:

    S = W W^T / sqrt(p)   (masked above the diagonal when causal)
    P = softmax(S)        row-wise
    O = P W

Forward: one program per (query block, batch*head) streams ONE tile per key block (it is
the key and the value), keeps an online softmax in base 2 and saves the log-sum-exp
(log2 domain) per row, like FlashAttention-2.

Backward: with dO given and delta_i = sum_c dO_ic O_ic,

    dP = dO W^T,   dS = P * (dP - delta) / sqrt(p)
    dW = dQ + dK + dV = dS W  +  dS^T W  +  P^T dO

Because the query rows and the key rows are the same rows, row block j is both a query
block and a key block. One program per row block j therefore computes
  * its key/value part  sum_{m >= j} (dS[m, j]^T W[m] + P[m, j]^T dO[m]), looping over
    query blocks m, and
  * its query part      sum_{n <= j} dS[j, n] W[n], looping over key blocks n,
into ONE fp32 register accumulator and writes dW[j] once, in W's dtype. No dQ/dK/dV
tensors exist, no atomics are used (so it is deterministic and safe to autotune), and in
the causal case every program does the same work (T - j query blocks + j key blocks):
perfect load balance. P is recomputed from the saved log-sum-exp in both loops, as the
two-kernel FlashAttention-2 backward does. A small kernel computes delta first.

fp32 inputs use tf32 dots unless torch.get_float32_matmul_precision() is "highest".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton.jit at import, as here
DELTA_BLOCK = 32 if INTERPRET else 64
LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def patch_interpreter() -> None:
    """Make triton 3.6's interpreter work with numpy >= 2.4 (no-op off the interpreter): it
    turns a scalar tensor into an int with ``int(array_of_shape_1)``, which numpy 2.4 rejects,
    so any loop bound computed from ``tl.program_id`` fails under TRITON_INTERPRET=1. We
    re-patch that one conversion to take the single element."""
    if not INTERPRET:
        return
    from triton.runtime import interpreter as itp
    if getattr(itp, "_cratelm_index_patch", False):
        return
    original = itp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    itp._patch_lang_tensor = patched
    itp._cratelm_index_patch = True


patch_interpreter()

# Hopper-oriented autotuning sets. The kernels need BLOCK_M % BLOCK_N == 0 and BLOCK % BLOCK_IN == 0
# (tests check it); configs that overflow shared memory are skipped by the autotuner.
HOPPER_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                         (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 4), (64, 64, 4, 4)]
]
HOPPER_BWD_CONFIGS = [
    triton.Config({"BLOCK": b, "BLOCK_IN": bi}, num_warps=w, num_stages=s, maxnreg=r)
    for b, bi, w, s, r in [(128, 32, 8, 3, None), (128, 32, 4, 4, None), (128, 64, 8, 3, None), (64, 32, 4, 3, None),
                           (64, 64, 4, 3, None), (64, 32, 4, 4, None), (128, 16, 4, 4, None),
                           (128, 32, 8, 3, 128), (64, 32, 4, 3, 128)]   # maxnreg 128: 2 CTAs/SM, a few bytes spill
]
if INTERPRET:  # the numpy interpreter: one small config keeps the CPU tests fast
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    _BWD_CONFIGS = [triton.Config({"BLOCK": 32, "BLOCK_IN": 16}, num_warps=4, num_stages=1)]
else:  # CRATELM_AUTOTUNE_CONFIGS=N keeps the first N configs (a quick check, e.g. make gpu-check)
    _n = int(os.environ.get("CRATELM_AUTOTUNE_CONFIGS", "0")) or None
    _FWD_CONFIGS, _BWD_CONFIGS = HOPPER_FWD_CONFIGS[:_n], HOPPER_BWD_CONFIGS[:_n]


@triton.jit
def _load_rows(base, rows, offs_d, stride_t, T, P: tl.constexpr, P_PAD: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """Load a (len(rows), P_PAD) tile of rows, zero beyond T (when MASK_ROWS) and beyond p."""
    ptrs = base + rows[:, None] * stride_t + offs_d[None, :]
    if MASK_ROWS:
        if P == P_PAD:
            x = tl.load(ptrs, mask=rows[:, None] < T, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < T) & (offs_d[None, :] < P), other=0.0)
    else:
        if P == P_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < P, other=0.0)
    return x


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, w_base, stride_t, offs_m, offs_d, lo, hi, T, qk_scale,
               P: tl.constexpr, P_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASK applies the T edge and the causal mask."""
    offs_0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_0
        kv = _load_rows(w_base, offs_n, offs_d, stride_t, T, P, P_PAD, MASK)  # key AND value
        s = tl.dot(q, tl.trans(kv), input_precision=PREC) * qk_scale        # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(kv.dtype), kv, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=["T", "P_PAD", "CAUSAL"])
@triton.jit
def _fwd_kernel(W, O, LSE, stride_wb, stride_wh, stride_wt, stride_ob, stride_oh, stride_ot,
                H, T, qk_scale, P: tl.constexpr, P_PAD: tl.constexpr, CAUSAL: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks have the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    w_base = W + b * stride_wb + h * stride_wh
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, P_PAD)
    q = _load_rows(w_base, offs_m, offs_d, stride_wt, T, P, P_PAD, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, P_PAD], tl.float32)
    if CAUSAL:  # keys before the block need no mask; the diagonal block does
        lo = start_m
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:  # full key blocks need no mask; the ragged last one does
        lo = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, w_base, stride_wt, offs_m, offs_d, 0, lo, T,
                               qk_scale, P, P_PAD, BLOCK_N, CAUSAL, False, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, w_base, stride_wt, offs_m, offs_d, lo, hi, T,
                               qk_scale, P, P_PAD, BLOCK_N, CAUSAL, True, PREC)

    acc = acc / l_i[:, None]
    row_ok = offs_m < T
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < P))


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                  H, T, P: tl.constexpr, P_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """delta_i = sum_c O_ic dO_ic, in fp32."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, P_PAD)
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, offs_d, stride_ot, T, P, P_PAD, True)
    do = _load_rows(DO + b * stride_db + h * stride_dh, rows, offs_d, stride_dt, T, P, P_PAD, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _bwd_kv_inner(acc, kv, w_base, do_base, stride_wt, stride_dt, lse_base, delta_base, offs_r,
                  offs_d, lo, hi, T, qk_scale, sm_scale, P: tl.constexpr, P_PAD: tl.constexpr,
                  BLOCK_IN: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                  PREC: tl.constexpr):
    """Own rows as keys/values: acc += sum over query blocks m of P^T dO + dS^T Q."""
    offs_0 = tl.arange(0, BLOCK_IN)
    for start_m in range(lo, hi, BLOCK_IN):
        offs_m = start_m + offs_0
        q = _load_rows(w_base, offs_m, offs_d, stride_wt, T, P, P_PAD, MASK)
        do = _load_rows(do_base, offs_m, offs_d, stride_dt, T, P, P_PAD, MASK)
        if MASK:  # lse = +inf makes P = 0 on rows past T
            lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(kv, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK, BLOCK_IN) = S^T
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:
            keep = offs_m[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_r[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dp_t = tl.dot(kv, tl.trans(do), input_precision=PREC)           # V = W: dP^T = W dO^T
        ds_t = p_t * (dp_t - delta[None, :]) * sm_scale
        acc = tl.dot(p_t.to(kv.dtype), do, acc, input_precision=PREC)    # dV
        acc = tl.dot(ds_t.to(kv.dtype), q, acc, input_precision=PREC)    # dK
    return acc


@triton.jit
def _bwd_q_inner(acc, q, do, lse, delta, w_base, stride_wt, offs_r, offs_d, lo, hi, T,
                 qk_scale, sm_scale, P: tl.constexpr, P_PAD: tl.constexpr, BLOCK_IN: tl.constexpr,
                 CAUSAL: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    """Own rows as queries: acc += sum over key blocks n of dS K."""
    offs_0 = tl.arange(0, BLOCK_IN)
    for start_n in range(lo, hi, BLOCK_IN):
        offs_n = start_n + offs_0
        kv = _load_rows(w_base, offs_n, offs_d, stride_wt, T, P, P_PAD, MASK)
        s = tl.dot(q, tl.trans(kv), input_precision=PREC) * qk_scale     # (BLOCK, BLOCK_IN)
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_r[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(kv), input_precision=PREC)
        ds = p * (dp - delta[:, None]) * sm_scale
        acc = tl.dot(ds.to(kv.dtype), kv, acc, input_precision=PREC)     # dQ
    return acc


@triton.autotune(configs=_BWD_CONFIGS, key=["T", "P_PAD", "CAUSAL"])
@triton.jit
def _bwd_kernel(W, DO, DW, LSE, DELTA, stride_wb, stride_wh, stride_wt, stride_db, stride_dh,
                stride_dt, stride_gb, stride_gh, stride_gt, H, T, qk_scale, sm_scale,
                P: tl.constexpr, P_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                BLOCK: tl.constexpr, BLOCK_IN: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    w_base = W + b * stride_wb + h * stride_wh
    do_base = DO + b * stride_db + h * stride_dh
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = DELTA + bh.to(tl.int64) * T
    start = tl.program_id(0) * BLOCK
    offs_r = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, P_PAD)
    row_ok = offs_r < T
    w_own = _load_rows(w_base, offs_r, offs_d, stride_wt, T, P, P_PAD, True)
    do_own = _load_rows(do_base, offs_r, offs_d, stride_dt, T, P, P_PAD, True)
    lse_own = tl.load(lse_base + offs_r, mask=row_ok, other=float("inf"))
    delta_own = tl.load(delta_base + offs_r, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK, P_PAD], tl.float32)
    t_full = (T // BLOCK_IN) * BLOCK_IN

    # 1) own rows as keys and values: query blocks m >= start (causal) or all
    if CAUSAL:
        end_diag = tl.minimum(start + BLOCK, T)
        acc = _bwd_kv_inner(acc, w_own, w_base, do_base, stride_wt, stride_dt, lse_base, delta_base,
                            offs_r, offs_d, start, end_diag, T, qk_scale, sm_scale, P, P_PAD,
                            BLOCK_IN, CAUSAL, True, PREC)
        acc = _bwd_kv_inner(acc, w_own, w_base, do_base, stride_wt, stride_dt, lse_base, delta_base,
                            offs_r, offs_d, start + BLOCK, t_full, T, qk_scale, sm_scale, P, P_PAD,
                            BLOCK_IN, CAUSAL, False, PREC)
        acc = _bwd_kv_inner(acc, w_own, w_base, do_base, stride_wt, stride_dt, lse_base, delta_base,
                            offs_r, offs_d, tl.maximum(start + BLOCK, t_full), T, T, qk_scale, sm_scale,
                            P, P_PAD, BLOCK_IN, CAUSAL, True, PREC)
    else:
        acc = _bwd_kv_inner(acc, w_own, w_base, do_base, stride_wt, stride_dt, lse_base, delta_base,
                            offs_r, offs_d, 0, t_full, T, qk_scale, sm_scale, P, P_PAD,
                            BLOCK_IN, CAUSAL, False, PREC)
        acc = _bwd_kv_inner(acc, w_own, w_base, do_base, stride_wt, stride_dt, lse_base, delta_base,
                            offs_r, offs_d, t_full, T, T, qk_scale, sm_scale, P, P_PAD,
                            BLOCK_IN, CAUSAL, True, PREC)

    # 2) own rows as queries: key blocks n < start unmasked, then the diagonal (causal) or all
    if CAUSAL:
        lo = start
        hi = tl.minimum(start + BLOCK, T)
    else:
        lo = t_full
        hi = T
    acc = _bwd_q_inner(acc, w_own, do_own, lse_own, delta_own, w_base, stride_wt, offs_r, offs_d,
                       0, lo, T, qk_scale, sm_scale, P, P_PAD, BLOCK_IN, CAUSAL, False, PREC)
    acc = _bwd_q_inner(acc, w_own, do_own, lse_own, delta_own, w_base, stride_wt, offs_r, offs_d,
                       lo, hi, T, qk_scale, sm_scale, P, P_PAD, BLOCK_IN, CAUSAL, True, PREC)

    g_ptrs = DW + b * stride_gb + h * stride_gh + offs_r[:, None] * stride_gt + offs_d[None, :]
    tl.store(g_ptrs, acc.to(DW.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < P))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by fp16/bf16 dots


def _check(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 4:
        raise ValueError(f"triton attention expects w of shape (B, H, T, p), got {tuple(w.shape)}")
    if w.dtype not in _DTYPES:
        raise TypeError(f"triton attention supports fp16, bf16 and fp32, got {w.dtype}")
    if w.shape[-1] > 128:
        raise ValueError(f"triton attention supports head width p <= 128, got p={w.shape[-1]}")
    if not (w.is_cuda or INTERPRET):
        raise RuntimeError(f"triton attention needs a CUDA tensor, got one on {w.device} "
                           "(set TRITON_INTERPRET=1 before importing triton to run on CPU, slowly)")
    return w if w.stride(-1) == 1 else w.contiguous()


def _p_pad(p: int) -> int:
    return max(16, triton.next_power_of_2(p))


def fwd_launch(w: torch.Tensor, causal: bool) -> tuple[tuple, dict, tuple[torch.Tensor, torch.Tensor]]:
    """Forward launch arguments (args, constexprs, (o, lse)); the AOT test compiles from them too."""
    B, H, T, p = w.shape
    o = torch.empty_like(w)  # keeps w's layout when dense, e.g. a (B, T, H, p) transpose
    lse = torch.empty(B * H, T, dtype=torch.float32, device=w.device)
    args = (w, o, lse, *w.stride()[:3], *o.stride()[:3], H, T, LOG2E / math.sqrt(p))
    return args, dict(P=p, P_PAD=_p_pad(p), CAUSAL=causal, PREC=_precision(w.dtype)), (o, lse)


def _forward(w: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, p = w.shape
    args, kw, (o, lse) = fwd_launch(w, causal)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_kernel[grid](*args, **kw)
    return o, lse


def delta_launch(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
    """The delta kernel's launch arguments: (args, constexpr kwargs, delta)."""
    p = o.shape[-1]
    delta = torch.empty_like(lse)
    args = (o, do, delta, *o.stride()[:3], *do.stride()[:3], o.shape[1], o.shape[2])
    return args, dict(P=p, P_PAD=_p_pad(p), BLOCK=DELTA_BLOCK), delta


def bwd_launch(w: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
               causal: bool) -> tuple[tuple, dict, torch.Tensor]:
    """The backward kernel's launch arguments: (args, constexpr kwargs, dw)."""
    _, H, T, p = w.shape
    dw = torch.empty_like(w)
    args = (w, do, dw, lse, delta, *w.stride()[:3], *do.stride()[:3], *dw.stride()[:3], H, T,
            LOG2E / math.sqrt(p), 1.0 / math.sqrt(p))
    return args, dict(P=p, P_PAD=_p_pad(p), CAUSAL=causal, PREC=_precision(w.dtype)), dw


def _backward(w: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
              causal: bool, backward: Callable | None = None) -> torch.Tensor:
    B, H, T, p = w.shape
    do = do.to(w.dtype)
    do = do if do.stride(-1) == 1 else do.contiguous()
    args, kw, delta = delta_launch(o, do, lse)
    _delta_kernel[(triton.cdiv(T, DELTA_BLOCK), B * H)](*args, **kw)
    if backward is not None:   # another dW kernel, e.g. cratelm.kernels.triton_bwd5's 5-product one
        return backward(w, do, lse, delta, causal)
    args, kw, dw = bwd_launch(w, do, lse, delta, causal)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK"]), B * H)  # noqa: E731
    _bwd_kernel[grid](*args, **kw)
    return dw


class TiedFlashAttention(torch.autograd.Function):
    """O = softmax(W W^T / sqrt(p), causal) W with W (B, H, T, p); one gradient dW."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, causal: bool, backward: Callable | None = None) -> torch.Tensor:
        w = _check(w)
        ctx.causal, ctx.backward, ctx.empty = causal, backward, w.shape[2] == 0 or w.numel() == 0
        if ctx.empty:
            return w.clone()
        o, lse = _forward(w, causal)
        ctx.save_for_backward(w, o, lse)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if ctx.empty:
            return torch.zeros_like(do), None, None
        return _backward(*ctx.saved_tensors, do, ctx.causal, ctx.backward), None, None


def attention(w: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Softmax attention with ``w`` (B, H, T, p) as query, key and value; returns (B, H, T, p)."""
    return TiedFlashAttention.apply(w, causal, None)

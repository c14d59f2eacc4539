"""CRATE's ISTA block: plain, epilogue-fused (torch / Triton) and torch.compile forms.

Shape legend: N tokens (B*T flattened; leading dims of z are kept), d width,
m = 4d dictionary atoms for the overcomplete variants. Row-vector convention, W as stored
by the authors (``F.linear(z, W) = z W^T``).

Complete ISTA (crate-gpt), W (d, d):

    r      = z - z W^T                            matmul 1, epilogue "z - acc"
    x_next = ReLU(z + eta r W - eta lambda)       matmul 2, epilogue "ReLU(z + eta acc - eta lambda)"

which equals the authors' three-matmul ReLU(z + eta (z W - z W^T W) - eta lambda).
Backward (mask = x_next > 0, g = dL/dx_next * mask, dr = eta g W^T):

    dz = g + dr - dr W        dW = eta r^T g - dr^T z      (W appears twice: two terms)

Overcomplete ISTA (crate-lm / crate-alpha), W (m, d), ``steps`` >= 1:

    c_1     = ReLU(eta z W^T - eta lambda)                       one matmul (a = z W^T never stored)
    e_k     = z - c_k W                                          epilogue "z - acc"
    c_{k+1} = ReLU(c_k + eta e_k W^T - eta lambda)               epilogue "ReLU(c_k + eta acc - eta lambda)"

(c_k + eta e_k W^T = c_k + eta (a - c_k W W^T) with a = z W^T.) The code c (N, m) is returned;
decoding (c W, or a separate decoder) is the model's job.

``impl`` (names in cratelm.kernels.registry.ISTA): "torch" the plain autograd form (the
model's default); "authors" the authors' three-matmul form (complete only; the
overcomplete forms have no authors' variant and use "torch"); "fused" an
autograd.Function whose forward uses torch.addmm (cuBLAS beta-epilogue) plus in-place
shrink, and whose backward uses the saved ReLU output as mask; "triton" the same Function
with a Triton GEMM whose epilogue applies the shrink/ReLU; "compile" torch.compile of
"torch" (inductor fuses the pointwise tail).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cratelm.kernels import outside_autocast
from cratelm.kernels.registry import ISTA_IMPLS

try:  # triton is optional: only impl="triton" needs it
    import triton
    import triton.language as tl

    from cratelm.kernels.triton_mssa import INTERPRET, patch_interpreter
    patch_interpreter()
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None



# --------------------------------------------------------------------------- plain forms
def ista_complete_authors(z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float) -> torch.Tensor:
    """The authors' three-matmul form: ReLU(z + eta (z W - z W^T W) - eta lambda)."""
    x1 = F.linear(z, W)
    grad_1 = F.linear(x1, W.t())
    grad_2 = F.linear(z, W.t())
    return F.relu(z + eta * (grad_2 - grad_1) - eta * lmbda)


def _complete_torch(z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float) -> torch.Tensor:
    r = z - F.linear(z, W)                                   # z - z W^T
    return F.relu(z + eta * (r @ W) - eta * lmbda)


def _overcomplete_torch(z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float,
                        steps: int) -> torch.Tensor:
    c = F.relu(eta * F.linear(z, W) - eta * lmbda)           # c_1 from a = z W^T
    for _ in range(steps - 1):
        c = F.relu(c + eta * F.linear(z - c @ W, W) - eta * lmbda)
    return c


# --------------------------------------------------------------------------- Triton GEMM + epilogue
if triton is not None:
    if INTERPRET:
        _MM_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                                     num_warps=4, num_stages=1)]
    else:  # Hopper; configs that overflow shared memory (fp32) are skipped by the autotuner
        _MM_CONFIGS = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, s, w in [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
                                     (128, 128, 32, 4, 4), (64, 256, 32, 4, 4), (128, 64, 32, 4, 4),
                                     (64, 128, 32, 4, 4), (64, 64, 32, 4, 4)]
        ][:int(os.environ.get("CRATELM_AUTOTUNE_CONFIGS", "0")) or None]   # first N only, when set

    @triton.autotune(configs=_MM_CONFIGS, key=["M", "N", "K", "HAS_X", "RELU"])
    @triton.jit
    def _mm_epilogue_kernel(A, Bm, X, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                            stride_xm, stride_xn, stride_cm, stride_cn, c_x, c_acc, c_0,
                            HAS_X: tl.constexpr, RELU: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
        """C = act(c_acc * (A @ B) + c_x * X + c_0), accumulated in fp32; grouped tile order."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_size
        pid_n = (pid % group) // group_size

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = Bm + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PREC)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # the epilogue: shrink + ReLU in registers, the pre-activation never reaches memory
        y = acc * c_acc + c_0
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_X:
            x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_n[None, :] * stride_xn,
                        mask=mask, other=0.0)
            y += c_x * x.to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, y.to(C.dtype.element_ty), mask=mask)


def linear_epilogue(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor | None = None, c_x: float = 1.0,
                    c_acc: float = 1.0, c_0: float = 0.0, relu: bool = False,
                    engine: str = "torch") -> torch.Tensor:
    """act(c_acc * a @ b + c_x * x + c_0) for a (M, K), b (K, N), x (M, N); no autograd.

    ``engine="torch"``: one addmm (cuBLAS applies c_x * x as its beta epilogue) plus an
    in-place shift/ReLU; ``engine="triton"``: one Triton GEMM with the whole epilogue fused.
    """
    if a.shape[1] != b.shape[0] or (x is not None and x.shape != (a.shape[0], b.shape[1])):
        raise ValueError(f"linear_epilogue: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, "
                         f"x {None if x is None else tuple(x.shape)} do not fit")
    if engine == "torch":
        y = torch.mm(a, b).mul_(c_acc) if x is None else torch.addmm(x, a, b, beta=c_x, alpha=c_acc)
        if c_0 != 0.0:
            y.add_(c_0)
        return y.relu_() if relu else y
    if engine != "triton":
        raise ValueError(f"unknown linear_epilogue engine {engine!r}; choose 'torch' or 'triton'")
    if triton is None:
        raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
    if not (a.is_cuda or INTERPRET):
        raise RuntimeError(f"impl='triton' needs CUDA tensors, got {a.device} "
                           "(set TRITON_INTERPRET=1 before importing triton to run on CPU, slowly)")
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"impl='triton' supports fp16, bf16 and fp32, got {a.dtype}")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    xx = a if x is None else x
    prec = "ieee" if a.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _mm_epilogue_kernel[grid](a, b, xx, c, M, N, K, *a.stride(), *b.stride(), *xx.stride(), *c.stride(),
                              float(c_x), float(c_acc), float(c_0),
                              HAS_X=x is not None, RELU=relu, PREC=prec)
    return c


# --------------------------------------------------------------------------- autograd Functions
class ISTACompleteFn(torch.autograd.Function):
    """x_next = ReLU(z + eta (z - z W^T) W - eta lambda) for z (N, d), W (d, d)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float, engine: str) -> torch.Tensor:
        r = linear_epilogue(z, W.t(), x=z, c_x=1.0, c_acc=-1.0, engine=engine)            # z - z W^T
        out = linear_epilogue(r, W, x=z, c_x=1.0, c_acc=eta, c_0=-eta * lmbda, relu=True, engine=engine)
        ctx.save_for_backward(z, W, r, out)  # out > 0 is the ReLU mask
        ctx.eta = eta
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        z, W, r, out = ctx.saved_tensors
        eta = ctx.eta
        g = torch.where(out > 0, dout, 0)                    # dL/d(pre-activation)
        dr = torch.mm(g, W.t()).mul_(eta)                    # r enters as eta r W
        dz = torch.addmm(g + dr, dr, W, alpha=-1.0)          # z enters directly, via r = z - z W^T
        dW = torch.mm(r.t(), g).mul_(eta).addmm_(dr.t(), z, alpha=-1.0)  # W in r W and in z W^T
        return dz, dW, None, None, None


class ISTAOvercompleteFn(torch.autograd.Function):
    """c = ``steps`` ISTA steps from c_0 = 0 for z (N, d), W (m, d); returns c (N, m)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float, steps: int,
                engine: str) -> torch.Tensor:
        shift = -eta * lmbda
        c = linear_epilogue(z, W.t(), c_acc=eta, c_0=shift, relu=True, engine=engine)        # c_1
        codes, residuals = [c], []
        for _ in range(steps - 1):
            e = linear_epilogue(c, W, x=z, c_x=1.0, c_acc=-1.0, engine=engine)               # z - c W
            c = linear_epilogue(e, W.t(), x=c, c_x=1.0, c_acc=eta, c_0=shift, relu=True, engine=engine)
            codes.append(c)
            residuals.append(e)
        ctx.save_for_backward(z, W, *codes, *residuals)
        ctx.eta, ctx.steps = eta, steps
        return c

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        z, W, *rest = ctx.saved_tensors
        eta, steps = ctx.eta, ctx.steps
        codes, residuals = rest[:steps], rest[steps:]
        acc_dtype = torch.float32 if W.dtype in (torch.float16, torch.bfloat16) else W.dtype
        dW = torch.zeros(W.shape, dtype=acc_dtype, device=W.device)   # summed over steps
        dz = torch.zeros_like(z)
        for k in range(steps - 1, 0, -1):        # c_{k+1} = ReLU(c_k + eta e_k W^T - eta lambda)
            g = torch.where(codes[k] > 0, dc, 0)
            de = torch.mm(g, W).mul_(eta)                                   # through eta e W^T
            dW += torch.mm(g.t(), residuals[k - 1]).to(acc_dtype).mul_(eta)       # W in e W^T
            dW -= torch.mm(codes[k - 1].t(), de).to(acc_dtype)                    # W in e = z - c W
            dz += de
            dc = torch.addmm(g, de, W.t(), alpha=-1.0)                      # c_k directly and via e
        g = torch.where(codes[0] > 0, dc, 0)     # c_1 = ReLU(eta z W^T - eta lambda)
        dz.addmm_(g, W, alpha=eta)
        dW += torch.mm(g.t(), z).to(acc_dtype).mul_(eta)
        return dz, dW.to(W.dtype), None, None, None, None


# --------------------------------------------------------------------------- public entry points
_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn)
    return _COMPILED[name]


def _check(z: torch.Tensor, W: torch.Tensor, impl: str, square: bool) -> None:
    if impl not in ISTA_IMPLS:
        raise ValueError(f"unknown ISTA implementation {impl!r}; choose one of {ISTA_IMPLS}")
    if W.dim() != 2 or W.shape[1] != z.shape[-1] or (square and W.shape[0] != W.shape[1]):
        want = "(d, d)" if square else "(m, d)"
        raise ValueError(f"ISTA: dictionary W {tuple(W.shape)} must be {want} with d = z.shape[-1] = {z.shape[-1]}")


def ista_complete(z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float,
                  impl: str = "torch") -> torch.Tensor:
    """ReLU(z + eta (z - z W^T) W - eta lambda) for z (..., d), W (d, d); see the module doc."""
    _check(z, W, impl, square=True)
    if impl == "torch":
        return _complete_torch(z, W, eta, lmbda)
    if impl == "authors":
        return ista_complete_authors(z, W, eta, lmbda)
    if impl == "compile":
        return _compiled("complete", _complete_torch)(z, W, eta, lmbda)
    z2 = z.reshape(-1, z.shape[-1])
    out = outside_autocast(ISTACompleteFn.apply, z2, W, float(eta), float(lmbda),
                           "torch" if impl == "fused" else "triton")
    return out.view(z.shape)


def ista_overcomplete(z: torch.Tensor, W: torch.Tensor, eta: float, lmbda: float, steps: int = 2,
                      impl: str = "torch") -> torch.Tensor:
    """Sparse code c (..., m) after ``steps`` ISTA steps from zero, W (m, d); see the module doc."""
    _check(z, W, impl, square=False)
    if steps < 1:
        raise ValueError(f"ISTA: steps={steps} must be >= 1")
    if impl in ("torch", "authors"):   # the authors had no overcomplete form
        return _overcomplete_torch(z, W, eta, lmbda, steps)
    if impl == "compile":
        return _compiled("overcomplete", _overcomplete_torch)(z, W, eta, lmbda, steps)
    z2 = z.reshape(-1, z.shape[-1])
    c = outside_autocast(ISTAOvercompleteFn.apply, z2, W, float(eta), float(lmbda), steps,
                         "torch" if impl == "fused" else "triton")
    return c.view(*z.shape[:-1], W.shape[0])

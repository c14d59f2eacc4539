"""ISTA forms: fused / Triton / compile against the float64 plain forms, values and gradients."""

import importlib.util

import pytest
import torch

from cratelm.kernels import ista

HAS_TRITON = importlib.util.find_spec("triton") is not None
ETA, LMBDA = 0.1, 0.1
D = 24                    # not a multiple of the interpreter's 32-wide tiles
Z_SHAPE = (2, 19, D)      # leading dims kept; N = 38 rows


def _data(m: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(Z_SHAPE, generator=g, dtype=dtype)
    W = torch.randn(m, D, generator=g, dtype=dtype) * (0.3 if m == D else 0.15)
    return z, W


def _run(fn, z: torch.Tensor, W: torch.Tensor, device: str = "cpu", dtype=None):
    """fn's output and the gradients wrt z and W of <output, fixed random cotangent>, in float64."""
    dtype = dtype or z.dtype
    z = z.to(device, dtype).requires_grad_()
    W = W.to(device, dtype).requires_grad_()
    out = fn(z, W)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    gz, gW = torch.autograd.grad(out, (z, W), dy.to(device, dtype))
    return [t.detach().cpu().double() for t in (out, gz, gW)]


def _assert_all_close(got, want, **tol):
    for name, a, b in zip(("value", "grad z", "grad W"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol)


def test_two_matmul_form_equals_the_authors_three():
    z, W = _data(D)
    want = _run(lambda z, W: ista.ista_complete_authors(z, W, ETA, LMBDA), z, W)
    got = _run(lambda z, W: ista.ista_complete(z, W, ETA, LMBDA, impl="torch"), z, W)
    _assert_all_close(got, want, rtol=1e-12, atol=1e-12)
    assert 0.2 < (want[0] == 0).double().mean() < 0.8  # the ReLU mask is exercised


def test_fused_complete_backward_formula_is_exact_in_float64():
    z, W = _data(D)
    want = _run(lambda z, W: ista.ista_complete(z, W, ETA, LMBDA, impl="torch"), z, W)
    got = _run(lambda z, W: ista.ista_complete(z, W, ETA, LMBDA, impl="fused"), z, W)
    _assert_all_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_fused_overcomplete_backward_is_exact_in_float64(steps):
    z, W = _data(4 * D)
    want = _run(lambda z, W: ista.ista_overcomplete(z, W, ETA, LMBDA, steps, impl="torch"), z, W)
    got = _run(lambda z, W: ista.ista_overcomplete(z, W, ETA, LMBDA, steps, impl="fused"), z, W)
    assert got[0].shape == (*Z_SHAPE[:-1], 4 * D)
    _assert_all_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("steps", [None, 1, 2, 3], ids=["complete", "over1", "over2", "over3"])
def test_triton_fp32_matches_float64(steps, device):
    z, W = _data(D if steps is None else 4 * D)
    if steps is None:
        fn = lambda z, W, impl: ista.ista_complete(z, W, ETA, LMBDA, impl=impl)  # noqa: E731
    else:
        fn = lambda z, W, impl: ista.ista_overcomplete(z, W, ETA, LMBDA, steps, impl=impl)  # noqa: E731
    want = _run(lambda z, W: fn(z, W, "torch"), z, W)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")   # IEEE fp32 dots on a GPU
    try:
        got = _run(lambda z, W: fn(z, W, "triton"), z, W, device=device, dtype=torch.float32)
    finally:
        torch.set_float32_matmul_precision(prev)
    _assert_all_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("with_x, relu", [(False, False), (True, True)])
def test_linear_epilogue_engines_agree(with_x, relu, device):
    g = torch.Generator().manual_seed(3)
    a, b, x = (torch.randn(s, generator=g) for s in ((45, 40), (40, 70), (45, 70)))
    want = ista.linear_epilogue(a.double(), b.double(), x.double() if with_x else None,
                                c_x=0.5, c_acc=-2.0, c_0=0.25, relu=relu, engine="torch")
    got = ista.linear_epilogue(a.to(device), b.t().contiguous().t().to(device),  # a strided b
                               x.to(device) if with_x else None,
                               c_x=0.5, c_acc=-2.0, c_0=0.25, relu=relu, engine="triton")
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_compile_matches_float64_plain():
    """torch.compile on CPU takes ~15 s the first time (inductor + a C++ compiler)."""
    for m, fn in ((D, lambda z, W, i: ista.ista_complete(z, W, ETA, LMBDA, impl=i)),
                  (4 * D, lambda z, W, i: ista.ista_overcomplete(z, W, ETA, LMBDA, 2, impl=i))):
        z, W = _data(m)
        want = _run(lambda z, W: fn(z, W, "torch"), z, W)
        got = _run(lambda z, W: fn(z, W, "compile"), z, W)
        _assert_all_close(got, want, rtol=1e-10, atol=1e-10)


def test_clear_errors():
    z, W = _data(D)
    with pytest.raises(ValueError, match="unknown ISTA implementation 'cuda'"):
        ista.ista_complete(z, W, ETA, LMBDA, impl="cuda")
    with pytest.raises(ValueError, match=r"\(96, 24\) must be \(d, d\)"):
        ista.ista_complete(z, torch.zeros(96, D, dtype=z.dtype), ETA, LMBDA)
    with pytest.raises(ValueError, match="steps=0"):
        ista.ista_overcomplete(z, torch.zeros(96, D, dtype=z.dtype), ETA, LMBDA, steps=0)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fused", "triton", "compile"])
@pytest.mark.parametrize("steps", [None, 2], ids=["complete", "over2"])
def test_bf16_fused_forms_match_plain_on_gpu(impl, steps):
    d = 256
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 300, d, generator=g)
    W = torch.randn(d if steps is None else 4 * d, d, generator=g) * (d ** -0.5)
    if steps is None:
        fn = lambda z, W, i: ista.ista_complete(z, W, ETA, LMBDA, impl=i)  # noqa: E731
    else:
        fn = lambda z, W, i: ista.ista_overcomplete(z, W, ETA, LMBDA, steps, impl=i)  # noqa: E731
    want = _run(lambda z, W: fn(z, W, "torch"), z, W, device="cuda", dtype=torch.float32)
    plain = _run(lambda z, W: fn(z, W, "torch"), z, W, device="cuda", dtype=torch.bfloat16)
    got = _run(lambda z, W: fn(z, W, impl), z, W, device="cuda", dtype=torch.bfloat16)
    for name, a, p, w in zip(("value", "grad z", "grad W"), got, plain, want):
        err, err_plain = (a - w).norm() / w.norm(), (p - w).norm() / w.norm()
        assert err <= 2 * err_plain + 1e-3, (name, float(err), float(err_plain))


# The real (non-interpreted) GEMM-epilogue kernel compiled to an sm_90 cubin: no GPU needed.
AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from cratelm.kernels import ista

jit, dt = ista._mm_epilogue_kernel.fn, sys.argv[1]
cfg = ista._MM_CONFIGS[2]
for has_x in (True, False):
    consts = dict(HAS_X=has_x, RELU=has_x, PREC="tf32", **cfg.kwargs)
    sig = {n: "constexpr" if n in consts else ("*" + dt if n in ("A", "Bm", "X", "C") else
           "fp32" if n in ("c_x", "c_acc", "c_0") else "i32") for n in jit.arg_names}
    src = triton.compiler.ASTSource(fn=jit, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, "num_stages": 3})
print("compiled")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_gemm_compiles_for_hopper_without_a_gpu(dtype, compile_for_hopper):
    compile_for_hopper(AOT_SCRIPT, dtype)

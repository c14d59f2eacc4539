import importlib.util

import pytest
import torch

from cratelm.kernels import attention, attention_qkv, get_backend
from cratelm.model import CrateLM

from .test_model import ARCHS, tiny

# triton runs under TRITON_INTERPRET=1 on CPU (see tests/kernels/conftest.py)
CPU_BACKENDS = ["sdpa"] + (["triton"] if importlib.util.find_spec("triton") else [])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_backend_matches_reference_values_and_grads(backend, causal):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 21, 16, generator=g, requires_grad=True)
    dy = torch.randn(2, 3, 21, 16, generator=g)
    ref = attention(w, backend="reference", causal=causal)
    (gw_ref,) = torch.autograd.grad(ref, w, dy)
    out = attention(w, backend=backend, causal=causal)
    (gw,) = torch.autograd.grad(out, w, dy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)


def test_reference_is_softmax_attention_float64():
    w = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    s = w @ w.transpose(-1, -2) / 2.0
    s = s + torch.triu(torch.full((5, 5), float("-inf"), dtype=torch.float64), 1)
    torch.testing.assert_close(attention(w, backend="reference"), torch.softmax(s, -1) @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_backends_agree_with_reference(arch, backend):
    if backend == "triton" and arch == "gpt2":
        pytest.skip("the triton kernel is tied q=k=v only (config refuses gpt2 + triton)")
    # the triton variant also runs the Triton ISTA kernel
    ista = {"ista_impl": "triton"} if backend == "triton" else {}
    cfg_ref, cfg = tiny(arch, attn_backend="reference"), tiny(arch, attn_backend=backend, **ista)
    m_ref, m = CrateLM(cfg_ref, seed=1), CrateLM(cfg, seed=1)
    idx = torch.randint(0, cfg.vocab_size, (2, 17))
    loss_ref, loss = m_ref(idx, idx), m(idx, idx)
    loss_ref.backward()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(m.named_parameters(), m_ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causality(arch, backend):
    cfg = tiny(arch, attn_backend=backend)
    model = CrateLM(cfg, seed=2).double()
    idx = torch.randint(0, cfg.vocab_size, (1, 16))
    base = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, t], base[:, t])


def test_unknown_and_unavailable_backends_are_explicit():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        get_backend("fast")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match="'flash' is not available.*flash-attn"):
            attention(torch.randn(1, 1, 4, 8), backend="flash")
    if importlib.util.find_spec("triton") is not None:
        x = torch.randn(1, 1, 4, 8)
        with pytest.raises(ValueError, match="only supports tied"):
            attention_qkv(x, x, x, backend="triton")


@pytest.mark.cuda
def test_flash_matches_sdpa_bf16():
    # (the triton kernel's bf16 checks against sdpa live in tests/kernels/test_triton_mssa.py)
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not installed")
    w = torch.randn(2, 12, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, ref = attention(w, backend="flash"), attention(w, backend="sdpa")
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_attention_is_causal_for_every_backend(backend):
    w = torch.randn(1, 2, 13, 32)
    base = attention(w, backend=backend)
    for t in (0, 6, 12):
        changed = w.clone()
        changed[:, :, t] += 1.0
        out = attention(changed, backend=backend)
        torch.testing.assert_close(out[:, :, :t], base[:, :, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, :, t], base[:, :, t])

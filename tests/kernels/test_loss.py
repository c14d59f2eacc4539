"""The chunked LM-head cross-entropy against the plain one: loss and both gradients."""

import importlib.util

import pytest
import torch

from cratelm.kernels.loss import default_chunk_rows, lm_head_loss

V, D = 203, 24  # rows 2 x 37 = 74: not a multiple of any chunk below


def _data(dtype, seed: int = 0, ignore: bool = True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 37, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.3).to(dtype)
    targets = torch.randint(0, V, (2, 37), generator=g)
    if ignore:
        targets[0, :5] = -1
        targets[1, 30:] = -1
    return hidden, weight, targets


def _loss_and_grads(impl, hidden, weight, targets, scale=2.5, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lm_head_loss(h, w, targets, impl=impl, **kw)
    (loss * scale).backward()   # grad_output != 1 must scale the stored gradients
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("chunk_rows", [1, 16, 50, None])
def test_chunked_equals_plain(dtype, tol, chunk_rows):
    hidden, weight, targets = _data(dtype)
    want = _loss_and_grads("plain", hidden, weight, targets)
    got = _loss_and_grads("chunked", hidden, weight, targets, chunk_rows=chunk_rows)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_matches_a_float64_definition():
    hidden, weight, targets = _data(torch.float64)
    logits = hidden.reshape(-1, D) @ weight.t()
    keep = targets.reshape(-1) != -1
    lse = torch.logsumexp(logits[keep], -1)
    want = (lse - logits[keep].gather(1, targets.reshape(-1)[keep, None]).squeeze(1)).mean()
    torch.testing.assert_close(lm_head_loss(hidden, weight, targets, impl="chunked", chunk_rows=7), want)


def test_only_needed_gradients_and_no_grad_mode():
    hidden, weight, targets = _data(torch.float32)
    w = weight.clone().requires_grad_()
    loss = lm_head_loss(hidden, w, targets, impl="chunked", chunk_rows=16)
    loss.backward()
    assert hidden.grad is None and w.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(lm_head_loss(hidden, weight, targets, impl="chunked"),
                                   lm_head_loss(hidden, weight, targets, impl="plain"))


def test_all_ignored_behaves_like_plain():
    hidden, weight, targets = _data(torch.float32)
    targets[:] = -1
    for impl in ("plain", "chunked"):
        loss, gh, gw = _loss_and_grads(impl, hidden, weight, targets)
        assert torch.isnan(loss) and not gh.any() and not gw.any(), impl


def test_default_chunk_rows_from_a_memory_budget():
    assert default_chunk_rows(16384, 50304) == 2048         # 2048 x 50304 bf16 logits <= 256 MiB
    assert default_chunk_rows(16384, 50304, itemsize=4) == 1024
    assert default_chunk_rows(10, 50304) == 10
    assert default_chunk_rows(5, 1 << 30) == 1


def test_clear_errors():
    hidden, weight, targets = _data(torch.float32)
    with pytest.raises(ValueError, match="unknown loss implementation 'fast'"):
        lm_head_loss(hidden, weight, targets, impl="fast")
    with pytest.raises(ValueError, match="do not fit"):
        lm_head_loss(hidden, weight[:, :5], targets)
    with pytest.raises(RuntimeError, match="impl='liger' needs CUDA"):
        lm_head_loss(hidden, weight, targets, impl="liger")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_bf16_fused_loss_matches_plain_on_gpu(impl):
    if impl == "liger" and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger-kernel is not installed")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 500, 256, generator=g).cuda()
    weight = (torch.randn(5000, 256, generator=g) * 0.05).cuda()
    targets = torch.randint(0, 5000, (4, 500), generator=g).cuda()
    targets[:, :7] = -1
    want = _loss_and_grads("plain", hidden, weight, targets)                       # fp32 judge
    plain = _loss_and_grads("plain", hidden.bfloat16(), weight.bfloat16(), targets)
    got = _loss_and_grads(impl, hidden.bfloat16(), weight.bfloat16(), targets)
    for name, a, p, w in zip(("loss", "grad hidden", "grad weight"), got, plain, want):
        err = (a.float() - w).norm() / w.norm()
        err_plain = (p.float() - w).norm() / w.norm()
        assert err <= 2 * err_plain + 1e-3, (name, float(err), float(err_plain))


@pytest.mark.cuda
def test_chunked_peak_memory_is_under_5_percent_of_plain():
    """At vocab 50304, N = 16384 rows, d = 768, bf16 (the GPT-2-size LM head)."""
    N, d, V_big = 16384, 768, 50304
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V_big, d, device="cuda") * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, V_big, (N,), device="cuda")
    peaks = {}
    for impl in ("plain", "chunked"):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        lm_head_loss(hidden, weight, targets, impl=impl).backward()
        torch.cuda.synchronize()
        peaks[impl] = torch.cuda.max_memory_allocated() - base
    assert peaks["chunked"] * 20 <= peaks["plain"], peaks


@pytest.mark.parametrize("arch", ["crate-gpt", "crate-lm", "gpt2"])
@pytest.mark.parametrize("ista_impl", ["torch", "fused"])
def test_fused_paths_train_under_autocast(arch, ista_impl):
    """Hand-written backwards must see one dtype when the model runs under bf16 autocast."""
    from cratelm.config import ModelConfig
    from cratelm.model import CrateLM

    cfg = ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=64, context=16,
                      loss_impl="chunked", ista_impl="torch" if arch == "gpt2" else ista_impl)
    model = CrateLM(cfg, seed=0)
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fp16_gradients_survive_loss_scaling():
    """fp16 (CPU matmuls work in fp16): plain and chunked against float64 with DeepSpeed-like
    loss scales. The chunked loss keeps its gradients in fp32 until grad_output scales them
    (an fp16 (softmax - onehot) / n_valid underflows, and a scale of 65536 cast to fp16 is inf)."""
    g = torch.Generator().manual_seed(0)
    N, d, V_ = 1024, 64, 4096
    h64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(V_, d, generator=g, dtype=torch.float64) * 0.05
    t = torch.randint(0, V_, (N,), generator=g)
    t[:7] = -1

    def run(impl, dtype, scale):
        h, w = h64.to(dtype).clone().requires_grad_(), w64.to(dtype).clone().requires_grad_()
        loss = lm_head_loss(h, w, t, impl=impl, chunk_rows=256)
        (loss * scale).backward()
        return loss.detach().double(), h.grad.double() / scale, w.grad.double() / scale

    ref = run("plain", torch.float64, 1.0)
    for impl, scales in (("chunked", (1.0, 1024.0, 65536.0)), ("plain", (1024.0, 65536.0))):
        for scale in scales:
            for name, a, b in zip(("loss", "grad hidden", "grad weight"), run(impl, torch.float16, scale), ref):
                assert torch.isfinite(a).all(), (impl, scale, name)
                err = float((a - b).norm() / b.norm())
                assert err <= 1e-3, (impl, scale, name, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_elementwise_pass_matches_torch(dtype):
    """The Triton pass (CUDA's path; here under the interpreter) against the torch one:
    per-row loss and softmax - onehot written over the logits, ignored rows zero."""
    pytest.importorskip("triton")
    from cratelm.kernels import loss_triton
    from cratelm.kernels.loss import _xent_grad_torch

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 2500, generator=g) * 4).to(dtype)      # V not a multiple of the block
    targets = torch.tensor([0, 2499, 17, 1024, 5])
    valid = torch.tensor([True, True, False, True, True])
    want_x, got_x = logits.clone(), logits.clone()
    want = _xent_grad_torch(want_x, targets, valid)
    got = loss_triton.xent_grad_(got_x, targets, valid)
    x64 = logits.double()
    ref = torch.logsumexp(x64, -1) - x64.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got.double(), torch.where(valid, ref, 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, want_x, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-6)
    assert not got_x[2].any() and abs(float(got_x[0].double().sum())) < 1e-2   # rows of G sum to 0

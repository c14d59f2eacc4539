import pytest
import torch

from cratelm.model import CrateLM

from .test_model import ARCHS, tiny


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_uncached(arch, temperature):
    cfg = tiny(arch, context=24)
    model = CrateLM(cfg, seed=5).eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    # 30 new tokens: runs past the context (24), so the window slides and the cache is rebuilt
    kw = dict(max_new_tokens=30, temperature=temperature, top_k=50)
    a = model.generate(prompt, use_cache=True, generator=torch.Generator().manual_seed(9), **kw)
    b = model.generate(prompt, use_cache=False, generator=torch.Generator().manual_seed(9), **kw)
    assert a.shape == (2, 35)
    assert torch.equal(a, b)
    assert int(a.max()) < cfg.vocab_size          # padded vocabulary rows are never sampled


def test_crate_cache_holds_one_tensor_per_layer_gpt2_two():
    crate, gpt2 = CrateLM(tiny(), seed=0), CrateLM(tiny("gpt2"), seed=0)
    c1, c2 = crate.new_cache(batch=1), gpt2.new_cache(batch=1)
    assert c1.buffers[0].shape[0] == 1 and c2.buffers[0].shape[0] == 2
    assert c2.nbytes() == 2 * c1.nbytes()


def test_cached_logits_equal_full_forward():
    cfg = tiny()
    model = CrateLM(cfg, seed=1).double().eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    full = model(idx)
    cache = model.new_cache(1)
    steps = [model.hidden(idx[:, :6], cache)] + [model.hidden(idx[:, t:t + 1], cache) for t in range(6, 12)]
    h = torch.cat(steps, dim=1)
    torch.testing.assert_close(torch.nn.functional.linear(h, model.head_weight), full, rtol=1e-10, atol=1e-10)

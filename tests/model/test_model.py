import pytest
import torch

from cratelm.config import ModelConfig
from cratelm.model import CrateLM, count_params, flops_per_token

from .reference import forward as reference_forward

ARCHS = ["crate-gpt", "crate-lm", "crate-alpha", "gpt2"]


def tiny(arch="crate-gpt", **kw) -> ModelConfig:
    base = dict(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=100, context=24)
    return ModelConfig(**{**base, **kw})


def perturb_norms(model: CrateLM, seed: int = 0) -> None:
    """LayerNorm init is (1, 0): randomise it so the test would see a swapped weight/bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_reference_float64(arch):
    cfg = tiny(arch)
    model = CrateLM(cfg, seed=3).double()
    perturb_norms(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    got = model(idx)
    want = reference_forward(model.state_dict(), idx, arch, cfg.n_layer, cfg.n_head, cfg.eta, cfg.lmbda,
                             cfg.ista_steps)
    assert got.shape == (2, 19, cfg.padded_vocab)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_equals_cross_entropy_of_logits(arch):
    cfg = tiny(arch)
    model = CrateLM(cfg, seed=0).double()
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    tgt = torch.randint(0, cfg.vocab_size, (3, 10))
    want = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), tgt.flatten())
    torch.testing.assert_close(model(idx, tgt), want, rtol=1e-12, atol=0)


def test_ista_impls_agree():
    cfg = tiny()
    m1 = CrateLM(cfg, seed=0).double()
    m2 = CrateLM(tiny(ista_impl="authors"), seed=0).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(m1(idx), m2(idx), rtol=1e-12, atol=1e-12)


def test_init_is_the_authors_and_layout_independent():
    cfg = tiny(n_layer=4, d_model=64)
    a, b = CrateLM(cfg, seed=7), CrateLM(cfg, seed=7)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    W = a.blocks["0"].ista.weight
    bound = (6 / 64) ** 0.5
    assert W.abs().max() <= bound and W.abs().max() > 0.9 * bound         # kaiming-uniform, a = 0
    assert abs(a.blocks["0"].mssa.U.weight.std().item() - 0.02) < 0.003
    assert abs(a.blocks["0"].mssa.proj.weight.std().item() - 0.02 / (2 * 4) ** 0.5) < 0.001
    assert torch.count_nonzero(a.blocks["0"].mssa.proj.bias) == 0
    assert a.head_weight is a.embed.wte.weight                              # tied head
    assert a.ln_f is None                                                    # no final LayerNorm


@pytest.mark.parametrize("name, dims, want", [
    ("crate-gpt2-base", (12, 768, 12), 60.7e6), ("crate-gpt2-medium", (24, 1024, 16), 128.2e6),
    ("crate-gpt2-large", (36, 1280, 20), 242.9e6), ("crate-gpt2-xl", (48, 1600, 25), 451.1e6),
])
def test_param_counts_of_the_paper_sizes(name, dims, want):
    L, d, h = dims
    n = count_params(ModelConfig(n_layer=L, d_model=d, n_head=h))["params"]
    assert abs(n - want) <= 0.1e6, (name, n)


def test_gpt2_base_param_count():
    assert abs(count_params(ModelConfig(arch="gpt2"))["params"] - 124.4e6) <= 0.1e6


def test_flops_per_token_counts_ista_twice():
    cfg = ModelConfig()
    d, L, V, T = 768, 12, 50304, 1024
    assert flops_per_token(cfg) == 6 * (L * 4 * d * d + d * V) + 12 * L * d * T
    # the 6 x params rule would miss one use of the dictionary per layer
    assert flops_per_token(cfg) > 6 * count_params(cfg)["non_embedding_params"]
    lm = ModelConfig(arch="crate-lm")
    assert flops_per_token(lm) == 6 * (L * (2 * d * d + 4 * d * d * 4) + d * V) + 12 * L * d * T


@pytest.mark.parametrize("arch", ["crate-gpt", "gpt2"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_dropout_acts_in_training_only(arch, backend):
    cfg = tiny(arch, dropout=0.2, attn_backend=backend)
    model, plain = CrateLM(cfg, seed=4), CrateLM(tiny(arch, attn_backend=backend), seed=4)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    model.train()
    torch.manual_seed(0)
    a = model(idx)
    torch.manual_seed(1)
    b = model(idx)
    assert not torch.allclose(a, b)                                  # stochastic while training
    model.eval()
    torch.testing.assert_close(model(idx), plain.eval()(idx), rtol=0, atol=0)   # the same function in eval


def test_attention_dropout_and_a_backend_without_it():
    from cratelm.kernels import attention

    w = torch.randn(1, 2, 8, 4)
    torch.manual_seed(0)
    dropped = attention(w, backend="reference", dropout_p=0.5)
    assert not torch.allclose(dropped, attention(w, backend="reference"))
    with pytest.raises(Exception, match="model.dropout=0.1 needs sdpa"):
        tiny(dropout=0.1, attn_backend="triton")

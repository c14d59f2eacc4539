import math

import pytest
import torch

from cratelm.model import CrateLM, coding_rate, layer_diagnostics

from .test_model import tiny


def coding_rate_nxn(u: torch.Tensor, eps_sq: float = 0.01) -> torch.Tensor:
    """The paper's form, N x N per head: 1/2 sum_k logdet(I_N + p/(N eps^2) X_k X_k^T)."""
    x = torch.nn.functional.normalize(u.double(), dim=-1)
    B, K, N, p = x.shape
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            X = x[b, k]
            out[b] += 0.5 * torch.logdet(torch.eye(N, dtype=torch.float64) + p / (N * eps_sq) * X @ X.T)
    return out


def test_coding_rate_equals_the_nxn_definition():
    u = torch.randn(3, 4, 10, 6)
    torch.testing.assert_close(coding_rate(u), coding_rate_nxn(u), rtol=1e-10, atol=1e-10)


def test_coding_rate_is_lower_for_compressed_tokens():
    spread = torch.randn(1, 2, 64, 8)
    collapsed = torch.randn(1, 2, 1, 8).expand(1, 2, 64, 8) + 1e-3 * torch.randn(1, 2, 64, 8)
    assert coding_rate(collapsed).item() < 0.2 * coding_rate(spread).item()
    # one direction only: each head's Gram matrix has rank 1, R = K/2 log(1 + p/eps^2)
    torch.testing.assert_close(coding_rate(torch.ones(1, 2, 16, 8)).item(), math.log(1 + 8 / 0.01), rtol=1e-9, atol=0)


@pytest.mark.parametrize("arch", ["crate-gpt", "crate-lm", "crate-alpha"])
def test_layer_diagnostics(arch):
    cfg = tiny(arch)
    model = CrateLM(cfg, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (4, 20))
    diags = layer_diagnostics(model, idx)
    assert len(diags) == cfg.n_layer
    m = cfg.d_model * cfg.overcomplete
    for layer, d in enumerate(diags):
        assert set(d) == {"coding_rate_in", "coding_rate_out", "compression", "sparsity", "dead_fraction"}
        assert all(isinstance(v, float) for v in d.values())
        assert d["compression"] == pytest.approx(d["coding_rate_in"] - d["coding_rate_out"])
        assert 0 < d["sparsity"] < 1 and 0 <= d["dead_fraction"] <= d["sparsity"]
        assert d["dead_fraction"] * m == pytest.approx(round(d["dead_fraction"] * m))
    # the first layer's input coding rate, recomputed by hand
    blk = model.blocks["0"]
    with torch.no_grad():
        u = blk.mssa.project(blk.ln1(model.embed(idx)))
    assert diags[0]["coding_rate_in"] == pytest.approx(coding_rate(u).mean().item(), rel=1e-12)
    assert layer_diagnostics(CrateLM(tiny("gpt2")), idx) == []

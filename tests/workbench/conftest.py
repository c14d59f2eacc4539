"""Fixtures for the workbench tests: a small prepared corpus with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Toy models: one intra-op thread is faster, and on a loaded shared machine ~20x faster
    (idle threads spin). The trainer leaves the count alone when OMP_NUM_THREADS is set."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXT = [f"def f{i}(x):\n\treturn x * {i} + {i * i}  # value {i}\n\n" * (1 + i % 5) for i in range(80)]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A prepared corpus (train/val shards, meta.json with byte counts, a sentencepiece tokenizer)."""
    from cratelm.data.prepare import prepare_corpus

    root = tmp_path_factory.mktemp("workbench")
    src = root / "src"
    src.mkdir()
    for i, t in enumerate(TEXT):
        (src / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    prepare_corpus([str(src)], root / "corpus", vocab_size=300, val=10, progress=False)
    return root / "corpus"


ETA_LAMBDA = 0.1 * 0.1          # the ISTA threshold eta * lambda (config defaults)
PLANTED_UNIT, DEAD = 0, (1, 2, 3)


def planted_model(vocab: int, t_star: int, d: int = 32, seed: int = 0):
    """A 2-layer crate-gpt whose layer-0 unit PLANTED_UNIT fires on token t_star and no other.

    MSSA's output projection is zero and the position embedding is zero, so layer 0's ISTA
    input is z = LN2(wte[token]). Each layer's dictionary is the identity (atom j = e_j), so
    the ISTA step gives code = ReLU(z + eta (z - z W^T) W - eta lambda) = ReLU(z - eta lambda):
    unit j fires exactly when z_j > eta lambda. The embedding gives coordinate PLANTED_UNIT a
    large value for t_star only, and the coordinates DEAD a very negative value for every
    token (dead units); the other coordinates are random.
    """
    import torch

    from cratelm.config import ModelConfig
    from cratelm.model import CrateLM

    cfg = ModelConfig(arch="crate-gpt", n_layer=2, d_model=d, n_head=4, vocab_size=vocab, context=32)
    model = CrateLM(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(cfg.padded_vocab, d, generator=g)
    emb[:, list(DEAD)] = -5.0
    emb[:, PLANTED_UNIT] = -5.0
    emb[t_star, PLANTED_UNIT] = 6.0
    with torch.no_grad():
        model.embed.wte.weight.copy_(emb)
        model.embed.wpe.weight.zero_()
        for block in model.blocks.values():
            block.mssa.proj.weight.zero_()
            block.mssa.proj.bias.zero_()
            block.ista.weight.copy_(torch.eye(d))
    return model.eval()


def expected_layer0_firing(model, tokens) -> "np.ndarray":
    """Which layer-0 units fire on each token id of ``tokens``, from the construction, in float64."""
    import numpy as np
    import torch

    e = model.embed.wte.weight.detach().double()[torch.as_tensor(np.asarray(tokens, dtype=np.int64))]
    z = torch.nn.functional.layer_norm(e, (e.shape[-1],), eps=model.cfg.ln_eps)
    return (z - ETA_LAMBDA > 0).numpy()

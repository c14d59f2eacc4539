"""Checkpoints saved by the CRATE authors' code (nanoGPT format) import with the same logits."""

import subprocess
import sys

import pytest
import torch

import cratelm
from cratelm.checkpoints import load_model

from .reference import forward as reference_forward

L, D, H, V, CTX = 2, 32, 4, 96, 16


def authors_state(bias: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    wte = r(V, D)
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(CTX, D), "lm_head.weight": wte}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd |= {h + "prenorm_1.weight": 1 + r(D), h + "attn.c_attn.weight": r(D, D),
               h + "attn.c_proj.weight": r(D, D), h + "prenorm_2.weight": 1 + r(D),
               h + "ista.weight": r(D, D), h + "attn.bias": torch.ones(1, 1, CTX, CTX).tril()}
        if bias:
            sd |= {h + "prenorm_1.bias": r(D), h + "attn.c_proj.bias": r(D), h + "prenorm_2.bias": r(D)}
    return sd


def rename_to_authors() -> dict[str, str]:
    names = {"embed.wte.weight": "transformer.wte.weight", "embed.wpe.weight": "transformer.wpe.weight"}
    for i in range(L):
        for ours, theirs in [("ln1", "prenorm_1"), ("ln2", "prenorm_2"), ("mssa.U", "attn.c_attn"),
                             ("mssa.proj", "attn.c_proj"), ("ista", "ista")]:
            for wb in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{wb}"] = f"transformer.h.{i}.{theirs}.{wb}"
    return names


def save_authors(path, state, bias=True):
    args = dict(n_layer=L, n_head=H, n_embd=D, block_size=CTX, bias=bias, vocab_size=V, dropout=0.0)
    torch.save({"model": state, "model_args": args, "iter_num": 10, "best_val_loss": 3.0}, path)


@pytest.mark.parametrize("compiled", [False, True])
def test_imported_logits_equal_reference(tmp_path, compiled):
    state = authors_state()
    if compiled:  # torch.compile prefixes every key
        state = {"_orig_mod." + k: v for k, v in state.items()}
    save_authors(tmp_path / "ckpt.pt", state)
    model = cratelm.load_crate_gpt_checkpoint(tmp_path / "ckpt.pt")
    idx = torch.randint(0, V, (2, CTX))
    want = reference_forward({k.removeprefix("_orig_mod."): v for k, v in state.items()}, idx, "crate-gpt",
                             L, H, rename=rename_to_authors())
    torch.testing.assert_close(model(idx).double(), want, rtol=1e-5, atol=1e-5)


def test_bias_free_checkpoint(tmp_path):
    state = authors_state(bias=False)
    save_authors(tmp_path / "ckpt.pt", state, bias=False)
    model = cratelm.load_crate_gpt_checkpoint(tmp_path / "ckpt.pt")
    idx = torch.randint(0, V, (1, 9))
    # no biases means zero biases: compare with the same weights and explicit zeros
    zeros = dict(state)
    for i in range(L):
        for n in ("prenorm_1", "prenorm_2", "attn.c_proj"):
            zeros[f"transformer.h.{i}.{n}.bias"] = torch.zeros(D)
    want = reference_forward(zeros, idx, "crate-gpt", L, H, rename=rename_to_authors())
    torch.testing.assert_close(model(idx).double(), want, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_list_what_is_wrong(tmp_path):
    state = authors_state()
    state["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3)
    save_authors(tmp_path / "a.pt", state)
    with pytest.raises(ValueError, match=r"keys cratelm does not know: \['transformer.h.0.mlp.c_fc.weight'\]"):
        cratelm.load_crate_gpt_checkpoint(tmp_path / "a.pt")
    state = authors_state()
    state["transformer.h.1.ista.weight"] = torch.zeros(D, D + 1)
    del state["transformer.h.0.prenorm_1.bias"]
    save_authors(tmp_path / "b.pt", state)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.ln1.bias'\].*blocks.1.ista.weight: file \(32, 33\)"):
        cratelm.load_crate_gpt_checkpoint(tmp_path / "b.pt")
    torch.save({"state_dict": {}}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="a dict with 'model' and 'model_args'"):
        cratelm.load_crate_gpt_checkpoint(tmp_path / "c.pt")
    (tmp_path / "d.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="d.pt: cannot be read"):
        cratelm.load_crate_gpt_checkpoint(tmp_path / "d.pt")


def test_import_command_writes_an_exported_model(tmp_path):
    state = authors_state()
    save_authors(tmp_path / "ckpt.pt", state)
    out = tmp_path / "imported"
    subprocess.run([sys.executable, "-m", "cratelm", "import-crate-gpt", str(tmp_path / "ckpt.pt"), str(out)],
                   check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model, meta = load_model(out)
    idx = torch.randint(0, V, (2, 7))
    ref = cratelm.load_crate_gpt_checkpoint(tmp_path / "ckpt.pt")
    torch.testing.assert_close(model(idx), ref(idx), rtol=0, atol=0)
    assert meta["model"]["n_layer"] == L and meta["imported_from"].endswith("ckpt.pt")

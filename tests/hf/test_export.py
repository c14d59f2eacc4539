"""`cratelm export --format hf` and `cratelm import-hf`: transformers gives cratelm's logits and
greedy tokens, the CRATE code shipped in the directory needs no cratelm, and the way back
gives the same model."""

import json
import subprocess
import sys

import pytest
import torch

from cratelm.checkpoints import load_model
from cratelm.cli import main

from .conftest import ARCHS

V = 100   # the real vocabulary of the tiny models (cratelm pads its embedding to 128 rows)


def load_auto(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def hf_models(hf_exports):
    return {arch: load_auto(dst) for arch, (_, _, dst) in hf_exports.items()}


def prompt(batch=2, T=20, seed=0):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_logits_equal_cratelm(arch, hf_exports, hf_models):
    model, _, dst = hf_exports[arch]
    hf = hf_models[arch]
    assert type(hf).__name__ == ("GPT2LMHeadModel" if arch == "gpt2" else "CrateForCausalLM")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["vocab_size"] == V and cfg["vocab_multiple"] == 64
    assert ("auto_map" in cfg) == (arch != "gpt2")
    idx = prompt()
    with torch.no_grad():
        ours, theirs = model(idx)[..., :V], hf(idx).logits
    assert theirs.shape == ours.shape == (2, 20, V)
    rel = ((ours - theirs).abs().max() / ours.abs().max()).item()
    assert rel <= 1e-5, rel
    # transformers' loss (labels = inputs, shifted inside) over the real vocabulary
    want = torch.nn.functional.cross_entropy(ours[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    assert hf(idx, labels=idx).loss.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_equals_cratelm(arch, hf_exports, hf_models):
    model, hf = hf_exports[arch][0], hf_models[arch]
    idx = prompt(T=5, seed=1)
    ours = model.generate(idx, max_new_tokens=25, temperature=0)            # what `cratelm generate` runs
    theirs = hf.generate(idx, max_new_tokens=25, do_sample=False)
    assert theirs.shape == (2, 30)
    assert torch.equal(ours, theirs)
    assert torch.equal(theirs, hf.generate(idx, max_new_tokens=25, do_sample=False, use_cache=False))


@pytest.mark.parametrize("arch", ARCHS[:3])
def test_crate_generation_caches_one_tensor_per_layer(arch, hf_models):
    hf = hf_models[arch]
    out = hf.generate(prompt(T=5), max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert type(cache).__name__ == "CrateCache" and len(cache.layers) == 2
    # one tensor per layer, u = LN1(x) U^T, (B, K, S, p): the last token is never fed back
    assert all(isinstance(u, torch.Tensor) and u.shape == (2, 4, 10, 8) for u in cache.layers)


@pytest.mark.parametrize("arch", ["crate-lm", "gpt2"])
def test_left_padded_batch_generates_as_each_prompt_alone(arch, hf_models):
    hf = hf_models[arch]
    long, short = prompt(1, 7, seed=2), prompt(1, 4, seed=3)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    both = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, p in enumerate([long, short]):
        alone = hf.generate(p, max_new_tokens=8, do_sample=False)
        assert torch.equal(both[row, -8:], alone[0, -8:])


@pytest.mark.parametrize("arch", ARCHS)
def test_import_back_gives_identical_logits(arch, hf_exports, tmp_path):
    model, _, dst = hf_exports[arch]
    assert main(["import-hf", str(dst), str(tmp_path / "back")]) == 0
    idx = prompt(seed=4)
    with torch.no_grad():
        want = model(idx)[..., :V]
        for path in (tmp_path / "back", dst):             # imported, and the HF dir as --checkpoint
            back, meta = load_model(path)
            assert back.cfg == model.cfg
            assert torch.equal(back(idx)[..., :V], want)
            assert torch.equal(back.head_weight[V:], torch.zeros(128 - V, 32))  # the padded rows


def test_import_back_keeps_the_sentencepiece_tokenizer(sp_model, tmp_path):
    tok, model, _, hf_dir = sp_model
    back = tmp_path / "back"
    assert main(["import-hf", str(hf_dir), str(back)]) == 0
    imported, meta = load_model(back)
    assert meta["tokenizer_sha256"] == tok.sha256                # the original shards stay acceptable
    idx = torch.randint(0, 1024, (1, 16))
    assert torch.equal(imported(idx), model(idx))


def test_crate_export_runs_without_cratelm(hf_exports, tmp_path):
    """The remote code imports nothing from cratelm: load it with cratelm unimportable."""
    model, _, dst = hf_exports["crate-alpha"]
    code = (
        "import sys, torch; sys.modules['cratelm'] = None\n"           # any `import cratelm` now fails
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True).eval()\n"
        "idx = torch.arange(12).view(1, 12)\n"
        "print(repr(m(idx).logits.double().sum().item()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        want = model(torch.arange(12).view(1, 12))[..., :V].double().sum().item()
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-6)


def test_import_refuses_other_architectures(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["import-hf", str(d), str(tmp_path / "out")]) == 1
    with pytest.raises(ValueError, match="model_type='llama'"):
        load_model(d)

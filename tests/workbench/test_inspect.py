"""`cratelm inspect` on a planted model, the report's HTML, bounded memory, and `--clamp`."""

from __future__ import annotations

import json
import re
import tracemalloc
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from cratelm.cli import main
from cratelm.config import ModelConfig
from cratelm.data import IndexedTokens, Tokenizer
from cratelm.model import CrateLM
from cratelm.checkpoints import save_model
from cratelm.workbench.edit import clamped, next_token_probs, parse_clamp
from cratelm.workbench.inspect import inspect
from cratelm.workbench.stats import collect

from .conftest import DEAD, PLANTED_UNIT, expected_layer0_firing, planted_model

VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class StrictHTML(HTMLParser):
    """Parses a page back: every non-void tag closed in order, links collected."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.doctype = False

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "href" in attrs:
            self.links.append(attrs["href"])
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"duplicate id {attrs['id']}"
            self.ids.add(attrs["id"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse(path: Path) -> StrictHTML:
    p = StrictHTML()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert p.doctype and not p.stack, (path, p.stack)
    return p


@pytest.fixture(scope="module")
def planted(text_corpus, tmp_path_factory):
    tok = Tokenizer(str(text_corpus / "tokenizer.model"))
    val = np.asarray(IndexedTokens(str(text_corpus / "val.bin")).tokens)
    counts = Counter(int(t) for t in val if t != tok.eos_id)
    t_star = counts.most_common(6)[5][0]            # a token that occurs, but not the commonest
    assert counts[t_star] >= 10
    model = planted_model(tok.vocab_size, t_star)
    path = save_model(model, model.cfg, tmp_path_factory.mktemp("planted") / "model",
                      tokenizer=str(text_corpus / "tokenizer.model"))
    return model, path, t_star, tok, val


def test_inspect_planted_unit_dead_units_and_html(planted, text_corpus, tmp_path):
    model, path, t_star, tok, val = planted
    out = tmp_path / "report"
    assert main(["inspect", "--checkpoint", str(path), "--data", str(text_corpus / "val.bin"), "--out", str(out),
                 "--tokens", "600", "--window", "32", "--edit-units", "2", "--edit", "1:5"]) == 0
    report = json.loads((out / "report.json").read_text())
    n = report["tokens"]
    assert n == min(600, len(val)) // 32 * 32 + (min(600, len(val)) % 32 if min(600, len(val)) % 32 >= 2 else 0)
    sample = val[:n]
    layer0 = report["layers"][0]
    unit = layer0["units"][PLANTED_UNIT]
    assert len(unit["top"]) == 10 and all(c["token"] == t_star for c in unit["top"])
    assert unit["fires"] == int((sample == t_star).sum()) and unit["concentration"] == 1.0
    assert unit["frequency"] == pytest.approx(float((sample == t_star).mean()), rel=1e-12)
    fires = expected_layer0_firing(model, sample)                          # (n, d), from the construction
    assert layer0["dead_units"] == [int(j) for j in np.flatnonzero(~fires.any(0))]
    assert set(DEAD) <= set(layer0["dead_units"]) and PLANTED_UNIT not in layer0["dead_units"]
    assert [u["fires"] for u in layer0["units"]] == fires.sum(0).tolist()
    assert layer0["sparsity"] == pytest.approx(1 - fires.mean(), rel=1e-12)
    # the planted unit has the best score (with layer 1's unit 0, which copies it: identity dictionaries)
    best = report["summary"][0]["score"]
    assert best == pytest.approx(1 - unit["frequency"]) and unit["score"] == best
    assert {(u["layer"], u["unit"]) for u in report["summary"] if u["score"] == best} == {(0, 0), (1, 0)}
    # amplifying the planted unit on its top contexts makes t_star the most likely next token
    assert [(e["layer"], e["unit"]) for e in report["edits"]][0] == (1, 5)          # --edit first, then the summary's
    edit = next(e for e in report["edits"] if (e["layer"], e["unit"]) == (0, PLANTED_UNIT))
    assert all(case["amplified"][0]["token"] == t_star for case in edit["contexts"])
    # the HTML parses back, every page linked from the index exists, anchors resolve
    index = parse(out / "index.html")
    pages = {link.split("#")[0] for link in index.links}
    assert pages == {"report.json", "layer_00.html", "layer_01.html"}
    assert all((out / p).is_file() for p in pages)
    for p in sorted(pages - {"report.json"}):
        page = parse(out / p)
        assert {link for link in page.links} == {"index.html"}
        for link in index.links:
            if link.startswith(p + "#"):
                assert link.split("#")[1] in page.ids
    assert re.search(r'<span class="fire">[^<]+</span>', (out / "layer_00.html").read_text())


def test_inspect_gpt2_and_crate_lm_have_units_and_heads(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 100, 400).astype(np.uint16)
    for arch, width in (("gpt2", 4 * 32), ("crate-lm", 4 * 32)):
        cfg = ModelConfig(arch=arch, n_layer=2, d_model=32, n_head=4, vocab_size=100, context=32)
        rep = inspect(CrateLM(cfg, seed=3), tokens, tmp_path / arch, n_tokens=128, edit_units=1)
        assert [len(lay["units"]) for lay in rep["layers"]] == [width, width]
        assert all(len(lay["heads"]) == 4 and all(len(h["pairs"]) == 10 for h in lay["heads"])
                   for lay in rep["layers"])
        parse(tmp_path / arch / "index.html")


def test_memory_is_flat_as_the_sample_grows(planted):
    """Peak traced allocation of the streaming pass at N and 10 N tokens. The running state is
    numpy (traced); a batch's torch tensors are freed after the batch (bounded by batch size)."""
    model = planted[0]
    tokens = np.random.default_rng(1).integers(0, model.cfg.vocab_size, 10 * 512).astype(np.uint16)
    collect(model, tokens, 128, window=32, batch=4)                 # warm up lazy imports and caches
    peaks = []
    for n in (512, 10 * 512):
        tracemalloc.start()
        stats = collect(model, tokens, n, window=32, batch=4)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert stats.tokens == n
    assert peaks[1] == pytest.approx(peaks[0], rel=0.10), peaks


def test_clamp_changes_the_greedy_continuation(planted, capsys):
    model, path, t_star, tok, _ = planted
    prompt = "def f3(x):\n\treturn"
    ids = torch.tensor([tok.encode(prompt)])
    plain = model.generate(ids, 6, temperature=0)[0, ids.shape[1]:].tolist()
    with clamped(model, [parse_clamp("0:%d=50" % PLANTED_UNIT)]):
        edited = model.generate(ids, 6, temperature=0)[0, ids.shape[1]:].tolist()
    assert edited == [t_star] * 6 and plain != edited                  # the unit's token, every time
    assert model.blocks["0"].ista.clamp is None                        # switched off again
    args = ["generate", "--checkpoint", str(path), "--prompt", prompt, "--temperature", "0",
            "--max-new-tokens", "6", "--device", "cpu"]
    capsys.readouterr()
    assert main(args + ["--clamp", f"0:{PLANTED_UNIT}=50"]) == 0              # the console script's path
    assert capsys.readouterr().out == prompt + tok.decode([t_star] * 6) + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out == prompt + tok.decode(plain) + "\n"
    with pytest.raises(SystemExit, match=r"layer 5 is out of range \(the model has 2 layers\)"):
        main(args + ["--clamp", "5:0=1"])
    # the edit helper: probabilities over the real vocabulary, ablation = the unit at 0
    p = next_token_probs(model, ids[0], [(0, PLANTED_UNIT, 50.0)])
    assert p.shape == (tok.vocab_size,) and int(p.argmax()) == t_star and float(p.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="LAYER:UNIT=VALUE"):
        parse_clamp("0-3=1")


def test_inspect_an_authors_checkpoint_agrees_with_the_training_diagnostics(text_corpus, tmp_path):
    """An authors' CRATE-GPT .pt (nanoGPT names) loads as `cratelm eval` loads it; the layer
    numbers on two windows equal cratelm.model.diagnostics.layer_diagnostics on the same batch."""
    from cratelm.model.diagnostics import layer_diagnostics

    vocab, ctx = Tokenizer(str(text_corpus / "tokenizer.model")).vocab_size, 32
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, vocab_size=vocab, vocab_multiple=1, context=ctx)
    model = CrateLM(cfg, seed=5).eval()
    names = {"embed.wte.weight": "transformer.wte.weight", "embed.wpe.weight": "transformer.wpe.weight"}
    for ours, theirs in [("ln1", "prenorm_1"), ("ln2", "prenorm_2"), ("mssa.U", "attn.c_attn"),
                         ("mssa.proj", "attn.c_proj"), ("ista", "ista")]:
        names |= {f"blocks.{i}.{ours}.{wb}": f"transformer.h.{i}.{theirs}.{wb}" for i in range(2) for wb in
                  ("weight", "bias")}
    state = {names[k]: v for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=ctx, bias=True, vocab_size=vocab, dropout=0.0)
    torch.save({"model": state, "model_args": args}, tmp_path / "ckpt.pt")
    out = tmp_path / "report"
    assert main(["inspect", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(text_corpus / "val.bin"),
                 "--out", str(out), "--tokens", str(2 * ctx), "--window", str(ctx), "--edit-units", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    idx = torch.as_tensor(np.asarray(IndexedTokens(str(text_corpus / "val.bin")).tokens[:2 * ctx], np.int64))
    for got, want in zip(report["layers"], layer_diagnostics(model, idx.view(2, ctx)), strict=True):
        for key in ("coding_rate_in", "coding_rate_out", "compression", "sparsity", "dead_fraction"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert report["checkpoint"].endswith("ckpt.pt") and (out / "layer_01.html").is_file()

"""`cratelm eval` and `cratelm generate` from the command line, on a real prepared corpus."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cratelm.config import ModelConfig
from cratelm.data import IndexedTokens, Tokenizer
from cratelm.data.prepare import prepare_corpus
from cratelm.dist import free_port
from cratelm.evaluate import score_stream
from cratelm.model import CrateLM
from cratelm.checkpoints import load_model, save_model

CTX = 32
TEXT = [f"def f{i}(x):\n\treturn x * {i} + {i * i}  # café ✓\n\n" * (1 + i % 5) for i in range(60)]


def prepare(root: Path, name: str, vocab: int) -> Path:
    src = root / f"{name}-src"
    src.mkdir()
    for i, t in enumerate(TEXT):
        (src / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    prepare_corpus([str(src)], root / name, vocab_size=vocab, val=10, progress=False)
    return root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = prepare(root, "corpus", 300)
    tok = Tokenizer(str(corpus / "tokenizer.model"))
    cfg = ModelConfig(n_layer=2, d_model=32, n_head=4, vocab_size=tok.vocab_size, context=CTX)
    save_model(CrateLM(cfg, seed=1), cfg, root / "model", tokenizer=str(corpus / "tokenizer.model"))
    return root, corpus


def cli(*args, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "cratelm", *map(str, args)], capture_output=True, text=True,
                          check=check, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("stride", [None, 10])
def test_eval_cli_numbers(world, stride):
    root, corpus = world
    text_file = root / "extra.txt"
    text_file.write_text("def g(y):\n\treturn y - 1\n" * 20, encoding="utf-8")
    out = root / f"res-{stride}.json"
    args = ["eval", "--checkpoint", root / "model", "--data", corpus / "val.bin", text_file, "--json", out]
    proc = cli(*args, *(["--stride", stride] if stride else []))
    assert "| data | tokens | loss (nats/token) | perplexity | bits/byte |" in proc.stdout
    res = json.loads(out.read_text())["results"]
    assert [Path(r["data"]).name for r in res] == ["val.bin", "extra.txt"]
    model, _ = load_model(root / "model")
    shard = IndexedTokens(str(corpus / "val.bin"))
    nll, n = score_stream(model, shard.tokens, CTX, stride or CTX)
    assert res[0]["tokens"] == n == shard.num_tokens - 1
    assert res[0]["loss"] == pytest.approx(nll / n, rel=1e-9)
    assert res[0]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-9)
    assert res[0]["bits_per_byte"] == pytest.approx(nll / math.log(2) / shard.num_bytes, rel=1e-9)
    tok = Tokenizer(str(corpus / "tokenizer.model"))
    ids = tok.encode(text_file.read_text()) + [tok.eos_id]
    assert res[1]["tokens"] == len(ids) - 1
    assert res[1]["bits_per_byte"] is not None


@pytest.mark.distributed
def test_two_rank_eval_equals_one_rank(world):
    root, corpus = world
    one, two = root / "one.json", root / "two.json"
    cli("eval", "--checkpoint", root / "model", "--data", corpus / "val.bin", corpus / "train.bin", "--json", one)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "-m", "cratelm", "eval", "--checkpoint", str(root / "model"), "--data", str(corpus / "val.bin"),
                    str(corpus / "train.bin"), "--json", str(two)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    a, b = json.loads(one.read_text())["results"], json.loads(two.read_text())["results"]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-12)


def test_tokenizer_mismatch_is_refused_with_both_hashes(world, tmp_path):
    root, _ = world
    other = prepare(tmp_path, "other", 320)
    proc = cli("eval", "--checkpoint", root / "model", "--data", other / "val.bin", check=False)
    theirs = Tokenizer(str(other / "tokenizer.model")).sha256
    ours = json.loads((root / "model" / "config.json").read_text())["tokenizer_sha256"]
    assert proc.returncode == 2
    assert theirs in proc.stderr and ours in proc.stderr and theirs != ours
    # naming the other tokenizer does not get around the check, for eval or generate
    proc = cli("eval", "--checkpoint", root / "model", "--data", other / "val.bin",
               "--tokenizer", other / "tokenizer.model", check=False)
    assert proc.returncode == 2 and theirs in proc.stderr and ours in proc.stderr
    proc = cli("generate", "--checkpoint", root / "model", "--tokenizer", other / "tokenizer.model", check=False)
    assert proc.returncode != 0 and theirs in proc.stderr and ours in proc.stderr


def test_too_short_data_is_an_error_not_a_crash(world, tmp_path):
    root, _ = world
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = cli("eval", "--checkpoint", root / "model", "--data", empty, check=False)
    assert proc.returncode == 2 and "empty.txt: fewer than 2 tokens" in proc.stderr


def test_eval_of_an_authors_checkpoint_from_the_command_line(world, tmp_path):
    root, corpus = world
    model, _ = load_model(root / "model")
    sd = model.state_dict()
    authors = {"transformer.wte.weight": sd["embed.wte.weight"], "transformer.wpe.weight": sd["embed.wpe.weight"],
               "lm_head.weight": sd["embed.wte.weight"]}
    for i in range(2):
        for ours, theirs in [("ln1", "prenorm_1"), ("ln2", "prenorm_2"), ("mssa.U", "attn.c_attn"),
                             ("mssa.proj", "attn.c_proj"), ("ista", "ista")]:
            for wb in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{wb}" in sd:
                    authors[f"_orig_mod.transformer.h.{i}.{theirs}.{wb}"] = sd[f"blocks.{i}.{ours}.{wb}"]
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=CTX, bias=True,
                vocab_size=model.cfg.padded_vocab, dropout=0.0)
    torch.save({"model": authors, "model_args": args}, tmp_path / "ckpt.pt")
    out = tmp_path / "r.json"
    cli("eval", "--checkpoint", tmp_path / "ckpt.pt", "--data", corpus / "val.bin", "--json", out)
    got = json.loads(out.read_text())["results"][0]
    # the authors' vocabulary is all padded_vocab rows (their checkpoint knows no padding), so
    # the reference is our model with every row a token
    import dataclasses

    from cratelm.data import IndexedTokens
    from cratelm.evaluate import score_stream

    model.cfg = dataclasses.replace(model.cfg, vocab_size=model.cfg.padded_vocab)
    nll, n = score_stream(model, IndexedTokens(str(corpus / "val.bin")).tokens, CTX, CTX)
    assert got["tokens"] == n and got["loss"] == pytest.approx(nll / n, rel=1e-6)


def test_generate_cli_streams_a_deterministic_sample(world):
    root, _ = world
    args = ["generate", "--checkpoint", root / "model", "--prompt", "def f1(x):\n", "--max-new-tokens", "20",
            "--seed", "3"]
    a, b = cli(*args).stdout, cli(*args).stdout
    assert a == b and a.startswith("def f1(x):\n") and len(a) > len("def f1(x):\n")
    greedy = cli(*args, "--temperature", "0").stdout
    model, meta = load_model(root / "model")
    tok = Tokenizer(meta["tokenizer"])
    ids = tok.encode("def f1(x):\n")
    out = model.generate(torch.tensor([ids]), 20, temperature=0)
    assert greedy == "def f1(x):\n" + tok.decode(out[0, len(ids):].tolist()) + "\n"

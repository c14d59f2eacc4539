"""`cratelm compare` on the tiny preset: the table and plots equal what the runs' metrics.jsonl
and `cratelm eval` give, and a rerun trains nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cratelm.cli import main
from cratelm.config import ConfigError
from cratelm.model.accounting import count_params, flops_per_token
from cratelm.workbench.compare import PRESETS, compare, plan, read_metrics, train_runs

PNG = b"\x89PNG\r\n\x1a\n"


def eval_cli(run_dir: Path, val: Path, out: Path) -> dict:
    """`cratelm eval` through the console script's entry point (in this process: no second torch import)."""
    assert main(["eval", "--checkpoint", str(run_dir), "--data", str(val), "--json", str(out)]) == 0
    return json.loads(out.read_text())["results"][0]


def test_compare_tiny_preset_table_plots_and_rerun(text_corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    rows = compare("tiny", out, data=str(text_corpus))
    assert [r["run"] for r in rows] == ["crate-gpt", "crate-alpha", "crate-lm", "gpt2"]
    table = json.loads((out / "compare.json").read_text())["runs"]
    md = (out / "compare.md").read_text()
    for name in ("loss_vs_tokens", "loss_vs_flops", "whitebox"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    cfgs = plan("tiny", out, data=str(text_corpus)).runs
    for row in table:
        cfg, run_dir = cfgs[row["run"]], out / "runs" / row["run"]
        assert row["status"] == "finished" and row["run_dir"] == str(run_dir)
        records = read_metrics(run_dir)
        logs = [r for r in records if "train/tokens" in r]
        assert row["tokens"] == logs[-1]["train/tokens"] == 4 * 4 * 16            # steps x batch x context
        vals = [r for r in records if "val/loss" in r]
        assert row["curve"]["val_loss"] == [r["val/loss"] for r in vals] and [r["step"] for r in vals] == [2, 4]
        assert row["curve"]["tokens"] == [2 * 64, 4 * 64]
        train_s = sum(r["perf/step_ms"] / 1e3 * 2 for r in logs)                   # log_interval 2
        assert row["train_s"] == pytest.approx(train_s, rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / train_s, rel=1e-9)
        assert row["wall_s"] > row["train_s"]
        assert {k: row[k] for k in ("params", "non_embedding_params")} == count_params(cfg.model)
        assert row["flops_per_token"] == flops_per_token(cfg.model)
        diag = [r for r in records if "diag/layer_00/compression" in r]
        if row["arch"] == "gpt2":
            assert not diag and row["compression"] == [] and row["sparsity"] == []
        else:
            assert row["compression"] == [diag[-1][f"diag/layer_{i:02d}/compression"] for i in range(2)]
            assert row["sparsity"] == [diag[-1][f"diag/layer_{i:02d}/sparsity"] for i in range(2)]
        assert f"| {row['run']} | {row['arch']} | {row['params']:,} |" in md
        assert f"| {row['val_loss']:.4f} | {row['perplexity']:.3f} | {row['bits_per_byte']:.4f} |" in md
    for row in table:                           # the table's numbers are `cratelm eval`'s
        ev = eval_cli(out / "runs" / row["run"], text_corpus / "val.bin", tmp_path / f"{row['run']}.json")
        assert row["val_loss"] == pytest.approx(ev["loss"], rel=1e-9)
        assert row["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-9)
        assert row["bits_per_byte"] == pytest.approx(ev["bits_per_byte"], rel=1e-9)
        assert row["val_tokens"] == ev["tokens"]

    # a rerun trains nothing (the metrics are untouched); --only rebuilds the table and plots
    before = {r["run"]: (out / "runs" / r["run"] / "metrics.jsonl").read_text() for r in table}
    capsys.readouterr()
    assert train_runs(plan("tiny", out, data=str(text_corpus))) == {r["run"]: "skipped" for r in table}
    assert capsys.readouterr().out.count("finished already") == 4
    assert {r["run"]: (out / "runs" / r["run"] / "metrics.jsonl").read_text() for r in table} == before
    (out / "compare.md").unlink()
    (out / "whitebox.png").unlink()
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--data", str(text_corpus), "--only"]) == 0
    again = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in table]
    assert (out / "compare.md").read_text() == md and (out / "whitebox.png").is_file()


def test_presets_validate_and_keep_the_recipe_common(text_corpus, tmp_path):
    assert {"cpu", "paper", "tiny"} <= set(PRESETS)
    cpu = plan("cpu", tmp_path / "c", data=str(text_corpus))
    assert sorted(c.model.arch for c in cpu.runs.values()) == ["crate-alpha", "crate-gpt", "crate-lm", "gpt2"]
    for cfg in cpu.runs.values():
        stdlib = dataclasses.replace(cfg.model, vocab_size=4096)      # the preset's corpus vocabulary
        assert 0.9e6 <= count_params(stdlib)["params"] <= 3e6
        assert cfg.train.max_steps * 16 * cfg.model.context == 400 * 16 * 128
    paper = plan("paper", tmp_path / "p", data=str(text_corpus))
    assert {c.model.d_model for c in paper.runs.values()} == {768}
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs:\n  a: [model.arch=gpt2, train.max_steps=3]\n")
    with pytest.raises(ConfigError, match="'train.max_steps=3' is not a model setting"):
        plan(str(bad), tmp_path / "b", data=str(text_corpus))
    bad.write_text("runs:\n  a: [model.context=16]\n  b: [model.context=32]\n")
    with pytest.raises(ConfigError, match="same number of tokens"):
        plan(str(bad), tmp_path / "b", data=str(text_corpus))
    with pytest.raises(ConfigError, match="not a prepared corpus"):
        plan("tiny", tmp_path / "x", data=str(tmp_path))

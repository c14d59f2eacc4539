"""Smoke tests of the benchmark commands (cratelm/bench/): each runs at a tiny size and
prints the figures it promises. Performance itself is measured by running them, not here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cratelm.bench.kernels import loss_traffic_bytes
from cratelm.bench.model import VARIANTS
from cratelm.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--config", str(REPO / "configs/model/tiny.yaml"), "model.n_layer=1", "model.d_model=32",
        "model.vocab_size=64", "model.context=16"]


def test_bench_model_reports_datasheet_mfu_and_matmul_fraction_apart(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["bench", *TINY, "--variants", "fast,triton,authors", "--dtype", "fp32", "--batch", "2",
                 "--steps", "1", "--warmup", "1", "--device", "cpu", "--matmul-n", "256", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| MFU (datasheet) | fraction of measured matmul |" in text
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["fast", "triton", "authors"]
    for r in rows:   # a CPU has no datasheet entry: no MFU, but the measured-matmul fraction
        assert r["mfu"] is None and r["datasheet_tflops"] is None
        assert r["matmul_fraction"] == pytest.approx(r["tflops"] / r["measured_matmul_tflops"])
    assert main(["bench", *TINY, "--variants", "fast", "--dtype", "fp32", "--batch", "2", "--steps", "1",
                 "--warmup", "0", "--device", "cpu", "--matmul-n", "256", "--peak-tflops", "2.0",
                 "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["mfu"] == pytest.approx(r["tflops"] / 2.0)


def test_the_triton_variant_runs_the_triton_kernels():
    assert VARIANTS["triton"]["attn_backend"] == "triton" and VARIANTS["triton"]["ista_impl"] == "triton"


def test_bench_kernels_prints_every_table(capsys):
    assert main(["bench-kernels", "--device", "cpu", "--seq-lens", "32", "--heads", "2", "--head-dim", "16",
                 "--layout", "bthp",
                 "--batch", "1", "--backends", "sdpa,sdpa:math,reference", "--ista-impls", "torch,authors,fused",
                 "--ista-tokens", "64", "--loss-tokens", "64", "--vocab", "128", "--width", "32",
                 "--loss-impls", "plain,chunked", "--loss-chunk-rows", "16", "--warmup", "0", "--reps", "1"]) == 0
    text = capsys.readouterr().out
    for title in ("### attention", "### complete ISTA", "### overcomplete ISTA", "### LM head + cross-entropy"):
        assert title in text
    loss_rows = [line for line in text.splitlines() if line.startswith(("| plain", "| chunked"))]
    assert len(loss_rows) == 3 and all("n/a" not in r and "GB moved" not in r for r in loss_rows)
    assert "fwd+bwd GB moved" in text


def test_chunked_loss_moves_a_fraction_of_plains_bytes():
    """Counted on meta tensors at GPT-2 size (N = 16 x 1024, V = 50304, bf16)."""
    plain = loss_traffic_bytes("plain", 16384, 768, 50304, torch.bfloat16)
    chunked = loss_traffic_bytes("chunked", 16384, 768, 50304, torch.bfloat16)
    assert chunked * 2.5 <= plain, (chunked, plain)


@pytest.mark.slow
def test_bench_train_runs_deepspeed_against_a_plain_loop(tmp_path):
    from tests.train.conftest import base_env

    out = tmp_path / "train.json"
    res = subprocess.run([sys.executable, "-m", "cratelm.bench.train", "--d-model", "32", "--n-layer", "1",
                          "--n-head", "4", "--vocab-size", "64", "--context", "16", "--micro-batch", "2",
                          "--steps", "3", "--warmup", "1", "--zero-stage", "0", "--peak-tflops", "1.0",
                          "--json", str(out)],
                         env=base_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [r["steps_timed"] for r in got["rows"]] == [2, 2] and got["ratio_median"] > 0

"""The main job end to end at its reduced size (`python -m cratelm.demo --quick`)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reruns_idempotently(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "cratelm.demo", "--quick", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    events = list((out / "run" / "tb").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    result = json.loads((out / "eval.json").read_text())["results"][0]
    assert result["tokens"] > 1000 and 1 < result["perplexity"] < 1024 and result["bits_per_byte"] > 0
    assert (out / "sample.txt").read_text().startswith("def fibonacci(n):\n")
    records = (out / "run" / "metrics.jsonl").read_text()
    assert any('"diag/layer_01/coding_rate_in"' in line for line in records.splitlines())
    assert "TensorBoard:  tensorboard --logdir" in first.stdout

    # a second run reuses the corpus and the finished training run
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "is prepared already" in again.stdout
    assert (out / "run" / "metrics.jsonl").read_text() == records      # nothing retrained

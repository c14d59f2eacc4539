"""README "Python API": its code blocks run as written (from a directory laid out like the
repository: configs/ and, for the second block, a prepared corpus in data/stdlib)."""

from __future__ import annotations

import json
import re
import os
import sys
from pathlib import Path

from .conftest import REPO, run_cmd


def python_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Python API", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_model_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), scope)
    assert scope["logits"].shape == (2, 16, scope["cfg"].model.padded_vocab)
    assert scope["out"].shape == (2, 36) and scope["y"].shape == (2, 4, 16, 16)
    assert scope["meta"]["model"]["n_layer"] == 1 and (tmp_path / "runs/api/model/model.safetensors").is_file()


def test_the_training_block_runs(tmp_path):
    from cratelm.data.prepare import prepare_corpus

    (tmp_path / "configs").symlink_to(REPO / "configs")
    files = [str(p) for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40]]    # a small stdlib corpus
    prepare_corpus(files, tmp_path / "data" / "stdlib", val=4, vocab_size=400, progress=False)
    report = "print(__import__('json').dumps({'exit': trainer.exit_code, 'n': results[0].tokens}))"
    script = python_blocks()[1] + "\n" + report + "\n"
    proc = run_cmd([sys.executable, "-c", script], cwd=tmp_path, timeout=400)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["exit"] == 0 and got["n"] > 0
    status = json.loads((tmp_path / "runs/api-train/status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4
    assert (tmp_path / "runs/api-train/model/model.safetensors").is_file()

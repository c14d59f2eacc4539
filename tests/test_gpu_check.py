"""`make gpu-check DRY_RUN=1`: on a CPU, every command of the GPU check parses and the
report is written (the real run needs a GPU: docs/performance.md)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_parses_every_command(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"PY={sys.executable}", f"OUT={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert report["dry_run"] and len(names) == 7, names
    assert all(s["status"] == "ok" for s in report["steps"]), [(s["name"], s["status"]) for s in report["steps"]]
    for wanted in ("pytest -m cuda", "attention at the model's shape", "torch.compile", "--train", "chunk-size sweep"):
        assert any(wanted in n for n in names), wanted
    md = (out / "report.md").read_text()
    assert md.startswith("# gpu-check (dry run") and md.count("\n## ") == 7

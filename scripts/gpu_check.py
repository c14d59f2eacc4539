"""``make gpu-check``: everything a lent GPU should measure, in one command, in <= 8 minutes.

    make gpu-check                       # system python3, the repo on PYTHONPATH, report in gpu-check/
    make gpu-check WHEELS=/path/wheels   # first: pip install --no-index --find-links WHEELS deepspeed
    make gpu-check DRY_RUN=1             # on a CPU: every command only parses (its parser / --collect-only)

Each step runs as its own process with its own timeout; a failure or a timeout is recorded
and the next step runs. The report is ``OUT/report.json`` (one record per step: command,
status, seconds, output tail) and ``OUT/report.md`` (the same, with each step's output);
OUT is ``--out`` (the Makefile passes ``$OUT`` when set, else ``gpu-check``). Offline:
nothing is downloaded; without deepspeed (and no wheels) the ``--train`` step is skipped
and the report says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUDGET_S = 8 * 60
REPO = Path(__file__).resolve().parents[1]
BASE = "configs/model/crate-gpt2-base.yaml"


@dataclass
class Step:
    name: str
    argv: list[str]                 # after the python executable
    timeout: int
    dry: list[str] | None = None    # the dry-run form (default: argv + --help)
    needs: str | None = None        # a module that must import, else the step is skipped
    env: dict[str, str] = field(default_factory=dict)


def steps(py: str) -> list[Step]:
    m = ["-m", "cratelm"]
    return [
        Step("environment", ["-c", "import torch, triton; print('torch', torch.__version__, 'triton', "
                                   "triton.__version__, 'cuda', torch.version.cuda); "
                                   "print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"],
             30, dry=["-c", "import torch"]),
        Step("pytest -m cuda (autotuning trimmed to 2 configs)",
             ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
             120, dry=["-m", "pytest", "-q", "-m", "cuda", "--collect-only", "-p", "no:cacheprovider"],
             env={"CRATELM_AUTOTUNE_CONFIGS": "2"}),
        Step("attention at the model's shape and layout (B 16, T 1024, 12 heads of 64, bf16)",
             [*m, "bench-kernels", "--what", "attention", "--layout", "bthp", "--batch", "16", "--heads", "12",
              "--head-dim", "64", "--seq-lens", "1024", "--dtype", "bf16",
              "--backends", "triton,triton-bwd5,sdpa,sdpa:flash,sdpa:efficient,sdpa:cudnn,flash"], 60),
        Step("cratelm bench crate-gpt2-base bf16 micro-batch 16, eager",
             [*m, "bench", "--config", BASE, "--batch", "16", "--dtype", "bf16", "--steps", "6", "--warmup", "2",
              "--variants", "fast,triton,authors,gpt2"], 80),
        Step("cratelm bench crate-gpt2-base bf16 micro-batch 16, torch.compile",
             [*m, "bench", "--config", BASE, "--batch", "16", "--dtype", "bf16", "--steps", "6", "--warmup", "3",
              "--variants", "fast,triton", "--compile"], 90),
        Step("cratelm bench --train (DeepSpeed ZeRO-1 against a plain loop)",
             [*m, "bench", "--config", BASE, "--batch", "16", "--dtype", "bf16", "--steps", "6", "--warmup", "2",
              "--variants", "fast", "--train"], 60, needs="deepspeed"),
        Step("LM-head loss: chunk-size sweep (N 16384, d 768, V 50304, bf16)",
             [*m, "bench-kernels", "--what", "loss", "--dtype", "bf16", "--loss-tokens", "16384", "--width", "768",
              "--vocab", "50304", "--loss-impls", "plain,chunked,liger",
              "--loss-chunk-rows", "512,1024,2048,4096,8192"],
             40),
    ]


def parse_only(step: Step) -> dict | None:
    """Dry run of a ``-m cratelm SUBCOMMAND ...`` step: its real arguments through the
    subcommand's own parser, in this process (None for other steps)."""
    if step.argv[:2] != ["-m", "cratelm"]:
        return None
    from cratelm.cli import SUBCOMMANDS, _module

    name, rest = step.argv[2], step.argv[3:]
    parser = argparse.ArgumentParser(prog=f"cratelm {name}", description=SUBCOMMANDS[name][1])
    _module(name)[0](parser)
    t0 = time.monotonic()
    try:
        parsed = parser.parse_args(rest)
        status, out = "ok", repr(vars(parsed))
    except SystemExit as e:
        status, out = f"failed (arguments do not parse: exit {e.code})", ""
    return {"name": step.name, "command": "cratelm " + " ".join(step.argv[2:]), "timeout_s": step.timeout,
            "status": status, "seconds": round(time.monotonic() - t0, 1), "output": out}


def run_step(py: str, step: Step, dry: bool, left: float) -> dict:
    if dry and (rec := parse_only(step)) is not None:
        return rec
    argv = [py, *(step.dry or [*step.argv, "--help"])] if dry else [py, *step.argv]
    rec = {"name": step.name, "command": " ".join(argv), "timeout_s": step.timeout}
    if not dry and step.needs and importlib.util.find_spec(step.needs) is None:
        return rec | {"status": "skipped", "seconds": 0.0,
                      "output": f"{step.needs} does not import here (pass WHEELS=dir to install it offline)"}
    timeout = max(5, min(step.timeout, left))
    env = {**os.environ, **step.env, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        status, out = ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {timeout:.0f} s"
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return rec | {"status": status, "seconds": round(time.monotonic() - t0, 1), "output": out[-6000:]}


def install_wheels(py: str, wheels: str, dry: bool) -> dict:
    argv = [py, "-m", "pip", "install", "--no-index", "--find-links", wheels, "deepspeed"]
    rec = {"name": f"install deepspeed from {wheels}", "command": " ".join(argv), "timeout_s": 120}
    if dry:
        argv = [py, "-m", "pip", "install", "--help"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        status, out = "timeout after 120 s", ""
    return rec | {"status": status, "seconds": round(time.monotonic() - t0, 1), "output": out[-3000:]}


def markdown(records: list[dict], dry: bool) -> str:
    lines = [f"# gpu-check{' (dry run: commands only parsed)' if dry else ''}", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in records]
    for r in records:
        lines += ["", f"## {r['name']}", "", f"`{r['command']}` — {r['status']}", "",
                  "```", r["output"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="report directory")
    p.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    p.add_argument("--wheels", default=None, help="install deepspeed offline from this wheel directory first")
    p.add_argument("--dry-run", action="store_true", help="only check that every command parses")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    records = [install_wheels(args.python, args.wheels, args.dry_run)] if args.wheels else []
    for step in steps(args.python):
        left = BUDGET_S - (time.monotonic() - start)
        rec = run_step(args.python, step, args.dry_run, left)
        records.append(rec)
        print(f"[gpu-check] {rec['name']}: {rec['status']} ({rec['seconds']} s)", flush=True)
    report = {"dry_run": args.dry_run, "seconds": round(time.monotonic() - start, 1), "steps": records}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(markdown(records, args.dry_run))
    print(f"[gpu-check] report: {out / 'report.md'}, {out / 'report.json'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures for the training tests: a tiny learnable corpus, tiny configs, and launchers.

The corpus is written through the data layer's own writer (cratelm.data.indexed): token
ids follow a noisy rule (next = 5 * prev + 3 mod V with 10% random tokens), so a tiny
model's loss drops fast, and every run reads real shards, meta.json and a tokenizer file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cratelm.dist import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[2]
VOCAB = 64
EOS = 1

TINY = {
    "model": {"arch": "crate-gpt", "n_layer": 2, "d_model": 32, "n_head": 4, "vocab_size": VOCAB,
              "vocab_multiple": 64, "context": 16, "attn_backend": "sdpa"},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 30, "weight_decay": 0.1,
              "grad_clip": 1.0},
    "train": {"precision": "fp32", "zero_stage": 0, "micro_batch": 2, "global_batch": 4, "max_steps": 5,
              "log_interval": 1, "eval_interval": 0, "eval_windows": 8, "diag_interval": 0,
              "ckpt_interval": 0, "keep_last": 2, "seed": 7},
}


def write_corpus(out: Path, vocab: int = VOCAB, n_train: int = 12000, n_val: int = 2000, seed: int = 0) -> Path:
    """A prepared corpus directory (train/val shards + meta.json + tokenizer.model)."""
    from cratelm.data.indexed import ShardWriter, write_json_atomic

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    tok = out / "tokenizer.model"
    tok.write_bytes(b"not a real sentencepiece model, but a file the run must carry along\n")
    splits = {}
    for name, n in (("train", n_train), ("val", n_val)):
        docs = []
        total = 0
        while total < n:
            length = int(rng.integers(20, 120))
            doc = np.empty(length, np.int64)
            doc[0] = rng.integers(2, vocab)
            for i in range(1, length - 1):
                doc[i] = rng.integers(2, vocab) if rng.random() < 0.1 else (5 * doc[i - 1] + 3) % (vocab - 2) + 2
            doc[-1] = EOS
            docs.append(doc)
            total += length
        w = ShardWriter(out / f"{name}.bin", "uint16")
        w.write(np.concatenate(docs), np.array([len(d) for d in docs]))
        w.close()
        splits[name] = {"num_tokens": int(total), "num_documents": len(docs), "num_bytes": int(total)}
    write_json_atomic(out / "meta.json", {
        "format": "cratelm-tokens", "format_version": 1, "dtype": "uint16", "vocab_size": vocab, "eos_id": EOS,
        "tokenizer": "tokenizer.model", "tokenizer_sha256": hashlib.sha256(tok.read_bytes()).hexdigest(),
        "splits": splits, "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        "num_documents": sum(s["num_documents"] for s in splits.values())})
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def job_config(corpus: Path, run_dir: Path, **sections) -> dict:
    """TINY with data paths, run_dir and per-section overrides: job_config(c, r, train={...})."""
    cfg = json.loads(json.dumps(TINY))
    cfg["data"] = {"train": [str(corpus)], "val": str(corpus), "seed": 3}
    cfg["train"]["run_dir"] = str(run_dir)
    for sec, values in sections.items():
        cfg.setdefault(sec, {}).update(values)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
              "CRATELM_FAULT_CRASH_IN_CHECKPOINT", "CRATELM_FAULT_NAN_STEPS"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def run_cmd(cmd: list[str], timeout: float = 300, env: dict | None = None, check: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env or base_env(), cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        import tempfile

        fd, log = tempfile.mkstemp(prefix="cratelm-failed-run-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        err = "\n".join(line for line in proc.stderr.splitlines()
                        if "Warning" not in line and "return func" not in line)
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} (full output: {log})\n--- stdout\n"
                             f"{proc.stdout[-3000:]}\n--- stderr\n{err[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in read_metrics(run_dir) if "train/lr" in r}

"""Logging: TensorBoard scalars, ``metrics.jsonl`` and a one-line console summary.

Every record is a dict ``{"step": s, TAG: value, ...}``; the same TAG names the TensorBoard
scalar and the JSON key, so ``metrics.jsonl`` and the event files hold the same numbers.
The tags are documented in docs/training.md. Only global rank 0 writes.

MFU = achieved model FLOP/s per device / the device's peak dense bf16 FLOP/s. Model FLOPs
per token come from `cratelm.model.accounting.flops_per_token` (matmuls of the minimal
algorithm counted explicitly, forward + backward); recomputation by activation
checkpointing is not counted (it is not useful work).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s per device, from the vendors' data
# sheets. Matched in order against torch.cuda.get_device_name(): put specific names first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H200", 989.0), ("GH200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("A30", 165.0), ("A40", 149.7), ("A10G", 70.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 6000 Ada", 364.0), ("RTX A6000", 154.8), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
    ("MI300X", 1307.0), ("MI325X", 1307.0), ("MI250X", 383.0), ("MI250", 362.0),
]


def peak_tflops(override: float | None = None, device: torch.device | str | None = None) -> float | None:
    """train.peak_tflops if set, else the table entry of this CUDA device, else None (CPU, unknown GPU)."""
    if override:
        return float(override)
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def memory_gib(device: torch.device) -> dict[str, float]:
    """``mem/peak_gib``: peak allocated GPU memory (CUDA) or peak resident set size (CPU)."""
    if device.type == "cuda":
        return {"mem/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem/reserved_gib": torch.cuda.memory_reserved(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return {"mem/peak_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def throughput(tokens: int, seconds: float, flops_per_token: int, n_devices: int,
               peak: float | None) -> dict[str, float]:
    """tokens/s (whole job), model TFLOP/s per device and MFU for ``tokens`` in ``seconds``."""
    if seconds <= 0:
        return {}
    tps = tokens / seconds
    out = {"perf/tokens_per_s": tps, "perf/tflops": tps * flops_per_token / n_devices / 1e12}
    if peak:
        out["perf/mfu"] = out["perf/tflops"] / peak
    return out


def console_line(step: int, max_steps: int, rec: dict[str, Any]) -> str:
    """One console line: ``step 100/600000 | loss 3.2101 | lr 6.00e-04 | gnorm 0.512 | 41.2k tok/s |
    12.30 TFLOP/s | MFU 4.1% | mem 3.20 GiB`` (fields absent from ``rec`` are left out)."""
    parts = [f"step {step}/{max_steps}"]
    if "train/loss" in rec:
        parts.append(f"loss {rec['train/loss']:.4f}")
    if "train/lr" in rec:
        parts.append(f"lr {rec['train/lr']:.2e}")
    if "train/grad_norm" in rec:
        parts.append(f"gnorm {rec['train/grad_norm']:.3f}")
    if "train/loss_scale" in rec:
        parts.append(f"scale {rec['train/loss_scale']:.0f}")
    if "perf/tokens_per_s" in rec:
        tps = rec["perf/tokens_per_s"]
        parts.append(f"{tps / 1e3:.1f}k tok/s" if tps >= 1e3 else f"{tps:.0f} tok/s")
    if "perf/tflops" in rec:
        parts.append(f"{rec['perf/tflops']:.2f} TFLOP/s")
    if "perf/mfu" in rec:
        parts.append(f"MFU {100 * rec['perf/mfu']:.1f}%")
    if "mem/peak_gib" in rec:
        parts.append(f"mem {rec['mem/peak_gib']:.2f} GiB")
    if rec.get("train/skipped_steps"):
        parts.append(f"skipped {rec['train/skipped_steps']}")
    return " | ".join(parts)


class Window:
    """The training steps since the last log record: their time and their finite losses."""

    def __init__(self) -> None:
        self.loss, self.n, self.steps, self.time = 0.0, 0, 0, 0.0

    def add(self, seconds: float, loss: float) -> None:
        self.steps += 1
        self.time += seconds
        if math.isfinite(loss):
            self.loss += loss
            self.n += 1

    def record(self, tokens_per_step: int, flops_per_token: int, n_devices: int, peak: float | None,
               device: torch.device) -> dict[str, float]:
        """Mean loss, throughput, step time and memory of the window; then starts a new one."""
        rec: dict[str, float] = {"train/loss": self.loss / self.n} if self.n else {}
        rec.update(throughput(self.steps * tokens_per_step, self.time, flops_per_token, n_devices, peak))
        rec["perf/step_ms"] = 1e3 * self.time / self.steps
        rec.update(memory_gib(device))
        self.__init__()
        return rec


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)            # "nan" / "inf": strict JSON has no NaN
    return v


def _step_of(line: str, default: int) -> int:
    """The step of a metrics.jsonl line; a torn line (a kill mid-write) counts as ``default``."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return default


class MetricsLogger:
    """TensorBoard + metrics.jsonl + console, on global rank 0 (a no-op elsewhere).

    On resume from step ``start_step`` the records of later steps (written after that
    checkpoint by the interrupted run) are dropped from metrics.jsonl, and TensorBoard is
    told to purge them (``purge_step``), so both read as one uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, start_step: int = 0) -> None:
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line, start_step + 1) <= start_step]
            from cratelm.train.durable import write_atomic   # a crash here keeps the old file whole

            write_atomic(path, "".join(line + "\n" for line in kept).encode())
        self.jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # drop events past the resume point (a fresh start drops a dead run's curves too)
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """One record: every value goes to TensorBoard under its key and to metrics.jsonl."""
        if not self.enabled:
            return
        values = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                  for k, v in values.items()}
        for k, v in values.items():
            if isinstance(v, float):
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(),
                                     **{k: _jsonable(v) for k, v in values.items()}}) + "\n")

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def flush(self) -> None:
        if self.enabled:
            self.tb.flush()
            self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()
            self.enabled = False

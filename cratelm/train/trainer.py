"""``cratelm train``: the loop's cadence (step, log, evaluate, diagnose, checkpoint, stop). One
optimizer step is `Engine.train_step`; the checks before the process group: train/preflight.py.
Launch (each prints the batch plan, then one line per log interval)::

    cratelm train --config configs/model/X.yaml configs/train/tiny-cpu.yaml train.max_steps=100
    torchrun --nproc_per_node 8 -m cratelm train --config ... --resume auto
    deepspeed --num_gpus 8 --module cratelm.train.trainer --config ... --resume auto

A plain process without a launcher becomes a 1-rank group. The device is CUDA when
available, else CPU (gloo). From Python: ``cratelm.train.train(cfg, resume="auto")``.

Exit codes (also written to RUN_DIR/status.json, for launchers that swallow them):
  0   finished train.max_steps (final checkpoint written)
  2   config error (raised before any process group starts)
  3   non-finite loss with train.nan_policy=stop: nothing saved, ``latest`` keeps naming
      the last good checkpoint
  75  stopped by SIGTERM / SIGINT after writing a checkpoint (EX_TEMPFAIL): relaunch with
      ``--resume auto``. A second SIGINT aborts at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cratelm.config import BatchPlan, JobConfig
from cratelm.data.dataset import BatchSampler
from cratelm.data.loading import Data
from cratelm.dist import broadcast_object
from cratelm.model.accounting import flops_per_token
from cratelm.model.diagnostics import layer_diagnostics
from cratelm.train import checkpoint as ckpt
from cratelm.train import init_from
from cratelm.train import validation
from cratelm.train.ds_config import device_type
from cratelm.train.engine import Engine, build_engine, full_model, init_distributed, quiet_deepspeed
from cratelm.train.metrics import MetricsLogger, Window, console_line, peak_tflops
from cratelm.train.preflight import prepare
from cratelm.train.run_files import write_run_files, write_status
from cratelm.train.schedule import lr_at, set_lr

EXIT_OK, EXIT_CONFIG, EXIT_NAN, EXIT_PREEMPTED = 0, 2, 3, 75
MAX_CONSECUTIVE_SKIPS = 100
"""nan_policy=skip gives up (exit 3) after this many skipped steps in a row: the run has diverged."""
NAN_ENV = "CRATELM_FAULT_NAN_STEPS"
"""Test hook: comma-separated steps (1-based) whose loss rank 0 turns into NaN."""


# ----------------------------------------------------------------------------- the trainer

class Trainer:
    """One training job in an initialised process group. ``fit()`` returns the exit code;
    the engine stays available afterwards (``self.engine``) for inspection."""

    def __init__(self, cfg: JobConfig, plan: BatchPlan, config: dict[str, Any], data: Data,
                 resume: Path | None, dev_type: str | None = None) -> None:
        import torch.distributed as dist

        self.cfg, self.plan, self.ds_config, self.data = cfg, plan, config, data
        self.dev_type = dev_type or device_type()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.train.run_dir)
        found = broadcast_object(str(resume) if resume else None, src=0)   # every rank resumes from rank 0's
        self.resume = Path(found) if found else None
        self.stop_signal: int | None = None
        self.step = 0
        self.skipped = 0
        self.tokens_per_step = plan.global_batch * cfg.model.context
        self.flops_per_token = flops_per_token(cfg.model, cfg.model.context)
        self.nan_steps = {int(s) for s in os.environ.get(NAN_ENV, "").split(",") if s.strip()}

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed + 1000 * self.rank)           # dropout streams (init uses its own)
        self.engine: Engine = build_engine(cfg, self.plan, self.ds_config, self.dev_type)
        e = self.engine
        self.device = e.device
        self.sampler = BatchSampler(self.data.train, self.plan.micro_batch, self.plan.grad_accum,
                                    e.dp_rank, e.dp_size, seed=cfg.data.seed)
        if self.resume is not None:
            meta, rank_state = ckpt.load(e, self.resume, self.layout())
            self.step = int(meta["step"])
            self.skipped = int(meta.get("skipped_steps", 0))
            self.sampler.load_state_dict(meta["data"])
            if meta.get("global_batch") != self.plan.global_batch and self.rank == 0:
                print(f"cratelm: note: {self.resume} was trained with global batch {meta.get('global_batch')}; "
                      f"continuing with {self.plan.global_batch}", flush=True)
            if rank_state is not None:
                ckpt.set_rng_state(rank_state["rng"])
        if e.pipeline and e.needs_data:
            e.ds.set_dataiterator(iter(self.sampler))
        window_src = self.data.val if self.data.val is not None else self.data.train
        rows = min(self.plan.micro_batch, 8)
        self.diag_idx = BatchSampler(window_src, rows, 1, 0, 1, seed=cfg.data.seed).next_micro_batch()[0]
        self.peak = peak_tflops(t.peak_tflops, self.device)
        self.metrics = MetricsLogger(self.run_dir, self.rank == 0, start_step=self.step)
        if self.rank == 0:
            write_run_files(self.run_dir, cfg, self.ds_config, self.data.tokenizer)
            self._status("running")

    def tokens(self) -> int:
        """Tokens trained on: consumed samples x context (right across a global-batch change)."""
        return self.sampler.consumed_samples * self.cfg.model.context

    def layout(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"world_size": self.world, "pipeline_stages": t.pipeline_stages,
                "zero_stage": self.ds_config.get("zero_optimization", {}).get("stage", t.zero_stage)}

    def _status(self, status: str, code: int | None = None, checkpoint: Path | None = None,
                error: str | None = None) -> None:
        if self.rank == 0:
            write_status(self.run_dir, status, self.step, code, checkpoint, error)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt              # a second Ctrl-C: abort now, no checkpoint
        self.stop_signal = signum
        if self.rank == 0:
            print(f"cratelm: {signal.Signals(signum).name} received: checkpointing at the end of this step",
                  flush=True)

    def evaluate(self) -> dict[str, float]:
        """Mean val loss over train.eval_windows windows, for any batch split (cratelm.train.validation)."""
        e, n = self.engine, min(self.cfg.train.eval_windows, len(self.data.val))
        mine = validation.share(self.data.val, n, self.cfg.data.seed, e.dp_rank, e.dp_size)
        mean = e.eval_loss(self.data.val, mine, self.plan.micro_batch, n)
        return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0))}

    def diagnostics(self) -> list[dict[str, float]] | None:
        """layer_diagnostics on the fixed batch, on rank 0 (a gather first for ZeRO-3 / pipeline)."""
        if self.cfg.model.arch == "gpt2":
            return None
        model = full_model(self.engine, self.cfg.model)
        return layer_diagnostics(model, self.diag_idx.to(self.device)) if model is not None else None

    def save(self) -> Path:
        t = self.cfg.train
        meta = {
            "step": self.step, "consumed_samples": self.sampler.consumed_samples,
            "tokens": self.tokens(), **self.layout(), "dp_size": self.engine.dp_size,
            "precision": t.precision, "global_batch": self.plan.global_batch,
            "lr": lr_at(max(0, self.step - 1), self.cfg.optim, t.max_steps), "skipped_steps": self.skipped,
            "model": dataclasses.asdict(self.cfg.model), "config": self.cfg.to_dict(),
            "data": self.sampler.state_dict(),
            "tokenizer": str((self.run_dir / self.data.tokenizer.name).resolve()) if self.data.tokenizer else None,
            "tokenizer_sha256": self.data.tokenizer_sha256,
            "time": datetime.datetime.now().isoformat(),
        }
        t0 = time.perf_counter()
        path = ckpt.save(self.engine, self.run_dir, self.step, meta, {"rng": ckpt.rng_state()}, t.keep_last)
        self.metrics.print(f"cratelm: saved {path} ({time.perf_counter() - t0:.1f} s)")
        return path

    def fit(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        code = None
        try:
            self._setup()
            code = self._loop()
            return code
        except BaseException as e:       # an exception, or a second Ctrl-C: say so in status.json
            if self.rank == 0 and self.run_dir.is_dir():
                self._status("error", None, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            # stopped by a signal (here or on another rank): the same signal arriving late (this
            # node's copy of it) must not kill the rank while it leaves with its exit status 75
            stopped = self.stop_signal is not None or code == EXIT_PREEMPTED
            for s, h in old.items():
                signal.signal(s, signal.SIG_IGN if stopped and s == signal.SIGTERM else h)
            if hasattr(self, "metrics"):
                self.metrics.close()

    def _loop(self) -> int:
        cfg, t, e = self.cfg, self.cfg.train, self.engine
        if self.step >= t.max_steps:
            self.metrics.print(f"cratelm: checkpoint is at step {self.step} >= train.max_steps={t.max_steps}; "
                               "nothing to do")
            self._status("finished", EXIT_OK)
            return EXIT_OK
        self.metrics.print(f"cratelm: {'resuming from ' + str(self.resume) if self.resume else 'starting'} at step "
                           f"{self.step}; {self.world} ranks, dp {e.dp_size}, stages {e.num_stages}, "
                           f"ZeRO {self.layout()['zero_stage']}, {t.precision}, device {self.device}"
                           f"{', torch.compile' if getattr(e.ds, 'is_compiled', False) else ''}"
                           f"{', activation checkpointing' if t.activation_checkpointing else ''}")
        window = Window()
        consecutive_skips = 0
        saved_at = -1
        grad_norm = None
        while self.step < t.max_steps:
            lr = lr_at(self.step, cfg.optim, t.max_steps)
            set_lr(e.optimizer, lr)
            t0 = time.perf_counter()
            r = e.train_step(self.sampler, stop=lambda: self.stop_signal is not None,
                             skip_nonfinite=t.nan_policy == "skip",
                             poison=self.step + 1 in self.nan_steps and self.rank == 0)
            window.add(time.perf_counter() - t0, r.loss)
            self.step += 1
            if r.skipped:
                self.skipped += 1
                consecutive_skips += 1
            else:
                consecutive_skips = 0
                grad_norm = r.grad_norm
            if r.nonfinite and (t.nan_policy == "stop" or consecutive_skips >= MAX_CONSECUTIVE_SKIPS):
                last = ckpt.latest_checkpoint(self.run_dir / ckpt.CKPT_DIR)
                why = ("train.nan_policy=stop" if t.nan_policy == "stop"
                       else f"{consecutive_skips} steps skipped in a row")
                self.metrics.print(f"cratelm: step {self.step}: non-finite loss; stopping ({why}). Nothing was "
                                   f"saved; the last good checkpoint is {last or 'none'}.")
                self._status("nan", EXIT_NAN, last)
                return EXIT_NAN
            if self.step % t.log_interval == 0 or self.step == t.max_steps or r.stop:
                rec: dict[str, Any] = {"train/lr": lr, "train/skipped_steps": self.skipped,
                                       "train/tokens": self.tokens()}
                for key, value in (("train/grad_norm", grad_norm), ("train/loss_scale", e.loss_scale())):
                    if value is not None:
                        rec[key] = value
                rec.update(window.record(self.tokens_per_step, self.flops_per_token, self.world, self.peak,
                                         self.device))
                self.metrics.log(self.step, rec)
                self.metrics.print(console_line(self.step, t.max_steps, rec))
            last_step = self.step == t.max_steps
            if self.data.val is not None and ((t.eval_interval and self.step % t.eval_interval == 0) or last_step):
                val = self.evaluate()
                self.metrics.log(self.step, val)
                self.metrics.print(f"step {self.step}/{t.max_steps} | val loss {val['val/loss']:.4f} | "
                                   f"val ppl {val['val/ppl']:.2f}")
            if t.diag_interval and (self.step % t.diag_interval == 0 or last_step) and (rows := self.diagnostics()):
                self.metrics.log(self.step, {f"diag/layer_{i:02d}/{k}": v for i, row in enumerate(rows)
                                             for k, v in row.items()})
            if r.stop or last_step or (t.ckpt_interval and self.step % t.ckpt_interval == 0):
                path = self.save()
                saved_at = self.step
                if r.stop and not last_step:
                    self.metrics.print(f"cratelm: stopped by a signal at step {self.step}; resume with --resume auto")
                    self._status("preempted", EXIT_PREEMPTED, path)
                    return EXIT_PREEMPTED
            self.metrics.flush()
        if saved_at != self.step:
            self.save()
        self._status("finished", EXIT_OK)
        return EXIT_OK


def train(cfg: JobConfig, resume: str | None = None, verbose: bool = False, discard_newer: bool = False) -> Trainer:
    """Check, start the process group if needed, train; returns the Trainer (``.exit_code``).
    ``resume``: None (a fresh start), "auto" or a checkpoint / run directory; ``discard_newer``:
    move checkpoints newer than it aside. Raises ConfigError before any process group starts."""
    plan, config, data, point = prepare(cfg, resume, discard_newer=discard_newer)
    cfg = init_from.resolve(cfg, data, point)         # train.init_from: checked and loaded (a fresh start only)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"cratelm: batch plan: global {plan.global_batch} = micro {plan.micro_batch} x accum "
              f"{plan.grad_accum} x data-parallel {plan.dp_size} (pipeline stages {cfg.train.pipeline_stages}); "
              f"{plan.global_batch * cfg.model.context} tokens/step", flush=True)
    init_distributed(device_type())
    quiet_deepspeed(verbose)
    # DeepSpeed 0.19 calls collectives torch has renamed: one warning per call, per step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    trainer = Trainer(cfg, plan, config, data, point)
    trainer.exit_code = trainer.fit()
    return trainer


def main(argv: list[str] | None = None) -> int:
    """``python -m cratelm.train.trainer`` (e.g. ``deepspeed --module cratelm.train.trainer``) =
    ``cratelm train``."""
    from cratelm.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

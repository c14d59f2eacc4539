"""``cratelm train``: the training loop.

Launch (each prints the batch plan, then one line per log interval)::

    cratelm train --config configs/model/X.yaml configs/train/tiny-cpu.yaml train.max_steps=100
    torchrun --nproc_per_node 8 -m cratelm train --config ... --resume auto
    deepspeed --num_gpus 8 --module cratelm.train.trainer --config ... --resume auto

A plain process without a launcher becomes a 1-rank group. The device is CUDA when
available, else CPU (gloo).

Per optimizer step: ``grad_accum`` micro-batches forward + backward, one small all-reduce
of (loss sum, non-finite count, stop flag) so that every rank takes the same decision,
then the DeepSpeed step (skipped when train.nan_policy=skip saw a non-finite loss).
The pipeline engine runs the micro-batches itself (``train_batch``).

Exit codes (also written to RUN_DIR/status.json, for launchers that swallow them):
  0   finished train.max_steps (final checkpoint written)
  2   config error (raised before any process group starts)
  3   non-finite loss with train.nan_policy=stop: nothing saved, ``latest`` keeps naming
      the last good checkpoint
  75  stopped by SIGTERM / SIGINT after writing a checkpoint (EX_TEMPFAIL): relaunch with
      ``--resume auto``. A second SIGINT aborts at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from cratelm.commands import add_config_arguments, config_from_args
from cratelm.config import BatchPlan, ConfigError, JobConfig, dumps
from cratelm.dist import close_process_group
from cratelm.train import checkpoint as ckpt
from cratelm.train.engine import (Engine, build_engine, check_job, device_type, dist_env, gather_state_dict,
                                  init_distributed, ds_config, quiet_deepspeed)
from cratelm.train.metrics import MetricsLogger, console_line, memory_gib, peak_tflops, throughput
from cratelm.train.schedule import lr_at, set_lr

EXIT_OK, EXIT_CONFIG, EXIT_NAN, EXIT_PREEMPTED = 0, 2, 3, 75
MAX_CONSECUTIVE_SKIPS = 100
"""nan_policy=skip gives up (exit 3) after this many skipped steps in a row: the run has diverged."""
NAN_ENV = "CRATELM_FAULT_NAN_STEPS"
"""Test hook: comma-separated steps (1-based) whose loss rank 0 turns into NaN."""
IMPL_FIELDS = ("attn_backend", "ista_impl", "loss_impl")   # kernels may change on resume; weights may not


# ----------------------------------------------------------------------------- data

@dataclasses.dataclass
class Data:
    train: Any                 # TokenWindows
    val: Any | None            # TokenWindows
    tokenizer: Path | None
    tokenizer_sha256: str | None


def _split_path(path: str, split: str) -> str:
    p = Path(path)
    return str(p / f"{split}.bin") if p.is_dir() else path


def open_data(cfg: JobConfig) -> Data:
    """Open the token shards (memory maps: cheap) and check them against the model config."""
    from cratelm.data import TokenWindows

    d, m = cfg.data, cfg.model
    if not d.train:
        raise ConfigError("data.train is empty: give one or more prepared corpora (dir or dir/train.bin)")
    try:
        train = TokenWindows([_split_path(p, "train") for p in d.train], m.context, d.weights or None, seed=d.seed)
        val = TokenWindows([_split_path(d.val, "val")], m.context, seed=d.seed) if d.val else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    for c in train.corpora + (val.corpora if val else []):
        vocab = int(c.meta.get("vocab_size", 0))
        if vocab > m.vocab_size:
            raise ConfigError(f"data: {c.bin_path} has vocab_size={vocab} but model.vocab_size={m.vocab_size}")
    first = train.corpora[0]
    tok = first.meta.get("tokenizer")
    tok_path = (first.dir / tok) if tok else None
    return Data(train, val, tok_path if tok_path and tok_path.is_file() else None, first.meta.get("tokenizer_sha256"))


# ----------------------------------------------------------------------------- resume

def resolve_resume(resume: str | None, run_dir: str) -> Path | None:
    """``auto``: the newest complete checkpoint of run_dir, or None (fresh start);
    a path: that checkpoint / run directory (must hold a complete checkpoint); None: fresh,
    refused if run_dir already holds checkpoints (pass --resume auto to continue)."""
    root = Path(run_dir) / ckpt.CKPT_DIR
    if resume is None or resume == "none":
        found = ckpt.latest_checkpoint(root)
        if found is not None:
            raise ConfigError(f"train.run_dir={run_dir} already holds checkpoints (newest: {found.name}); "
                              "pass --resume auto to continue it, or choose another train.run_dir")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(root)
    try:
        return ckpt.resolve(resume)
    except FileNotFoundError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None


def _check_resumable(meta: dict, cfg: JobConfig, where: Path) -> None:
    old, new = dict(meta["model"]), dataclasses.asdict(cfg.model)
    diff = {k: (old.get(k), new.get(k)) for k in new if k not in IMPL_FIELDS and old.get(k) != new.get(k)}
    if diff:
        raise ConfigError(f"{where} holds a different model: " +
                          ", ".join(f"model.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diff.items()))


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
        # every rank resumes from what rank 0 found
        obj = [str(resume) if resume else None]
        dist.broadcast_object_list(obj, src=0)
        self.resume = Path(obj[0]) if obj[0] else None
        self.stop_signal: int | None = None
        self.step = 0
        self.skipped = 0
        self.tokens_per_step = plan.global_batch * cfg.model.context
        from cratelm.model.accounting import flops_per_token

        self.flops_per_token = flops_per_token(cfg.model, cfg.model.context)
        self.nan_steps = {int(s) for s in os.environ.get(NAN_ENV, "").split(",") if s.strip()}

    # ---- setup

    def _setup(self) -> None:
        from cratelm.data import BatchSampler

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
            self._write_run_files()

    def layout(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"world_size": self.world, "pipeline_stages": t.pipeline_stages,
                "zero_stage": self.ds_config.get("zero_optimization", {}).get("stage", t.zero_stage)}

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dumps(self.cfg))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        if self.data.tokenizer is not None:
            dst = self.run_dir / "tokenizer.model"
            if not dst.exists() or dst.read_bytes() != self.data.tokenizer.read_bytes():
                shutil.copyfile(self.data.tokenizer, dst)
        self._status("running")

    def _status(self, status: str, code: int | None = None, checkpoint: Path | None = None,
                error: str | None = None) -> None:
        if self.rank != 0:
            return
        latest = checkpoint or ckpt.latest_checkpoint(self.run_dir / ckpt.CKPT_DIR)
        body = {"status": status, "step": self.step, "exit_code": code,
                "checkpoint": str(latest) if latest else None, "time": datetime.datetime.now().isoformat()}
        if error:
            body["error"] = error
        tmp = self.run_dir / ".status.json.tmp"
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, self.run_dir / "status.json")

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt              # a second Ctrl-C: abort now, no checkpoint
        self.stop_signal = signum
        if self.rank == 0:
            print(f"cratelm: {signal.Signals(signum).name} received: checkpointing at the end of this step",
                  flush=True)

    # ---- one optimizer step

    def _train_step(self) -> tuple[float, bool, bool]:
        """One optimizer step; returns (mean loss over the global batch, non-finite?, stop?)."""
        import torch.distributed as dist

        e, ds = self.engine, self.engine.ds
        # the stop flag is read at the all-reduce, so a signal during this step stops after it
        if e.pipeline:
            loss = ds.train_batch()
            loss_f = float(loss.float().item())
            flags = torch.tensor([float(not math.isfinite(loss_f)), float(self.stop_signal is not None)],
                                 device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            return loss_f, bool(flags[0] > 0), bool(flags[1] > 0)
        accum = self.plan.grad_accum
        total = torch.zeros((), device=self.device)
        bad = torch.zeros((), device=self.device)
        result = (math.nan, False, False)
        for a in range(accum):
            x, y = self.sampler.next_micro_batch()
            loss = ds(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            if self.step + 1 in self.nan_steps and self.rank == 0 and a == 0:
                loss = loss * float("nan")
            ds.backward(loss)
            detached = loss.detach().float()
            total += torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0)
            bad += (~torch.isfinite(detached)).float()
            if a == accum - 1:
                stop = torch.tensor(float(self.stop_signal is not None), device=self.device)
                stats = torch.stack([total, bad, stop])
                dist.all_reduce(stats)
                n_bad = float(stats[1])
                mean = float(stats[0]) / (accum * self.world) if n_bad == 0 else math.nan
                result = (mean, n_bad > 0, float(stats[2]) > 0)
                e.optimizer.skip_next = self.cfg.train.nan_policy == "skip" and n_bad > 0
            ds.step()
        e.optimizer.skip_next = False
        return result

    # ---- validation and diagnostics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean val loss over ceil(eval_batches / dp) micro-batches per data-parallel rank."""
        import torch.distributed as dist
        from cratelm.data import BatchSampler

        e = self.engine
        k = math.ceil(self.cfg.train.eval_batches / e.dp_size)
        vs = BatchSampler(self.data.val, self.plan.micro_batch, 1, e.dp_rank, e.dp_size, seed=self.cfg.data.seed)
        if e.pipeline:
            loss = e.ds.eval_batch(iter(vs), num_micro_batches=k)
            total = torch.tensor([float(loss.float().item())], device=self.device)
            dist.all_reduce(total)                      # same value on every stage of a dp group
            mean = float(total) / self.world
        else:
            e.ds.eval()
            total = torch.zeros(1, device=self.device)
            for _ in range(k):
                x, y = vs.next_micro_batch()
                total += e.ds(x.to(self.device), y.to(self.device)).float()
            e.ds.train()
            dist.all_reduce(total)
            mean = float(total) / (k * e.dp_size)
        return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0))}

    def diagnostics(self) -> list[dict[str, float]] | None:
        """layer_diagnostics on the fixed batch, on rank 0 (a gather first for ZeRO-3 / pipeline)."""
        from cratelm.model.crate import CrateLM
        from cratelm.model.diagnostics import layer_diagnostics

        if self.cfg.model.arch == "gpt2":
            return None
        e = self.engine
        if not e.pipeline and e.ds.zero_optimization_stage() < 3:
            model = e.ds.module if self.rank == 0 else None
        else:
            state = gather_state_dict(e)
            model = None
            if self.rank == 0:
                model = CrateLM(self.cfg.model, seed=None)
                model.load_state_dict({k.removeprefix("_orig_mod."): v.float() for k, v in state.items()})
                model.to(self.device)
        if self.rank != 0:
            return None
        return layer_diagnostics(model, self.diag_idx.to(self.device))

    # ---- checkpoints

    def save(self) -> Path:
        t = self.cfg.train
        meta = {
            "step": self.step, "consumed_samples": self.sampler.consumed_samples,
            "tokens": self.step * self.tokens_per_step, **self.layout(), "dp_size": self.engine.dp_size,
            "precision": t.precision, "global_batch": self.plan.global_batch,
            "lr": lr_at(max(0, self.step - 1), self.cfg.optim, t.max_steps), "skipped_steps": self.skipped,
            "model": dataclasses.asdict(self.cfg.model), "config": self.cfg.to_dict(),
            "data": self.sampler.state_dict(),
            "tokenizer": str((self.run_dir / "tokenizer.model").resolve()) if self.data.tokenizer else None,
            "tokenizer_sha256": self.data.tokenizer_sha256,
            "time": datetime.datetime.now().isoformat(),
        }
        t0 = time.perf_counter()
        path = ckpt.save(self.engine, self.run_dir, self.step, meta, {"rng": ckpt.rng_state()}, t.keep_last)
        self.metrics.print(f"cratelm: saved {path} ({time.perf_counter() - t0:.1f} s)")
        return path

    # ---- the loop

    def fit(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._setup()
            return self._loop()
        except BaseException as e:       # an exception, or a second Ctrl-C: say so in status.json
            if self.rank == 0 and self.run_dir.is_dir():
                self._status("error", None, error=f"{type(e).__name__}: {e}")
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
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
        window = {"loss": 0.0, "n": 0, "steps": 0, "time": 0.0}
        consecutive_skips = 0
        saved_at = -1
        grad_norm = None
        while self.step < t.max_steps:
            lr = lr_at(self.step, cfg.optim, t.max_steps)
            set_lr(e.optimizer, lr)
            skipped_before = e.skipped_steps()
            t0 = time.perf_counter()
            loss, nonfinite, stop = self._train_step()
            window["time"] += time.perf_counter() - t0
            self.step += 1
            window["steps"] += 1
            skipped_now = e.optimizer.skipped or e.skipped_steps() > skipped_before
            e.optimizer.skipped = False
            if skipped_now:
                self.skipped += 1
                consecutive_skips += 1
            else:
                consecutive_skips = 0
                gn = e.ds.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None and math.isfinite(float(gn)) else None
            if nonfinite and (t.nan_policy == "stop" or consecutive_skips >= MAX_CONSECUTIVE_SKIPS):
                last = ckpt.latest_checkpoint(self.run_dir / ckpt.CKPT_DIR)
                why = ("train.nan_policy=stop" if t.nan_policy == "stop"
                       else f"{consecutive_skips} steps skipped in a row")
                self.metrics.print(f"cratelm: step {self.step}: non-finite loss; stopping ({why}). Nothing was "
                                   f"saved; the last good checkpoint is {last or 'none'}.")
                self._status("nan", EXIT_NAN, last)
                return EXIT_NAN
            if math.isfinite(loss):
                window["loss"] += loss
                window["n"] += 1
            if self.step % t.log_interval == 0 or self.step == t.max_steps or stop:
                rec: dict[str, Any] = {"train/lr": lr, "train/skipped_steps": self.skipped,
                                       "train/tokens": self.step * self.tokens_per_step}
                if window["n"]:
                    rec["train/loss"] = window["loss"] / window["n"]
                if grad_norm is not None:
                    rec["train/grad_norm"] = grad_norm
                if e.ds.fp16_enabled():
                    scale = getattr(e.ds.optimizer, "cur_scale", None) or getattr(e.ds.optimizer, "loss_scale", None)
                    if scale is not None:
                        rec["train/loss_scale"] = float(scale)
                rec.update(throughput(window["steps"] * self.tokens_per_step, window["time"],
                                      self.flops_per_token, self.world, self.peak))
                rec["perf/step_ms"] = 1e3 * window["time"] / window["steps"]
                rec.update(memory_gib(self.device))
                self.metrics.log(self.step, rec)
                self.metrics.print(console_line(self.step, t.max_steps, rec))
                window = {"loss": 0.0, "n": 0, "steps": 0, "time": 0.0}
            last_step = self.step == t.max_steps
            if self.data.val is not None and ((t.eval_interval and self.step % t.eval_interval == 0) or last_step):
                val = self.evaluate()
                self.metrics.log(self.step, val)
                self.metrics.print(f"step {self.step}/{t.max_steps} | val loss {val['val/loss']:.4f} | "
                                   f"val ppl {val['val/ppl']:.2f}")
            if t.diag_interval and (self.step % t.diag_interval == 0 or last_step):
                rows = self.diagnostics()
                if rows:
                    self.metrics.log(self.step, {f"diag/layer_{i:02d}/{k}": v
                                                 for i, row in enumerate(rows) for k, v in row.items()})
            if stop or last_step or (t.ckpt_interval and self.step % t.ckpt_interval == 0):
                path = self.save()
                saved_at = self.step
                if stop and not last_step:
                    self.metrics.print(f"cratelm: stopped by a signal at step {self.step}; resume with --resume auto")
                    self._status("preempted", EXIT_PREEMPTED, path)
                    return EXIT_PREEMPTED
            self.metrics.flush()
        if saved_at != self.step:
            self.save()
        self._status("finished", EXIT_OK)
        return EXIT_OK


# ----------------------------------------------------------------------------- entry points

def prepare(cfg: JobConfig, resume: str | None = None, world_size: int | None = None,
            local_rank: int | None = None) -> tuple[BatchPlan, dict, Data, Path | None]:
    """Everything before the process group: checks, batch plan, DeepSpeed config, data, resume
    point. Raises ConfigError with the numbers."""
    env = dist_env(local_rank)
    dev = device_type()
    plan = check_job(cfg, world_size or env.world_size, dev)
    config = ds_config(cfg, plan, dev)
    data = open_data(cfg)
    point = resolve_resume(resume, cfg.train.run_dir)
    if point is not None:
        _check_resumable(ckpt.read_meta(point), cfg, point)
    return plan, config, data, point


def train(cfg: JobConfig, resume: str | None = None, verbose: bool = False) -> Trainer:
    """Check, start the process group if needed, train; returns the Trainer (``.exit_code``)."""
    plan, config, data, point = prepare(cfg, resume)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: the newest complete checkpoint of train.run_dir, or a fresh start if none; "
                             "PATH: a run directory or checkpoint directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment too)")
    parser.add_argument("--verbose", action="store_true", help="DeepSpeed's INFO logs")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if args.local_rank is not None:
            dist_env(args.local_rank)
        trainer = train(cfg, args.resume, args.verbose)
        close_process_group()
    except ConfigError as e:
        print(f"cratelm train: config error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return trainer.exit_code


def main(argv: list[str] | None = None) -> int:
    """``python -m cratelm.train.trainer`` (e.g. ``deepspeed --module cratelm.train.trainer``)."""
    parser = argparse.ArgumentParser(prog="cratelm train", description="train a model through DeepSpeed")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

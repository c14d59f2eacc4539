"""The DeepSpeed engine: process-group setup, the engine (plain or pipeline), and one
optimizer step behind `Engine.train_step` (the micro-step machinery the trainer's loop
does not need to see).

Per optimizer step: ``grad_accum`` micro-batches forward + backward, one small all-reduce
of (loss sum, non-finite count, stop flag) so that every rank takes the same decision,
then the DeepSpeed step (skipped when train.nan_policy=skip saw a non-finite loss). The
pipeline engine runs the micro-batches itself (``train_batch``).

Checks and the generated DeepSpeed config: `cratelm.train.ds_config`; the optimizer:
`cratelm.train.optimizer`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from cratelm.config import BatchPlan, ConfigError, JobConfig, ModelConfig
from cratelm.dist import all_reduce, free_port, gather_object
from cratelm.train import init_from
from cratelm.train.ds_config import device_type
from cratelm.train.optimizer import make_optimizer, param_groups


# ----------------------------------------------------------------------------- the launcher's environment

@dataclass(frozen=True)
class DistEnv:
    """Rank layout as the launcher set it (or a single process when there is none)."""

    rank: int
    world_size: int
    local_rank: int
    launched: bool
    """True when a launcher (torchrun, deepspeed, SLURM + torchrun) set RANK / WORLD_SIZE."""


MPI_ENV = (("RANK", "OMPI_COMM_WORLD_RANK"), ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"),
           ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"), ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"))


def dist_env(local_rank: int | None = None) -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK; ``local_rank`` is the deepspeed launcher's ``--local_rank``.
    Under mpirun (``deepspeed --launcher openmpi``) the ranks only have OMPI_COMM_WORLD_*:
    they are copied over, and MASTER_ADDR / MASTER_PORT must come from the launcher."""
    for ours, mpi in MPI_ENV:
        if ours not in os.environ and mpi in os.environ:
            os.environ[ours] = os.environ[mpi]
    if "OMPI_COMM_WORLD_SIZE" in os.environ and "MASTER_ADDR" not in os.environ:
        raise ConfigError("started by mpirun without MASTER_ADDR: DeepSpeed's openmpi runner does not pass it; "
                          "launch through launch/deepspeed_multinode.sh (it adds -x MASTER_ADDR=... -x MASTER_PORT=...) "
                          "or pass both with -x")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if local_rank is not None and local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    return DistEnv(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)), launched=launched)


# ----------------------------------------------------------------------------- process group

def init_distributed(dev_type: str | None = None) -> DistEnv:
    """Start the process group (gloo on CPU, nccl on CUDA). A plain process without a
    launcher becomes a 1-rank group on 127.0.0.1 (DeepSpeed would otherwise try MPI)."""
    import deepspeed
    import torch.distributed as dist

    dev_type = dev_type or device_type()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
                          LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    env = dist_env()
    if dev_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # several ranks on one CPU host fight for the cores (~6x slower without this)
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun / deepspeed
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if dev_type == "cuda" else "gloo")
    return env


def quiet_deepspeed(verbose: bool = False) -> None:
    """DeepSpeed logs a page per engine at INFO; keep warnings only unless ``verbose``."""
    from deepspeed.utils import logger

    logger.setLevel(logging.INFO if verbose else logging.WARNING)


# ----------------------------------------------------------------------------- the engine

def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing without touching the model code: each block's forward is
    recomputed in backward (torch's non-reentrant checkpoint); state-dict names unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks.values():
        inner = block.forward

        def forward(x, cache=None, layer=0, _inner=inner):
            if cache is None and torch.is_grad_enabled():
                return checkpoint(_inner, x, use_reentrant=False)
            return _inner(x, cache, layer)

        block.forward = forward


@dataclass
class StepResult:
    """What one optimizer step tells the loop; every rank gets the same values."""

    loss: float
    """Mean loss over the global batch (NaN when any micro-batch of any rank was non-finite)."""
    nonfinite: bool
    """Some rank saw a non-finite loss."""
    stop: bool
    """Some rank asked to stop (a signal arrived before the step's all-reduce)."""
    skipped: bool
    """The update was dropped (train.nan_policy=skip, or DeepSpeed's own overflow check)."""
    grad_norm: float | None
    """The global gradient norm of an applied step, when DeepSpeed knows it and it is finite."""


@dataclass
class Engine:
    """A DeepSpeed engine and what the loop needs to know about its place in the job."""

    ds: Any
    """deepspeed's DeepSpeedEngine, or PipelineEngine when pipeline_stages > 1."""
    optimizer: Any
    """The client optimizer (skippable AdamW) whose groups carry the LR."""
    pipeline: bool
    dp_rank: int
    dp_size: int
    stage: int
    num_stages: int
    device: torch.device
    world_size: int

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def needs_data(self) -> bool:
        """The first stage reads the inputs and the last one the labels; middle stages read nothing."""
        return self.is_first_stage or self.is_last_stage

    def loss_scale(self) -> float | None:
        """fp16's current dynamic loss scale (None for bf16 / fp32)."""
        opt = self.ds.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return float(scale) if self.ds.fp16_enabled() and scale is not None else None

    def skipped_steps(self) -> int:
        """Steps DeepSpeed itself skipped (fp16 overflow, non-finite gradient norm)."""
        return int(getattr(self.ds, "skipped_steps", 0))

    def train_step(self, batches, stop: Callable[[], bool] = lambda: False, skip_nonfinite: bool = False,
                   poison: bool = False) -> StepResult:
        """One optimizer step over ``batches`` (a BatchSampler; the pipeline engine reads the
        iterator it was given instead). ``stop()``: does this rank want to stop after the step
        (asked at the all-reduce, so a signal during the step stops after it);
        ``skip_nonfinite``: drop the update when any rank's loss is non-finite; ``poison``:
        make the first micro-batch's loss NaN (a test hook)."""
        ds = self.ds
        skipped_before = self.skipped_steps()
        if self.pipeline:
            loss_f = float(ds.train_batch().float().item())
            flags = all_reduce(torch.tensor([float(not math.isfinite(loss_f)), float(stop())], device=self.device),
                               op="max")
            loss, bad, stop_all = loss_f, bool(flags[0] > 0), bool(flags[1] > 0)
        else:
            accum = ds.gradient_accumulation_steps()
            total = torch.zeros((), device=self.device)
            n_bad = torch.zeros((), device=self.device)
            for a in range(accum):
                x, y = batches.next_micro_batch()
                out = ds(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                if poison and a == 0:
                    out = out * float("nan")
                ds.backward(out)
                detached = out.detach().float()
                total += torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0)
                n_bad += (~torch.isfinite(detached)).float()
                if a == accum - 1:        # the decision is taken before the last ds.step() applies the update
                    stats = all_reduce(torch.stack([total, n_bad, torch.tensor(float(stop()), device=self.device)]))
                    bad, stop_all = float(stats[1]) > 0, float(stats[2]) > 0
                    loss = float(stats[0]) / (accum * self.dp_size) if not bad else math.nan
                    self.optimizer.skip_next = skip_nonfinite and bad
                ds.step()
            self.optimizer.skip_next = False
        skipped = self.optimizer.skipped or self.skipped_steps() > skipped_before
        self.optimizer.skipped = False
        grad_norm = None
        if not skipped:
            gn = ds.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None and math.isfinite(float(gn)) else None
        return StepResult(loss, bad, stop_all, skipped, grad_norm)

    @torch.no_grad()
    def eval_loss(self, windows, mine, micro_batch: int, n: int) -> float:
        """Mean loss over the ``n`` windows of the validation set, ``mine`` being this rank's
        share of them (cratelm.train.validation): float64 sums, each window weighted equally."""
        from cratelm.train import validation

        if self.pipeline:
            batches = validation.micro_batches(windows, mine, micro_batch)
            loss = self.ds.eval_batch(batches, num_micro_batches=len(mine) // micro_batch)
            total = torch.tensor([float(loss.double().item()) * len(mine)], dtype=torch.float64, device=self.device)
            return float(all_reduce(total)) / (n * self.num_stages)   # the same sum on every stage of a dp group
        self.ds.eval()
        calls = validation.forward_calls(n, micro_batch, self.dp_size)
        local = validation.loss_sum(self.ds, windows, mine, micro_batch, calls, self.device)
        self.ds.train()
        return float(all_reduce(torch.tensor([local], dtype=torch.float64, device=self.device))) / n


def build_engine(cfg: JobConfig, plan: BatchPlan, config: dict[str, Any], dev_type: str | None = None) -> Engine:
    """Build the model (or this rank's pipeline stages) and wrap it in a DeepSpeed engine."""
    import deepspeed
    import torch.distributed as dist

    dev_type = dev_type or device_type()
    t = cfg.train
    # skip policy: where neither cratelm's loss check (pipeline: the loss is not known
    # before the step) nor DeepSpeed's own norm check (ZeRO-0 fp32, no clipping) guards
    # the update, the optimizer checks the gradients itself
    check_grads = (t.nan_policy == "skip" and t.pipeline_stages > 1 and t.precision == "fp32"
                   and (t.zero_stage == 0 or cfg.optim.grad_clip == 0))
    if t.pipeline_stages > 1:
        from cratelm.train.pipeline import build_pipeline

        module = build_pipeline(cfg.model, seed=t.seed, stages=t.pipeline_stages, partition=t.pipeline_partition,
                                activation_checkpointing=t.activation_checkpointing)
    else:
        from cratelm.model.crate import CrateLM

        module = CrateLM(cfg.model, seed=t.seed)
        if t.activation_checkpointing:
            checkpoint_blocks(module)
    init_from.load_into(module, cfg)            # train.init_from's weights, before DeepSpeed copies or shards them
    optimizer = make_optimizer(param_groups(module.named_parameters(), cfg.optim.weight_decay), cfg, dev_type,
                               check_grads=check_grads)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization()):
        # fp32 ZeRO-0: DeepSpeed clips but drops the norm, and in a pipeline each stage clips
        # by its OWN norm (the sum runs over the tensor-parallel group only). Clip by the
        # global norm instead (every stage, the tied embedding counted once) and keep it.
        engine.clip_fp32_gradients = lambda eng=engine: setattr(eng, "_global_grad_norm", clip_global(eng))
    if t.compile:
        engine.compile()
    if t.pipeline_stages > 1:
        dp_rank, dp_size = engine.grid.data_parallel_id, engine.grid.data_parallel_size
        stage, stages = engine.stage_id, engine.num_stages
    else:
        dp_rank, dp_size, stage, stages = dist.get_rank(), dist.get_world_size(), 0, 1
    assert dp_size == plan.dp_size, (dp_size, plan)
    assert engine.train_batch_size() == plan.global_batch, (engine.train_batch_size(), plan)
    assert engine.gradient_accumulation_steps() == plan.grad_accum, (engine.gradient_accumulation_steps(), plan)
    return Engine(ds=engine, optimizer=optimizer, pipeline=t.pipeline_stages > 1, dp_rank=dp_rank,
                  dp_size=dp_size, stage=stage, num_stages=stages, device=torch.device(engine.device),
                  world_size=dist.get_world_size())


def clip_global(engine) -> float:
    """Clip the fp32 gradients of a ZeRO-0 engine to gradient_clipping by their global 2-norm
    (summed over the pipeline stages; a pipeline-replicated tied copy counted once); returns
    the norm before clipping. Gradients are already averaged over data-parallel ranks."""
    params = [p for p in engine.module.parameters()
              if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
    device = params[0].grad.device if params else torch.device(engine.device)
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        sq += p.grad.detach().float().pow(2).sum()
    if hasattr(engine, "grid") and engine.num_stages > 1:
        all_reduce(sq, group=engine.grid.get_pipe_parallel_group())
    norm = float(sq.sqrt())
    coef = engine.gradient_clipping() / (norm + 1e-6)
    if coef < 1.0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    return norm


def gather_state_dict(engine: Engine) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict under CrateLM names, on global rank 0 (None elsewhere).
    A collective for ZeRO-3 (parameters are gathered) and the pipeline (stages send theirs)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if engine.pipeline:
        from cratelm.train.pipeline import local_crate_state

        mine = {k: v.detach().cpu() for k, v in local_crate_state(engine.ds.module).items()} \
            if engine.dp_rank == 0 else {}
        parts = gather_object(mine, dst=0)
        if parts is None:
            return None
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            out.update(part)
        return out
    if engine.ds.zero_optimization_stage() == 3:
        state = engine.ds._zero3_consolidated_16bit_state_dict()   # a collective; full dict on rank 0
        return dict(state) if rank == 0 else None
    return dict(engine.ds.module.state_dict()) if rank == 0 else None


def full_model(engine: Engine, cfg: ModelConfig) -> nn.Module | None:
    """The whole model on global rank 0 (None elsewhere): the engine's own module, or for
    ZeRO-3 and the pipeline a CrateLM loaded from the gathered state (a collective)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if not engine.pipeline and engine.ds.zero_optimization_stage() < 3:
        return engine.ds.module if rank == 0 else None
    state = gather_state_dict(engine)
    if rank != 0:
        return None
    from cratelm.model.crate import CrateLM

    model = CrateLM(cfg, seed=None)
    model.load_state_dict({k.removeprefix("_orig_mod."): v.float() for k, v in state.items()})
    return model.to(engine.device)

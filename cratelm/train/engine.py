"""DeepSpeed wiring: job checks, the generated DeepSpeed config, process-group setup,
parameter groups, the optimizer, and the engine (plain or pipeline).

Everything that can be wrong with a job is checked by `check_job` and `ds_config`
*before* a process group exists (they read only the config, the launcher's environment
and the optional DeepSpeed JSON), so a bad config fails in a second, with the numbers.

The batch triple is derived once (`cratelm.config.batch_plan`) and asserted:
global batch = micro batch x gradient accumulation x data-parallel size, where the
data-parallel size is world size / pipeline stages.

Optimizer. AdamW with two parameter groups (weight decay on 2-D tensors only), built by
cratelm and handed to DeepSpeed as a client optimizer: ``torch.optim.AdamW(fused=True)``
on CUDA, ``torch.optim.AdamW`` on CPU (DeepSpeed's ``"torch_adam": true``; no compiled
ops), DeepSpeed's ``DeepSpeedCPUAdam`` when ZeRO offloads optimizer state from a GPU. The
optimizer can skip a step (``skip_next``), which is how ``train.nan_policy=skip`` drops
an update after a non-finite loss on any rank. The learning rate is written into its
groups by the trainer before every step (cratelm.train.schedule).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cratelm.config import BatchPlan, ConfigError, JobConfig, batch_plan
from cratelm.dist import free_port

PARTITIONS = ("parameters", "uniform")          # or "type:REGEX"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


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
        raise ConfigError("started by mpirun without MASTER_ADDR: launch through `deepspeed --launcher openmpi "
                          "--master_addr HOST` (it exports MASTER_ADDR/MASTER_PORT) or export them with -x")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if local_rank is not None and local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
    return DistEnv(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)), launched=launched)


def device_type() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- config-time checks

def check_job(cfg: JobConfig, world_size: int, dev_type: str | None = None) -> BatchPlan:
    """Every check that needs no process group; returns the batch plan. Raises ConfigError."""
    dev_type = dev_type or device_type()
    m, t, o = cfg.model, cfg.train, cfg.optim
    plan = batch_plan(t, world_size)
    if t.precision == "fp16" and dev_type != "cuda":
        raise ConfigError("train.precision=fp16 is not supported on CPU (DeepSpeed's CPU accelerator has no "
                          "fp16 training); use bf16 or fp32")
    part = t.pipeline_partition
    if not (part in PARTITIONS or part.startswith("type:")):
        raise ConfigError(f"train.pipeline_partition={part!r}: choose parameters, uniform or type:REGEX")
    if part.startswith("type:"):
        try:
            re.compile(part[5:], re.IGNORECASE)
        except re.error as e:
            raise ConfigError(f"train.pipeline_partition={part!r}: bad regular expression ({e})") from None
    if t.pipeline_stages > 1 and part == "uniform" and m.n_layer % t.pipeline_stages:
        raise ConfigError(f"train.pipeline_partition=uniform puts the same number of blocks on every stage: "
                          f"model.n_layer={m.n_layer} is not divisible by train.pipeline_stages={t.pipeline_stages} "
                          f"({m.n_layer} = {m.n_layer // t.pipeline_stages} x {t.pipeline_stages} "
                          f"+ {m.n_layer % t.pipeline_stages}); use pipeline_partition=parameters or change n_layer")
    end = o.decay_steps if o.decay_steps is not None else t.max_steps
    if end < o.warmup_steps:
        raise ConfigError(f"optim.decay_steps={end} (None = train.max_steps) is shorter than "
                          f"optim.warmup_steps={o.warmup_steps}")
    if t.pipeline_stages > 1 and t.offload_optimizer:
        raise ConfigError("train.offload_optimizer=true is not supported with train.pipeline_stages > 1")
    if t.deepspeed_config and not Path(t.deepspeed_config).is_file():
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} does not exist")
    return plan


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: JobConfig, plan: BatchPlan, dev_type: str | None = None) -> dict[str, Any]:
    """The DeepSpeed config generated from ``cfg``, with train.deepspeed_config merged over it."""
    dev_type = dev_type or device_type()
    t, o = cfg.train, cfg.optim
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": dev_type == "cuda"}
    gen: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # cratelm builds AdamW itself (a torch optimizer that can skip a step): ZeRO accepts it
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,            # cratelm prints its own line
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer and dev_type != "cuda":
        gen["zero_force_ds_cpu_optimizer"] = False   # torch AdamW on CPU state: no compiled op
    if t.activation_checkpointing:
        gen["activation_checkpointing"] = {"partition_activations": False, "cpu_checkpointing": False,
                                           "contiguous_memory_optimization": False,
                                           "synchronize_checkpoint_boundary": False}
    if t.pipeline_stages > 1:
        gen["pipeline"] = {"activation_checkpoint_interval": 1 if t.activation_checkpointing else 0}
    if not t.deepspeed_config:
        _check_merged(gen, t, "the config")
        return gen
    try:
        user = json.loads(Path(t.deepspeed_config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config}: cannot read it as JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} must hold a JSON object")
    for key in BATCH_KEYS:
        if key in user and user[key] != gen[key]:
            raise ConfigError(
                f"train.deepspeed_config={t.deepspeed_config} sets {key}={user[key]} but the cratelm config gives "
                f"{key}={gen[key]} (global batch {plan.global_batch} = micro_batch {plan.micro_batch} x "
                f"grad_accum {plan.grad_accum} x data-parallel size {plan.dp_size}); set the batch in the "
                f"train section, or make the two agree")
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} has a '{key}' section; cratelm builds "
                              f"AdamW and the LR schedule from the optim section (remove '{key}')")
    merged = _merge(gen, user)
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if t.pipeline_stages > 1 and stage >= 2:
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} sets zero_optimization.stage={stage}, "
                          f"which cannot be combined with train.pipeline_stages={t.pipeline_stages}")
    if merged.get("fp16", {}).get("enabled") and dev_type != "cuda":
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} enables fp16, which DeepSpeed does not "
                          "support on CPU")
    _check_merged(merged, t, f"train.deepspeed_config={t.deepspeed_config}")
    return merged


def _check_merged(config: dict[str, Any], t, where: str) -> None:
    stage = config.get("zero_optimization", {}).get("stage", 0)
    offload = (config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if (offload not in ("none", None)) != t.offload_optimizer:
        # the optimizer cratelm builds (CPU Adam or not) follows train.offload_optimizer
        raise ConfigError(f"{where} sets zero_optimization.offload_optimizer.device={offload!r} but "
                          f"train.offload_optimizer={str(t.offload_optimizer).lower()}; set offloading with "
                          "train.offload_optimizer")
    if t.pipeline_stages > 1 and config.get("bf16", {}).get("enabled") and stage == 0:
        raise ConfigError(f"{where}: bf16 with train.pipeline_stages={t.pipeline_stages} needs ZeRO stage 1, not 0: "
                          "DeepSpeed's bf16 ZeRO-0 pipeline engine accumulates gradients in bf16 and writes "
                          "checkpoints it cannot load back (KeyError in its bf16 optimizer; DeepSpeed 0.19.8); "
                          "set train.zero_stage=1")


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


# ----------------------------------------------------------------------------- optimizer

def param_groups(named_parameters, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on every 2-D tensor (matrices, embeddings), none on LayerNorm
    weights and biases. A tied tensor is listed once."""
    decay, no_decay, seen = [], [], set()
    for _, p in named_parameters:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _skippable(base: type) -> type:
    class Skippable(base):  # type: ignore[misc, valid-type]
        """``base`` whose step() does nothing when ``skip_next`` is set, or (``check_grads``)
        when any gradient of any rank is non-finite (one all-reduce per call)."""

        def __init__(self, *args, check_grads: bool = False, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.skip_next = False
            self.check_grads = check_grads
            self.skipped = False          # set when a step was dropped; the trainer resets it

        def _nonfinite_anywhere(self) -> bool:
            import torch.distributed as dist

            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            dev = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            flag = torch.zeros(1, device=dev)
            for gr in grads:
                flag += (~torch.isfinite(gr)).any().float()
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)

        @torch.no_grad()
        def step(self, closure=None, **kwargs):
            if self.skip_next or (self.check_grads and self._nonfinite_anywhere()):
                self.skipped = True
                return None
            return super().step(closure, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = f"Skippable{base.__name__}"
    return Skippable


def make_optimizer(groups: list[dict], cfg: JobConfig, dev_type: str, check_grads: bool = False):
    """AdamW over ``groups``: fused on CUDA, torch's on CPU, DeepSpeedCPUAdam for ZeRO-Offload on GPU."""
    o = cfg.optim
    kwargs: dict[str, Any] = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.train.offload_optimizer and dev_type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return _skippable(DeepSpeedCPUAdam)(groups, adamw_mode=True, check_grads=check_grads, **kwargs)
    if dev_type == "cuda" and not cfg.train.offload_optimizer:
        kwargs["fused"] = True
    return _skippable(torch.optim.AdamW)(groups, check_grads=check_grads, **kwargs)


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

    def skipped_steps(self) -> int:
        """Steps DeepSpeed itself skipped (fp16 overflow, non-finite gradient norm)."""
        return int(getattr(self.ds, "skipped_steps", 0))


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
                  dp_size=dp_size, stage=stage, num_stages=stages, device=torch.device(engine.device))


def clip_global(engine) -> float:
    """Clip the fp32 gradients of a ZeRO-0 engine to gradient_clipping by their global 2-norm
    (summed over the pipeline stages; a pipeline-replicated tied copy counted once); returns
    the norm before clipping. Gradients are already averaged over data-parallel ranks."""
    import torch.distributed as dist

    params = [p for p in engine.module.parameters()
              if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
    device = params[0].grad.device if params else torch.device(engine.device)
    sq = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        sq += p.grad.detach().float().pow(2).sum()
    if hasattr(engine, "grid") and engine.num_stages > 1:
        dist.all_reduce(sq, group=engine.grid.get_pipe_parallel_group())
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
        parts: list[Any] = [None] * dist.get_world_size() if rank == 0 else None  # type: ignore[assignment]
        dist.gather_object(mine, parts, dst=0)
        if rank != 0:
            return None
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            out.update(part)
        return out
    if engine.ds.zero_optimization_stage() == 3:
        state = engine.ds._zero3_consolidated_16bit_state_dict()   # a collective; full dict on rank 0
        return dict(state) if rank == 0 else None
    return dict(engine.ds.module.state_dict()) if rank == 0 else None

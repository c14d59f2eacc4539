"""Everything that can be wrong with a job, checked before a process group exists, and the
DeepSpeed config generated from the cratelm config.

`check_job` and `ds_config` read only the config, the launcher's environment and the
optional DeepSpeed JSON, so a bad config fails in a second, with the numbers. The batch
triple is derived once (`cratelm.config.batch_plan`) and asserted: global batch = micro
batch x gradient accumulation x data-parallel size, where the data-parallel size is world
size / pipeline stages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from cratelm.config import BatchPlan, ConfigError, JobConfig, batch_plan
from cratelm.yaml_config import deep_merge

PARTITIONS = ("parameters", "uniform")          # or "type:REGEX"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def device_type() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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
        return bf16_zero0_route(gen)
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
    merged = deep_merge(gen, user)
    stage = merged.get("zero_optimization", {}).get("stage", 0)
    if t.pipeline_stages > 1 and stage >= 2:
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} sets zero_optimization.stage={stage}, "
                          f"which cannot be combined with train.pipeline_stages={t.pipeline_stages}")
    if merged.get("fp16", {}).get("enabled") and dev_type != "cuda":
        raise ConfigError(f"train.deepspeed_config={t.deepspeed_config} enables fp16, which DeepSpeed does not "
                          "support on CPU")
    _check_merged(merged, t, f"train.deepspeed_config={t.deepspeed_config}")
    return bf16_zero0_route(merged)


def bf16_zero0_route(config: dict[str, Any]) -> dict[str, Any]:
    """bf16 with ZeRO-0 and no pipeline -> DeepSpeed's ``torch_autocast`` (fp32 weights and
    gradients, bf16 matmuls). DeepSpeed 0.19.8's own bf16 ZeRO-0 path (its "DDP bf16" fp16
    optimizer) keeps bf16 gradients and accumulates the micro-batches in bf16, and refuses
    ``data_types.grad_accum_dtype=fp32`` without ZeRO; ZeRO >= 1 accumulates in fp32. The
    all-reduce stays fp32 too (no module is declared safe for a bf16 all-reduce)."""
    zero = config.get("zero_optimization", {}).get("stage", 0)
    if not config.get("bf16", {}).get("enabled") or zero != 0 or "pipeline" in config:
        return config
    return {**config, "bf16": {**config["bf16"], "enabled": False},
            "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}


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

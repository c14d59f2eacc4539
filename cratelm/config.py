"""cratelm's configuration: typed dataclasses that import no torch.

Precedence (one rule, as torchtitan states it): command line ``key=value`` > later YAML
file > earlier YAML file > the defaults below. YAML files are nested by section::

    model: {arch: crate-gpt, n_layer: 12}
    train: {micro_batch: 16}

Every field has a one-line docstring (the string under it); ``cratelm show-config``
prints the resolved config. Validation happens in ``__post_init__`` and names the field
and the value, so a bad config fails before any process group starts. Reading the
YAML files and overrides: `cratelm.yaml_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from cratelm import yaml_config
from cratelm.yaml_config import ConfigError, build, field_docs, read_sections  # noqa: F401  (public here)
from cratelm.kernels.registry import ATTN_BACKENDS, ISTA_IMPLS, LOSS_IMPLS

ARCHS = ("crate-gpt", "crate-lm", "crate-alpha", "gpt2")
PRECISIONS = ("fp32", "bf16", "fp16")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """The network. The model code sees only this section."""

    arch: str = "crate-gpt"
    """crate-gpt (the authors' CRATE-GPT), crate-lm (overcomplete ISTA, Bai & Ma), crate-alpha, or gpt2."""
    n_layer: int = 12
    """Number of blocks L."""
    d_model: int = 768
    """Width d of the residual stream."""
    n_head: int = 12
    """Number of heads K (subspaces, for CRATE); head width p = d_model / n_head."""
    vocab_size: int = 50257
    """Tokenizer vocabulary; the embedding is padded up to a multiple of vocab_multiple."""
    vocab_multiple: int = 64
    """Pad the embedding rows to a multiple of this (50257 -> 50304): faster matmuls."""
    context: int = 1024
    """Maximum sequence length T (rows of the learned position embedding)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and block outputs (training only)."""
    eta: float = 0.1
    """ISTA step size (a constant 0.1 in the authors' code)."""
    lmbda: float = 0.1
    """ISTA sparsity penalty lambda (a constant 0.1 in the authors' code)."""
    overcomplete: int | None = None
    """Dictionary rows per width: 1 for crate-gpt, 4 for crate-lm / crate-alpha (None = arch default)."""
    ista_steps: int | None = None
    """ISTA iterations per block: 1 for crate-gpt, 2 for crate-lm / crate-alpha (None = arch default)."""
    mlp_ratio: int = 4
    """gpt2 only: hidden width of the GELU MLP as a multiple of d_model."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the N(0, std) init of Linear and Embedding weights."""
    attn_backend: str = "sdpa"
    """Attention kernel: reference, sdpa, flash or triton (see cratelm.kernels)."""
    ista_impl: str = "torch"
    """ISTA kernel: torch (two matmuls), authors (their three), fused (addmm epilogues), triton, or compile."""
    loss_impl: str = "chunked"
    """LM head + cross-entropy: plain (full logits), chunked (never materialises them), liger."""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"model.arch={self.arch!r} is unknown; choose one of {ARCHS}")
        for name in ("n_layer", "d_model", "n_head", "vocab_size", "context", "vocab_multiple", "mlp_ratio"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"model.{name}={value!r} must be a positive integer")
        _check(self.d_model % self.n_head == 0,
               f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _check(self.eta > 0, f"model.eta={self.eta} must be positive (it is the ISTA step size)")
        _check(self.lmbda >= 0, f"model.lmbda={self.lmbda} must be non-negative")
        _check(self.ln_eps > 0, f"model.ln_eps={self.ln_eps} must be positive")
        _check(self.init_std > 0, f"model.init_std={self.init_std} must be positive")
        if self.overcomplete is None:
            self.overcomplete = 1 if self.arch == "crate-gpt" else 4
        if self.ista_steps is None:
            self.ista_steps = 1 if self.arch == "crate-gpt" else 2
        _check(self.overcomplete >= 1, f"model.overcomplete={self.overcomplete} must be >= 1")
        _check(self.ista_steps >= 1, f"model.ista_steps={self.ista_steps} must be >= 1")
        if self.arch == "crate-gpt":
            _check(self.overcomplete == 1 and self.ista_steps == 1,
                   f"model.arch=crate-gpt is one ISTA step on a complete dictionary; got "
                   f"overcomplete={self.overcomplete}, ista_steps={self.ista_steps} (use crate-lm or crate-alpha)")
        _check(self.attn_backend in ATTN_BACKENDS,
               f"model.attn_backend={self.attn_backend!r} is unknown; choose one of {ATTN_BACKENDS}")
        _check(not (self.arch == "gpt2" and self.attn_backend == "triton"),
               "model.attn_backend=triton is the tied q=k=v kernel of CRATE; gpt2 needs sdpa, flash or reference")
        _check(not (self.attn_backend == "triton" and self.dropout > 0),
               f"model.attn_backend=triton has no attention dropout; model.dropout={self.dropout} needs sdpa, "
               "flash or reference")
        _check(self.ista_impl in ISTA_IMPLS, f"model.ista_impl={self.ista_impl!r} is unknown; choose one of {ISTA_IMPLS}")
        _check(self.loss_impl in LOSS_IMPLS, f"model.loss_impl={self.loss_impl!r} is unknown; choose one of {LOSS_IMPLS}")

    @property
    def head_dim(self) -> int:
        """p = d / K."""
        return self.d_model // self.n_head

    @property
    def padded_vocab(self) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of vocab_multiple."""
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


@dataclass
class DataConfig:
    """Token shards to train and validate on (made by `cratelm prepare-data`)."""

    train: list[str] = field(default_factory=list)
    """Training shards (dir/train.bin or a corpus directory); several are blended by weights."""
    weights: list[float] = field(default_factory=list)
    """Blending weights of the train shards (empty = proportional to their sizes)."""
    val: str = ""
    """Validation shard (dir/val.bin); empty = no validation."""
    seed: int = 1234
    """Seed of the sample order (shuffle and blending)."""

    def __post_init__(self) -> None:
        if self.weights:
            _check(len(self.weights) == len(self.train),
                   f"data.weights has {len(self.weights)} entries but data.train has {len(self.train)}")
            _check(all(w > 0 for w in self.weights), f"data.weights={self.weights} must all be positive")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay (the paper's recipe by default)."""

    lr: float = 6e-4
    """Peak learning rate."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 2000
    """Linear warm-up steps from 0 to lr."""
    decay_steps: int | None = None
    """Step at which the cosine reaches min_lr (None = train.max_steps)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D parameters only (not LayerNorm, biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be positive")
        _check(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
               f"optim.beta1={self.beta1}, optim.beta2={self.beta2} must be in [0, 1)")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0")


@dataclass
class TrainConfig:
    """The training job: batch arithmetic, parallelism, precision, logging, checkpoints."""

    run_dir: str = "runs/default"
    """Directory for checkpoints, TensorBoard events and metrics.jsonl."""
    max_steps: int = 600000
    """Optimizer steps to train for."""
    micro_batch: int = 16
    """Sequences per rank per forward/backward (micro batch)."""
    grad_accum: int | None = None
    """Micro batches accumulated per optimizer step (None = derived from global_batch)."""
    global_batch: int | None = None
    """Sequences per optimizer step over all ranks (None = micro_batch x grad_accum x data-parallel size)."""
    precision: str = "bf16"
    """fp32, bf16 or fp16 (fp16 uses dynamic loss scaling; not supported on CPU)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0, 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO >= 1: keep optimizer state in CPU memory."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages (> 1 uses DeepSpeed's PipelineModule; needs ZeRO 0 or 1)."""
    pipeline_partition: str = "parameters"
    """Blocks over stages: parameters (balance weights), uniform (equal blocks per stage), or type:REGEX."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass to save memory."""
    compile: bool = False
    """Run the model under torch.compile inside the DeepSpeed engine."""
    seed: int = 1337
    """Seed of the parameter init and dropout."""
    log_interval: int = 10
    """Steps between console / TensorBoard / metrics.jsonl records."""
    eval_interval: int = 500
    """Steps between validation runs (0 = only at the end)."""
    eval_windows: int = 320
    """Validation windows (context tokens each) per validation run: the same set for any batch split."""
    diag_interval: int = 100
    """Steps between per-layer white-box diagnostics (coding rate, sparsity); 0 = off."""
    ckpt_interval: int = 1000
    """Steps between checkpoints (0 = only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Checkpoints to keep (older ones are deleted once a newer one is complete)."""
    nan_policy: str = "stop"
    """On a NaN/inf loss: stop (keep the last good checkpoint) or skip (drop the step and count it)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON whose keys override the generated ones."""
    peak_tflops: float | None = None
    """Peak bf16 TFLOP/s of one device for MFU (None = look up the device name in a table)."""
    init_from: str | None = None
    """A fresh run starts from this model's weights (any model `cratelm eval` loads; a resumed run ignores it)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch", "log_interval", "eval_windows", "keep_last"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"train.{name}={value!r} must be a positive integer")
        for name in ("eval_interval", "diag_interval", "ckpt_interval"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 0, f"train.{name}={value!r} must be >= 0")
        for name in ("grad_accum", "global_batch"):
            value = getattr(self, name)
            _check(value is None or value > 0, f"train.{name}={value!r} must be positive")
        _check(self.precision in PRECISIONS, f"train.precision={self.precision!r} is unknown; choose one of {PRECISIONS}")
        _check(self.zero_stage in (0, 1, 2, 3), f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        _check(self.pipeline_stages >= 1, f"train.pipeline_stages={self.pipeline_stages} must be >= 1")
        _check(not (self.pipeline_stages > 1 and self.zero_stage >= 2),
               f"train.zero_stage={self.zero_stage} cannot be combined with train.pipeline_stages="
               f"{self.pipeline_stages}: DeepSpeed's pipeline engine supports ZeRO 0 and 1 only")
        _check(not (self.offload_optimizer and self.zero_stage == 0),
               "train.offload_optimizer=true needs train.zero_stage >= 1")
        _check(self.nan_policy in ("stop", "skip"), f"train.nan_policy={self.nan_policy!r} must be stop or skip")


@dataclass
class JobConfig:
    """Everything a job needs, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch, parallelism, precision, logging and checkpoints."""

    def __post_init__(self) -> None:
        m, t = self.model, self.train
        if t.pipeline_stages > 1:
            _check(m.n_layer >= t.pipeline_stages,
                   f"model.n_layer={m.n_layer} is fewer than train.pipeline_stages={t.pipeline_stages}")
        _check(not (t.compile and t.pipeline_stages > 1),
               "train.compile=true is not supported with train.pipeline_stages > 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore[misc]


# ----------------------------------------------------------------------------- batch arithmetic

@dataclass(frozen=True)
class BatchPlan:
    """The batch triple, derived once: global = micro x accum x data-parallel size."""

    micro_batch: int
    grad_accum: int
    dp_size: int
    global_batch: int

    def __post_init__(self) -> None:
        assert self.global_batch == self.micro_batch * self.grad_accum * self.dp_size, self


def batch_plan(train: TrainConfig, world_size: int) -> BatchPlan:
    """Derive (micro, accum, dp, global) for ``world_size`` ranks; errors carry the numbers."""
    _check(world_size % train.pipeline_stages == 0,
           f"world size {world_size} is not divisible by train.pipeline_stages={train.pipeline_stages}")
    dp = world_size // train.pipeline_stages
    mb = train.micro_batch
    if train.global_batch is None:
        accum = train.grad_accum or 1
        return BatchPlan(mb, accum, dp, mb * accum * dp)
    per_step = mb * dp
    _check(train.global_batch % per_step == 0,
           f"train.global_batch={train.global_batch} is not divisible by train.micro_batch={mb} x "
           f"data-parallel size {dp} (= {per_step}; world size {world_size}, "
           f"pipeline_stages {train.pipeline_stages})")
    accum = train.global_batch // per_step
    _check(train.grad_accum is None or train.grad_accum == accum,
           f"train.grad_accum={train.grad_accum} conflicts with train.global_batch={train.global_batch} = "
           f"micro_batch {mb} x grad_accum {accum} x data-parallel size {dp}")
    return BatchPlan(mb, accum, dp, train.global_batch)


# ----------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.n_layer=4`` -> (["model", "n_layer"], 4); the value is parsed as YAML."""
    return yaml_config.parse_override(text, SECTIONS)


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Merge YAML ``files`` in order, apply ``overrides``, validate, return a JobConfig."""
    merged, source = read_sections(files, overrides, SECTIONS)
    return JobConfig(**{sec: build(cls, merged.get(sec, {}), sec, source) for sec, cls in SECTIONS.items()})


def config_from_dict(d: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from ``to_dict()`` output (e.g. stored in a checkpoint)."""
    return JobConfig(**{sec: build(cls, d.get(sec, {}), sec, {}) for sec, cls in SECTIONS.items()})


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from its ``asdict`` form (exported models store it as JSON)."""
    return build(ModelConfig, d, "model", {})


def dumps(cfg: JobConfig) -> str:
    """The resolved config as YAML (what show-config prints and checkpoints store)."""
    return yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False)

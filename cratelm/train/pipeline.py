"""CrateLM as a DeepSpeed PipelineModule, without pipeline code in the model.

The layer sequence, indexed as DeepSpeed numbers its ``layer_XX`` checkpoint files::

    0            TiedLayerSpec("embed", EmbedPipe)   idx (B, T) -> h (B, T, d)
    1 .. L       LayerSpec(BlockPipe, i)             h -> h        (block i = layer i + 1)
    L + 1        LayerSpec(FinalNormPipe)            h -> LN(h)    (not for crate-gpt: no ln_f)
    last         TiedLayerSpec("embed", EmbedPipe, forward_fn=head)  h -> (h, W_te)

The head shares the token embedding W_te with layer 0 (DeepSpeed all-reduces the tied
gradient between the first and last stage); it passes (h, W_te) to the loss function,
which calls the model's own ``lm_head_loss`` (so ``model.loss_impl`` applies, and the
logits need not be materialised).

Each rank builds only the layers of its stages (DeepSpeed's LayerSpec is built lazily),
initialised with the same per-module generators as ``CrateLM(cfg, seed)``
(``_generator(seed, offset)``), so a pipeline run starts from the same weights as a
single-process run. Each wrapper names its submodules as CrateLM does (``embed.*``,
``blocks.{i}.*``, ``ln_f.*``): the union of the layer state dicts IS a CrateLM state dict.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cratelm.config import ModelConfig
from cratelm.kernels.loss import lm_head_loss
from cratelm.model.crate import Embedding, _generator, init_block, make_block

TIED_KEY = "embed"
TIED_ATTR = "embed.wte.weight"


class EmbedPipe(nn.Module):
    """Layer 0: token + position embedding (also the tied head on the last stage)."""

    def __init__(self, cfg: ModelConfig, seed: int | None) -> None:
        super().__init__()
        self.embed = Embedding(cfg)
        self.embed.reset_parameters(cfg.init_std, _generator(seed, 0))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed(idx)


class BlockPipe(nn.Module):
    """One block, stored under ``blocks.{i}`` as in CrateLM."""

    def __init__(self, cfg: ModelConfig, index: int, seed: int | None) -> None:
        super().__init__()
        self.index = index
        self.blocks = nn.ModuleDict({str(index): make_block(cfg)})
        init_block(self.blocks[str(index)], cfg, _generator(seed, 1 + index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[str(self.index)](x)


class FinalNormPipe(nn.Module):
    """The final LayerNorm of crate-lm / crate-alpha / gpt2, stored as ``ln_f``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x)


def _head(embed: EmbedPipe, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the last layer hands the tied matrix to the loss, which computes logits + CE in one go
    return h, embed.embed.wte.weight


class HeadLoss:
    """``loss_fn(outputs, labels)`` of the pipeline: mean CE of the tied head's logits."""

    def __init__(self, impl: str) -> None:
        self.impl = impl

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        h, weight = outputs
        return lm_head_loss(h, weight, labels, impl=self.impl)


def layer_specs(cfg: ModelConfig, seed: int | None) -> list:
    """The DeepSpeed layer sequence of ``cfg`` (see the module docstring)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs: list = [TiedLayerSpec(TIED_KEY, EmbedPipe, cfg, seed, tied_weight_attr=[TIED_ATTR])]
    specs += [LayerSpec(BlockPipe, cfg, i, seed) for i in range(cfg.n_layer)]
    if cfg.arch != "crate-gpt":
        specs.append(LayerSpec(FinalNormPipe, cfg))
    specs.append(TiedLayerSpec(TIED_KEY, EmbedPipe, cfg, seed, forward_fn=_head, tied_weight_attr=[TIED_ATTR]))
    return specs


def partition_method(partition: str) -> str:
    """cratelm's train.pipeline_partition -> DeepSpeed's partition_method. ``uniform`` means
    the same number of BLOCKS per stage (DeepSpeed's own "uniform" counts the embedding and
    head as layers too); ``parameters`` and ``type:REGEX`` are DeepSpeed's."""
    return "type:BlockPipe" if partition == "uniform" else partition


def build_pipeline(cfg: ModelConfig, seed: int | None, stages: int, partition: str = "parameters",
                   activation_checkpointing: bool = False):
    """This rank's part of the pipeline (needs the process group)."""
    from deepspeed.pipe import PipelineModule

    return PipelineModule(layers=layer_specs(cfg, seed), num_stages=stages, loss_fn=HeadLoss(cfg.loss_impl),
                          partition_method=partition_method(partition),
                          activation_checkpoint_interval=1 if activation_checkpointing else 0,
                          checkpointable_layers=["BlockPipe"])


def local_crate_state(pipe) -> dict[str, torch.Tensor]:
    """This stage's parameters under CrateLM names (the tied head on the last stage is a
    function, not a layer of its own, and is skipped: layer 0 owns the embedding)."""
    out: dict[str, torch.Tensor] = {}
    for layer in pipe.forward_funcs:
        if isinstance(layer, nn.Module):
            out.update(layer.state_dict())
    return out


def layer_files_to_crate_state(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Merge the ``layer_XX-*model_states.pt`` state dicts (index -> state) into one CrateLM
    state dict (the names already agree; see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    for _, state in sorted(states.items()):
        for k, v in state.items():
            if k in out and not torch.equal(out[k], v):
                raise ValueError(f"pipeline checkpoint: two layers disagree on {k}")
            out[k] = v
    return out

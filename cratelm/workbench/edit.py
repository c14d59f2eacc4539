"""Editing units: hold sparse code units (ISTA) or GPT-2 MLP neurons at fixed values.

    cratelm generate --checkpoint M --prompt "def f(" --clamp 0:17=3.0 --clamp 2:5=0

A clamp ``LAYER:UNIT=VALUE`` sets unit UNIT of layer LAYER's code to VALUE for every token
(the ISTA code c of crate-lm / crate-alpha, the block output of crate-gpt, the GELU hidden
units of gpt2); the model then decodes the edited code as usual.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from cratelm.model.crate import CrateBlock, CrateLM

Clamp = tuple[int, int, float]   # (layer, unit, value)


def parse_clamp(text: str) -> Clamp:
    """``"2:17=3.5"`` -> (2, 17, 3.5); a clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*=\s*([-+0-9.eE]+|nan|inf)\s*", text)
    if not m:
        raise ValueError(f"--clamp {text!r} must look like LAYER:UNIT=VALUE, e.g. 0:17=3.5")
    try:
        return int(m.group(1)), int(m.group(2)), float(m.group(3))
    except ValueError:
        raise ValueError(f"--clamp {text!r}: VALUE {m.group(3)!r} is not a number") from None


def code_width(model: CrateLM) -> int:
    """Units per layer: d (crate-gpt), overcomplete * d (crate-lm, crate-alpha), mlp_ratio * d (gpt2)."""
    cfg = model.cfg
    return cfg.mlp_ratio * cfg.d_model if cfg.arch == "gpt2" else int(cfg.overcomplete) * cfg.d_model


def _holder(model: CrateLM, layer: int) -> torch.nn.Module:
    block = model.blocks[str(layer)]
    return block.ista if isinstance(block, CrateBlock) else block


def set_clamps(model: CrateLM, clamps: list[Clamp]) -> list[torch.nn.Module]:
    """Check the clamps against the model and switch them on; returns the modules holding them."""
    width = code_width(model)
    per_layer: dict[int, dict[int, float]] = {}
    for layer, unit, value in clamps:
        if not 0 <= layer < model.cfg.n_layer:
            raise ValueError(f"--clamp {layer}:{unit}={value}: layer {layer} is out of range (the model has "
                             f"{model.cfg.n_layer} layers)")
        if not 0 <= unit < width:
            raise ValueError(f"--clamp {layer}:{unit}={value}: unit {unit} is out of range (layer codes have "
                             f"{width} units)")
        per_layer.setdefault(layer, {})[unit] = value
    holders = []
    for layer, units in per_layer.items():
        holder = _holder(model, layer)
        holder.clamp = units
        holders.append(holder)
    return holders


@contextlib.contextmanager
def clamped(model: CrateLM, clamps: list[Clamp]) -> Iterator[CrateLM]:
    """Within the block, the model computes with the clamped units; afterwards it is unchanged."""
    holders = set_clamps(model, clamps)
    try:
        yield model
    finally:
        for h in holders:
            h.clamp = None


@torch.no_grad()
def next_token_probs(model: CrateLM, prefix: torch.Tensor, clamps: list[Clamp] = ()) -> torch.Tensor:
    """P(next token | prefix) over the real vocabulary (padding rows excluded), prefix (T,) -> (V,)."""
    with clamped(model, list(clamps)):
        h = model.hidden(prefix[None, -model.cfg.context:])[0, -1]
    logits = torch.nn.functional.linear(h, model.head_weight)[: model.cfg.vocab_size]
    return torch.softmax(logits.double(), dim=-1)

"""Loading checkpoint files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, i.e. runs whatever a
``__reduce__`` in the file says: a run directory downloaded from elsewhere could do anything
when ``cratelm eval/generate/export`` opened it. So every ``.pt`` file cratelm reads is loaded
with ``weights_only=True``; the few DeepSpeed classes its optimizer files hold (its ZeRO
stage enum, its loss scalers, the fragment address of a ZeRO partition) are allowed by name
(``torch.serialization.add_safe_globals``). Any other class is refused with an error naming
the file and the class, unless the user passes ``--trust-checkpoint`` (``trust=True``).

DeepSpeed's own readers (``zero_to_fp32``, ``ds_to_universal``, the engine's loader) call
``torch.load(weights_only=False)`` themselves: ``check_files`` loads every file of a
checkpoint directory the safe way first (a static scan of the pickle's opcodes could be
dodged by a crafted file) and refuses it the same way before DeepSpeed opens it. The error
names the classes (``torch.serialization.get_unsafe_globals_in_checkpoint``, which runs
nothing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cratelm.config import ConfigError

ALLOWED = ("deepspeed.runtime.zero.config.ZeroStageEnum",
           "deepspeed.runtime.fp16.loss_scaler.LossScaler",
           "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
           "deepspeed.utils.tensor_fragment.fragment_address")
"""Classes that DeepSpeed 0.19's checkpoint files hold (optimizer partitions, universal
checkpoints), allowed when they import; nothing else is unpickled without ``trust``."""


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that would unpickle a class outside the allowed list (exit 2)."""


def _allowed_classes() -> list[Any]:
    import importlib

    out = []
    for name in ALLOWED:
        mod, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):     # deepspeed absent: its classes cannot occur anyway
            pass
    return out


def _refusal(path: str | os.PathLike, names: list[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path} holds {', '.join(names)}, which cratelm does not unpickle (loading it "
                                 "could run code from the file); pass --trust-checkpoint if you trust its origin")


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Classes/functions ``path`` would unpickle beyond torch's own and ALLOWED (runs nothing)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    return [g for g in get_unsafe_globals_in_checkpoint(path) if g not in ALLOWED]


def load(path: str | os.PathLike, trust: bool = False, map_location: str = "cpu") -> Any:
    """``torch.load`` of ``path``: weights only plus ALLOWED, or anything when ``trust``."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # noqa: BLE001 - torch raises UnpicklingError (or others) for a refused global
            try:
                names = unsafe_globals(path)
            except Exception:  # noqa: BLE001 - a damaged file: torch's own error says more
                names = []
            if names:
                raise _refusal(path, names) from None
            raise


def check_files(directory: str | os.PathLike, trust: bool = False, pattern: str = "*.pt") -> None:
    """Refuse ``directory`` if any of its ``pattern`` files would unpickle a class outside
    ALLOWED (before a library that loads with ``weights_only=False`` opens them)."""
    if trust:
        return
    for f in sorted(Path(directory).glob(pattern)):
        load(f)

"""``train.init_from``: start a FRESH run from an existing model's weights (nanoGPT's
``init_from``, litgpt's ``--initial_checkpoint_dir``)::

    cratelm train --config configs/model/X.yaml configs/train/Y.yaml train.init_from=out/base-hf

The source is anything `cratelm.checkpoints.load_model` reads: an exported cratelm model
directory, a run or checkpoint directory, an authors' ``.pt`` file, or a Hugging Face export.
Checked before any process group (a ConfigError, exit 2): the model section must describe the
source's architecture (only the fields that change no weight may differ: `FREE_FIELDS`), and
the tokenizer sha256 the source records must be the training data's (meta.json).

`resolve` (in ``cratelm.train.train``, before the process group) loads and checks the source on
every rank; `load_into` (in ``build_engine``, before ``deepspeed.initialize``) copies it into
the freshly built module: a CrateLM, or this rank's pipeline stages (each layer takes the
CrateLM names it holds; the tied embedding goes to the first and the last stage alike), so
every ZeRO stage and pipeline layout starts from the same weights. A resumed run ignores
``init_from`` (the checkpoint wins) and says so once. Rank 0 records the source in
RUN_DIR/init_from.json: its path, the sha256 of its weights, its step and tokenizer sha256.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cratelm.config import ConfigError, JobConfig
from cratelm.data.loading import Data

FREE_FIELDS = ("attn_backend", "ista_impl", "loss_impl", "dropout", "init_std")
"""Model fields that change how the weights are used (or how a random init would draw them), not
what they are: they may differ from the source's."""
RECORD = "init_from.json"

_loaded: dict[str, dict[str, torch.Tensor]] = {}      # resolve -> load_into, within one process


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and fp32 bytes of a state dict (sorted by name): the same
    weights give the same digest whichever file format they came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def check_source(cfg: JobConfig, data: Data, source_cfg: dict[str, Any], meta: dict[str, Any]) -> None:
    """The model section must describe the source's weights and the data its tokenizer."""
    where = f"train.init_from={cfg.train.init_from}"
    new = dataclasses.asdict(cfg.model)
    diff = [k for k in new if k not in FREE_FIELDS and source_cfg.get(k) != new[k]]
    if diff:
        raise ConfigError(f"{where} holds a different model: " +
                          ", ".join(f"model.{k}: source {source_cfg.get(k)!r}, config {new[k]!r}" for k in diff))
    want, have = meta.get("tokenizer_sha256"), data.tokenizer_sha256
    if want and have and want != have:
        meta_json = data.train.corpora[0].dir / "meta.json"
        raise ConfigError(f"{where} was trained with a tokenizer of sha256 {want}, but {meta_json} was tokenized "
                          f"with a tokenizer of sha256 {have}; re-tokenize the data with the source's tokenizer")


def resolve(cfg: JobConfig, data: Data, resume: Path | None) -> JobConfig:
    """Before the process group: load and check ``train.init_from`` (a fresh start), or drop it
    (a resumed run: the checkpoint wins). Returns the config the run goes on with."""
    t = cfg.train
    if not t.init_from:
        return cfg
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if resume is not None:
        if rank0:
            print(f"cratelm: note: resuming from {resume}; train.init_from={t.init_from} is ignored", flush=True)
        return dataclasses.replace(cfg, train=dataclasses.replace(t, init_from=None))
    from cratelm.checkpoints import load_model

    try:
        model, meta = load_model(t.init_from)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"train.init_from={t.init_from}: {e}") from None
    check_source(cfg, data, dataclasses.asdict(model.cfg), meta)
    state = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    _loaded[t.init_from] = state
    if rank0:
        record = {"init_from": str(Path(t.init_from).resolve()), "weights_sha256": weights_sha256(state),
                  "step": meta.get("step"), "tokenizer_sha256": meta.get("tokenizer_sha256"),
                  "source": {k: meta[k] for k in ("checkpoint", "imported_from") if meta.get(k)},
                  "time": datetime.datetime.now().isoformat()}
        run_dir = Path(t.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, run_dir / RECORD)
        print(f"cratelm: initialising from {t.init_from} (step {meta.get('step')}, "
              f"weights sha256 {record['weights_sha256'][:12]})", flush=True)
    return cfg


def _layers(module: nn.Module) -> list[nn.Module]:
    """The modules whose state dicts use CrateLM names: the model itself, or a pipeline stage's
    layers (cratelm.train.pipeline) and its tied embedding."""
    if not hasattr(module, "forward_funcs"):
        return [module]
    layers = [m for m in module.forward_funcs if isinstance(m, nn.Module)]
    return layers + [m for m in module.tied_modules.values() if all(m is not x for x in layers)]


@torch.no_grad()
def load_into(module: nn.Module, cfg: JobConfig) -> None:
    """Copy the source's weights into ``module`` (a CrateLM or a PipelineModule) before the
    DeepSpeed engine is built; nothing to do without ``train.init_from``."""
    path = cfg.train.init_from
    if not path:
        return
    if path not in _loaded:              # build_engine without train(): load here
        from cratelm.checkpoints import load_model

        _loaded[path] = load_model(path)[0].state_dict()
    state = _loaded.pop(path)
    for layer in _layers(module):
        own = layer.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"train.init_from={path} lacks {missing[:4]}")
        layer.load_state_dict({k: state[k] for k in own})

"""Export to and import from Hugging Face transformers.

    cratelm export runs/base out/base-hf --format hf     # any checkpoint cratelm loads
    cratelm import-hf out/base-hf runs/imported          # back to a cratelm model directory

- arch gpt2 -> a native ``GPT2LMHeadModel`` directory (loads without cratelm; GPT-2's
  Conv1D weights are cratelm's Linear weights transposed).
- crate-gpt / crate-lm / crate-alpha -> a remote-code directory: ``configuration_crate.py``
  and ``modeling_crate.py`` (cratelm/hf/remote, copied as they are, importing no cratelm),
  ``config.json`` with ``auto_map``; load with ``trust_remote_code=True``. Weight names are
  cratelm's own.

The export holds the REAL vocabulary (cratelm/hf/convert.py), so transformers' softmax and
``generate`` run over the tokenizer's ids only, as ``cratelm generate`` does. The tokenizer
goes along as ``tokenizer.json`` + ``tokenizer_config.json`` (AutoTokenizer loads it;
cratelm/hf/tokenizer.py), and a sentencepiece model also as itself, ``tokenizer.model``,
which ``import-hf`` takes back, so the imported model accepts the shards of the original
tokenizer (same sha256).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from cratelm.config import ModelConfig
from cratelm.hf.convert import load_hf, to_hf_state

REMOTE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_crate.py", "modeling_crate.py")
AUTO_MAP = {"AutoConfig": "configuration_crate.CrateConfig",
            "AutoModelForCausalLM": "modeling_crate.CrateForCausalLM"}


def _hf_config(cfg: ModelConfig, eos_id: int | None):
    """The transformers config of a cratelm ModelConfig (real vocabulary, dropout off)."""
    common = dict(vocab_size=cfg.vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                  vocab_multiple=cfg.vocab_multiple, tie_word_embeddings=True)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_positions=cfg.context, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_inner=cfg.mlp_ratio * cfg.d_model, activation_function="gelu_new",
                          layer_norm_epsilon=cfg.ln_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          architectures=["GPT2LMHeadModel"], **common)
    from cratelm.hf.remote.configuration_crate import CrateConfig

    config = CrateConfig(arch=cfg.arch, n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model,
                         context=cfg.context, eta=cfg.eta, lmbda=cfg.lmbda, overcomplete=cfg.overcomplete,
                         ista_steps=cfg.ista_steps, ln_eps=cfg.ln_eps, architectures=["CrateForCausalLM"], **common)
    config.auto_map = dict(AUTO_MAP)
    return config


def export_hf(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``cratelm export SRC OUT --format hf``: any model cratelm loads -> a transformers directory."""
    from cratelm.checkpoints import load_model

    model, meta = load_model(src)
    return save_hf(model, out_dir, tokenizer=meta.get("tokenizer"), source=str(src))


def save_hf(model: torch.nn.Module, out_dir: str | os.PathLike, tokenizer: str | None = None,
            source: str | None = None) -> Path:
    """Write ``model`` (a CrateLM) as a transformers directory (+ its tokenizer, if given)."""
    from transformers import GenerationConfig

    from cratelm.checkpoints import atomic_dir
    from cratelm.data.tokenizer import load_tokenizer
    from cratelm.hf.tokenizer import write_hf_tokenizer

    cfg: ModelConfig = model.cfg
    tok = load_tokenizer(tokenizer) if tokenizer else None
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but the model only {cfg.vocab_size}")
    eos = tok.eos_id if tok is not None else None
    config = _hf_config(cfg, eos)
    config.cratelm = {"source": source, "tokenizer_sha256": tok.sha256 if tok is not None else None}
    state = to_hf_state(model.state_dict(), cfg)

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(tmp)
        if cfg.arch != "gpt2":
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE / name, tmp / name)
        if tok is not None:
            if tok.filename != "tokenizer.json":   # cratelm's own file too: import-hf gives it back (same sha256)
                shutil.copyfile(tok.path, tmp / tok.filename)
            try:
                write_hf_tokenizer(tok, tmp, model_max_length=cfg.context)
            except ValueError as e:     # a unigram sentencepiece model
                print(f"cratelm export: warning: {e}; the export holds {tok.filename} but no tokenizer.json",
                      file=sys.stderr)

    atomic_dir(Path(out_dir), fill)
    return Path(out_dir)


def import_hf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``cratelm import-hf SRC DST``: a transformers directory -> a cratelm model directory
    (eval, generate, and ``train.init_from`` read it)."""
    from cratelm.checkpoints import save_model

    model, meta = load_hf(src)
    return save_model(model, model.cfg, dst, tokenizer=meta["tokenizer"], extra={"imported_from": str(src)})


# ------------------------------------------------------------------------------ command line
def add_import_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a transformers model directory (model_type gpt2, or a cratelm CRATE export)")
    p.add_argument("dst", help="output directory (a cratelm model: model.safetensors + config.json)")


def run_import_hf(args: argparse.Namespace) -> int:
    try:
        out = import_hf(args.src, args.dst)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"cratelm import-hf: error: {e}", file=sys.stderr)
        return 1
    print(f"cratelm import-hf: wrote {out}")
    return 0

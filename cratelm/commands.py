"""The CLI layer of the subcommands: ``add_<name>_arguments(parser)`` and a thin
``run_<name>(args) -> exit code`` that turns the arguments into a typed call.

Each subcommand is a function callable from Python with its config or typed arguments:

    show-config       show_config(cfg, docs)                  here
    info              cratelm.model.accounting.model_info(cfg.model)
    import-crate-gpt  cratelm.checkpoints.import_crate_gpt(src, dst, tokenizer)
    generate          generate(checkpoint, prompt, ...)       here
    train             cratelm.train.train(cfg, resume)
    export            cratelm.checkpoints.export(path, out_dir)
    eval              cratelm.evaluate.evaluate_checkpoint(checkpoint, data, ...)
    convert-checkpoint  convert_checkpoint(path, trust)        here (cratelm.train.universal)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from cratelm.config import JobConfig


def add_config_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--config FILES...`` plus trailing ``section.key=value`` overrides (shared by every job)."""
    p.add_argument("--config", nargs="+", default=[], required=required, metavar="YAML",
                   help="config files, merged in order (later wins)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides (win over files)")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The JobConfig of ``--config`` files and overrides (``--config a.yaml k=v`` works too:
    argparse hands words with '=' after --config to the file list; they are overrides)."""
    from cratelm.config import load_config

    files = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c] + list(args.overrides)
    return load_config(files, overrides)


# ------------------------------------------------------------------------------ show-config
def show_config(cfg: JobConfig, docs: bool = False) -> str:
    """The resolved config as YAML, or (``docs``) each field with its one-line documentation."""
    from cratelm.config import SECTIONS, dumps, field_docs

    if not docs:
        return dumps(cfg)
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"{sec}:")
        doc = field_docs(cls)
        lines += [f"  {name}: {json.dumps(value)}  # {doc.get(name, '')}"
                  for name, value in vars(getattr(cfg, sec)).items()]
    return "".join(line + "\n" for line in lines)


def add_show_config_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--docs", action="store_true", help="print each field's one-line documentation too")


def run_show_config(args: argparse.Namespace) -> int:
    print(show_config(config_from_args(args), args.docs), end="")
    return 0


# ------------------------------------------------------------------------------ info
def add_info_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def run_info(args: argparse.Namespace) -> int:
    from cratelm.model.accounting import model_info

    print(json.dumps(model_info(config_from_args(args).model), indent=2))
    return 0


# ------------------------------------------------------------------------------ import-crate-gpt
def add_import_crate_gpt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="the authors' checkpoint (nanoGPT-style ckpt.pt with 'model' and 'model_args')")
    p.add_argument("dst", help="output directory (an exported cratelm model)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model to store beside it (optional)")


def run_import_crate_gpt(args: argparse.Namespace) -> int:
    from cratelm.checkpoints import import_crate_gpt

    out = import_crate_gpt(args.src, args.dst, tokenizer=args.tokenizer)
    print(f"imported {args.src} -> {out}")
    return 0


# ------------------------------------------------------------------------------ generate
def generate(checkpoint: str | os.PathLike, prompt: str = "", tokenizer: str | None = None,
             max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 200, seed: int = 1337,
             num_samples: int = 1, device: str = "cpu", out: TextIO | None = None,
             clamp: list[tuple[int, int, float]] = (), trust: bool = False) -> list[str]:
    """Sample ``num_samples`` continuations of ``prompt`` (empty: start from the EOS token) from
    any model `cratelm.checkpoints.load_model` reads; each is streamed to ``out`` as it grows
    (prompt, text, then a separator line between samples). Returns the continuations.
    ``clamp``: (layer, unit, value) code units held fixed (cratelm.workbench.edit). ``trust``:
    unpickle any class a run directory's files hold (cratelm.train.safe_load).
    Raises ValueError when the tokenizer is missing or differs from the model's."""
    import torch

    from cratelm.checkpoints import load_model
    from cratelm.evaluate import checked_tokenizer
    from cratelm.workbench.edit import set_clamps

    model, meta = load_model(checkpoint, device, trust)
    set_clamps(model, list(clamp))
    tok, _ = checked_tokenizer(tokenizer, meta, str(checkpoint))
    if tok is None:
        raise ValueError(f"{checkpoint} records no tokenizer; pass --tokenizer PATH")
    ids = tok.encode(prompt) if prompt else [tok.eos_id]
    gen = torch.Generator(device=device).manual_seed(seed)
    texts = []
    for n in range(num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        _write(out, prompt)
        shown = 0
        for text in _decoded(tok, model.stream(idx, max_new_tokens, temperature, top_k, generator=gen)):
            _write(out, text[shown:])
            shown = len(text)
        texts.append(text)
        _write(out, "\n" + ("-" * 40 + "\n" if n + 1 < num_samples else ""))
    return texts


def _decoded(tok, stream: Iterator) -> Iterator[str]:
    """The decoded text so far after each new token, held back while it ends in a partial
    character (byte-fallback pieces join up); the whole text at the end."""
    out: list[int] = []
    for nxt in stream:
        out.append(int(nxt))
        text = tok.decode(out)            # decode the whole tail
        if not text.endswith("\ufffd"):
            yield text
    yield tok.decode(out)


def _write(out: TextIO | None, text: str) -> None:
    if out is not None and text:
        out.write(text)
        out.flush()


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="exported model dir, run dir, or authors' .pt file")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the EOS token)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--clamp", action="append", default=[], metavar="LAYER:UNIT=VALUE",
                   help="hold a sparse code unit (gpt2: an MLP neuron) at VALUE while generating; repeatable")
    _add_trust_argument(p)


def _add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle any class the checkpoint files hold (only for files you trust: loading them can "
                        "run code); by default only tensors and DeepSpeed's known classes")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_generate(args: argparse.Namespace) -> int:
    from cratelm.workbench.edit import parse_clamp

    try:
        generate(args.checkpoint, args.prompt, args.tokenizer, args.max_new_tokens, args.temperature, args.top_k,
                 args.seed, args.num_samples, args.device, out=sys.stdout,
                 clamp=[parse_clamp(c) for c in args.clamp], trust=args.trust_checkpoint)
    except ValueError as e:
        raise SystemExit(f"cratelm generate: error: {e}") from None
    return 0


# ------------------------------------------------------------------------------ train
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="auto: the newest complete checkpoint of train.run_dir, or a fresh start if none; "
                             "PATH: a run directory or checkpoint directory")
    parser.add_argument("--discard-newer", action="store_true",
                        help="with --resume of an older checkpoint: move the newer ones aside (STEP.superseded)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment too)")
    parser.add_argument("--verbose", action="store_true", help="DeepSpeed's INFO logs")


def run_train(args: argparse.Namespace) -> int:
    from cratelm.config import ConfigError
    from cratelm.dist import close_process_group
    from cratelm.train import trainer
    from cratelm.train.engine import dist_env

    try:
        cfg = config_from_args(args)
        if args.local_rank is not None:
            dist_env(args.local_rank)
        job = trainer.train(cfg, args.resume, args.verbose, args.discard_newer)
        close_process_group()
    except ConfigError as e:
        print(f"cratelm train: config error: {e}", file=sys.stderr, flush=True)
        return trainer.EXIT_CONFIG
    return job.exit_code


# ------------------------------------------------------------------------------ export
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_CKPT_DIR",
                        help="a run directory (its latest complete checkpoint) or a checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write model.safetensors + config.json")
    parser.add_argument("--format", choices=("cratelm", "hf"), default="cratelm",
                        help="hf: a Hugging Face transformers directory (cratelm/hf/export.py); the path may "
                             "then also be an exported model or an authors' .pt file")
    _add_trust_argument(parser)


def run_export(args: argparse.Namespace) -> int:
    from cratelm.checkpoints import export
    from cratelm.train.safe_load import UnsafeCheckpointError

    try:
        if args.format == "hf":
            from cratelm.hf.export import export_hf

            out = export_hf(args.path, args.out_dir)
        else:
            out = export(args.path, args.out_dir, args.trust_checkpoint)
    except UnsafeCheckpointError as e:
        print(f"cratelm export: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"cratelm export: {e}", file=sys.stderr)
        return 1
    print(f"cratelm export: wrote {out}")
    return 0


# ------------------------------------------------------------------------------ eval
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="exported model dir, training run/checkpoint dir, or an authors' CRATE-GPT .pt file")
    p.add_argument("--data", nargs="+", default=[], help="token shards (dir/val.bin) and/or UTF-8 text files")
    p.add_argument("--stride", type=int, default=None, help="window stride S (default: the context C)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model or tokenizer.json for raw text (default: the checkpoint's)")
    p.add_argument("--json", default=None, help="write {'results': [...]} here")
    p.add_argument("--device", default=None, help="default: this rank's GPU if any, else cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated, instead of --data "
                   "(lambada_openai,wikitext; see cratelm/hf/lm_eval_model.py)")
    p.add_argument("--include-path", default=None, help="--tasks: a directory of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples")
    p.add_argument("--limit", type=float, default=None, help="--tasks: at most this many documents per task")
    _add_trust_argument(p)


def run_eval(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cratelm.dist import close_process_group, rank
    from cratelm.evaluate import evaluate_checkpoint, markdown

    if args.tasks:                      # hand over to lm-evaluation-harness
        from cratelm.hf.lm_eval_model import run_tasks

        return run_tasks(args)
    if not args.data:
        print("cratelm eval: error: pass --data FILES (perplexity) or --tasks TASKS (lm-eval)", file=sys.stderr)
        return 2
    try:
        results = evaluate_checkpoint(args.checkpoint, args.data, args.tokenizer, args.stride, args.batch_size,
                                      args.device, args.dtype, trust=args.trust_checkpoint)
    except (ValueError, FileNotFoundError) as e:   # bad data or tokenizer: the message says what and where
        print(f"cratelm eval: error: {e}", file=sys.stderr)
        return 2
    if rank() == 0:
        print(markdown(results))
        if args.json:
            Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint),
                                                   "results": [asdict(r) for r in results]}, indent=2) + "\n")
    close_process_group()
    return 0


# ------------------------------------------------------------------------------ convert-checkpoint
def convert_checkpoint(path: str | os.PathLike, trust: bool = False) -> Path:
    """A DeepSpeed universal checkpoint beside the checkpoint ``path`` (a run directory: its
    latest complete one), which ``cratelm train --resume`` then loads on any layout
    (cratelm.train.universal). Raises ValueError / FileNotFoundError saying why not."""
    from cratelm.train import checkpoint as ckpt
    from cratelm.train import universal
    from cratelm.train.safe_load import check_files

    tag_dir = ckpt.resolve(path)
    meta = ckpt.read_meta(tag_dir)
    universal.check_convertible(tag_dir, meta, {"world_size": None, "pipeline_stages": None, "zero_stage": 1})
    check_files(tag_dir, trust)                   # ds_to_universal unpickles with weights_only=False
    return universal.convert(tag_dir, meta)


def add_convert_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_OR_CKPT_DIR",
                   help="a run directory (its latest complete checkpoint) or a checkpoint directory")
    _add_trust_argument(p)


def run_convert_checkpoint(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(args.path, args.trust_checkpoint)
    except (OSError, ValueError) as e:
        print(f"cratelm convert-checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"cratelm convert-checkpoint: wrote {out}; `cratelm train --resume {out.parent}` loads it on any "
          "world size, ZeRO stage 1-3 and pipeline layout")
    return 0

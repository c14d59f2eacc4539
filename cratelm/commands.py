"""Small subcommands: show-config, info, import-crate-gpt, generate."""

from __future__ import annotations

import argparse
import json
import sys


def add_config_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--config FILES...`` plus trailing ``section.key=value`` overrides (shared by every job)."""
    p.add_argument("--config", nargs="+", default=[], required=required, metavar="YAML",
                   help="config files, merged in order (later wins)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides (win over files)")


def config_from_args(args: argparse.Namespace):
    """The JobConfig of ``--config`` files and overrides (``--config a.yaml k=v`` works too:
    argparse hands words with '=' after --config to the file list; they are overrides)."""
    from cratelm.config import load_config

    files = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c] + list(args.overrides)
    return load_config(files, overrides)



# ------------------------------------------------------------------------------ show-config
def add_show_config_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--docs", action="store_true", help="print each field's one-line documentation too")


def run_show_config(args: argparse.Namespace) -> int:
    from cratelm.config import SECTIONS, dumps, field_docs

    cfg = config_from_args(args)
    if not args.docs:
        print(dumps(cfg), end="")
        return 0
    for sec, cls in SECTIONS.items():
        print(f"{sec}:")
        docs = field_docs(cls)
        for name, value in vars(getattr(cfg, sec)).items():
            print(f"  {name}: {json.dumps(value)}  # {docs.get(name, '')}")
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
    from cratelm.model.io import import_crate_gpt

    out = import_crate_gpt(args.src, args.dst, tokenizer=args.tokenizer)
    print(f"imported {args.src} -> {out}")
    return 0


# ------------------------------------------------------------------------------ generate
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


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from cratelm.evaluate import checked_tokenizer
    from cratelm.model.io import load_model

    model, meta = load_model(args.checkpoint, args.device)
    try:
        tok, _ = checked_tokenizer(args.tokenizer, meta, str(args.checkpoint))
    except ValueError as e:
        raise SystemExit(f"cratelm generate: error: {e}") from None
    if tok is None:
        raise SystemExit(f"{args.checkpoint} records no tokenizer; pass --tokenizer PATH")
    ids = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    for n in range(args.num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=args.device)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        out: list[int] = []
        shown = 0
        for nxt in model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, generator=gen):
            out.append(int(nxt))
            text = tok.decode(out)            # decode the whole tail: byte-fallback pieces join up
            if not text.endswith("\ufffd"):
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        sys.stdout.write(tok.decode(out)[shown:])
        sys.stdout.write("\n" + ("-" * 40 + "\n" if n + 1 < args.num_samples else ""))
    return 0

"""The ``cratelm`` console script: one subcommand per job, no logic here.

Each subcommand lives in a module that provides ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``cratelm --help`` is fast and optional dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "show-config": ("cratelm.commands", "print the resolved config of YAML files + key=value overrides"),
    "info": ("cratelm.commands", "parameters and FLOPs per token of a model config, as JSON"),
    "import-crate-gpt": ("cratelm.commands", "import a checkpoint saved by the CRATE authors' code"),
    "import-hf": ("cratelm.hf.export", "import a Hugging Face transformers model (gpt2, or a CRATE export)"),
    "bench": ("cratelm.bench.model", "time a training step: tokens/s, TFLOP/s, MFU, memory"),
    "train-tokenizer": ("cratelm.data.cli", "train a lossless sentencepiece tokenizer"),
    "prepare-data": ("cratelm.data.cli", "tokenize corpora into indexed token shards"),
    "verify-data": ("cratelm.data.cli", "check a prepared corpus: every part, count and sha256"),
    "train": ("cratelm.commands", "train a model through DeepSpeed"),
    "export": ("cratelm.commands", "export a consolidated fp32 model from a DeepSpeed checkpoint"),
    "convert-checkpoint": ("cratelm.commands", "make a checkpoint resumable on any layout (DeepSpeed universal)"),
    "eval": ("cratelm.commands", "perplexity of a model on token shards or text files"),
    "generate": ("cratelm.commands", "sample text from a model"),
    "compare": ("cratelm.workbench.compare", "train several model configs under one recipe and tabulate them"),
    "inspect": ("cratelm.workbench.inspect", "HTML report of what each code unit and subspace of a model encodes"),
    "bench-kernels": ("cratelm.bench.kernels", "attention / ISTA / loss kernel benchmarks"),
    "launch-check": ("cratelm.launch_check", "check a multi-node launch before starting it"),
}


def _module(name: str):
    mod_name = SUBCOMMANDS[name][0]
    mod = importlib.import_module(mod_name)
    # a module serving several subcommands names its functions add_<name>_arguments / run_<name>
    key = name.replace("-", "_")
    add = getattr(mod, f"add_{key}_arguments", None) or mod.add_arguments
    run = getattr(mod, f"run_{key}", None) or mod.run
    return add, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `deepspeed -m cratelm train ...` runs `python -m cratelm --local_rank=N train ...`:
    # take the launcher's argument off the front; DeepSpeed also exports LOCAL_RANK
    while argv and argv[0].startswith("--local_rank"):
        flag = argv.pop(0)
        value = flag.split("=", 1)[1] if "=" in flag else (argv.pop(0) if argv else "0")
        os.environ.setdefault("LOCAL_RANK", value)
    parser = argparse.ArgumentParser(prog="cratelm", description="Train and evaluate CRATE language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    add, run = _module(name)
    cmd = argparse.ArgumentParser(prog=f"cratelm {name}", description=SUBCOMMANDS[name][1])
    add(cmd)
    args = cmd.parse_args(argv[1:])
    from cratelm.config import ConfigError

    try:
        return int(run(args) or 0)
    except ConfigError as e:   # a bad config is the user's to fix: no traceback
        print(f"cratelm {name}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The command lines of the data subcommands: ``cratelm train-tokenizer``, ``prepare-data``
and ``verify-data`` (also data_prep/*.py). Only argument parsing and printing here: the work
is `train_tokenizer`, `prepare_corpus` and `verify_corpus`, callable from Python."""

from __future__ import annotations

import argparse
import json
import os
import sys

from cratelm.data import sources as src_lib
from cratelm.data.prepare import (MAX_FILE_BYTES, TOKENIZER_SAMPLE_BYTES, TokenizerMismatchError, finalize,
                                  prepare_corpus)
from cratelm.data.tokenizer import MODEL_TYPES, train_tokenizer
from cratelm.data.verify import verify_corpus

ERRORS = (src_lib.BadInputError, TokenizerMismatchError, ValueError, OSError, RuntimeError)


def _print(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) is not an error worth a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Input selection flags shared by train-tokenizer and prepare-data."""
    p.add_argument("inputs", nargs="*", help="files, directories, globs (quoted), or hf:NAME hub datasets")
    p.add_argument("--corpus", choices=src_lib.CORPORA, default=None,
                   help="an embedded corpus: python-stdlib = this Python's standard library .py files")
    p.add_argument("--text-key", default="text", help="field / column holding the text in jsonl, json, parquet")
    p.add_argument("--one-doc-per-line", action="store_true", help="in text files, each line is a document")
    p.add_argument("--on-bad-utf8", choices=src_lib.BAD_UTF8_POLICIES, default="skip",
                   help="invalid UTF-8 or a lone surrogate: skip the document (counted), replace by U+FFFD, or fail")
    p.add_argument("--hub-split", default="train", help="split of hf:NAME datasets")
    p.add_argument("--hub-config", default=None, help="config name of hf:NAME datasets")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Tokenizer training flags shared by train-tokenizer and prepare-data."""
    p.add_argument("--vocab-size", type=int, default=8192, help="pieces in the vocabulary (default 8192)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                   help="user-defined symbols, always one token each (e.g. '<|im_start|>')")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=TOKENIZER_SAMPLE_BYTES,
                   help=f"train the tokenizer on a seeded sample of about this many bytes of input "
                        f"(default {TOKENIZER_SAMPLE_BYTES >> 20} MiB; 0 = all)")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="then on a seeded sample of at most this many lines of it")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                   help="let pieces hold several digits (default: one digit per piece)")
    p.add_argument("--tokenizer-threads", type=int, default=2, help="sentencepiece trainer threads")


def _training_options(args: argparse.Namespace) -> dict:
    return {"character_coverage": args.character_coverage, "special_tokens": args.special_tokens,
            "input_sentence_size": args.input_sentence_size, "split_digits": args.split_digits,
            "num_threads": args.tokenizer_threads}


# ------------------------------------------------------------------------------ train-tokenizer
def add_train_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``cratelm train-tokenizer`` / data_prep/train_tokenizer.py."""
    add_input_arguments(p)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    add_training_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Train a tokenizer from parsed ``args``; print what was made."""
    report = src_lib.SkipReport()
    try:
        tok = train_tokenizer(args.inputs, args.out, args.vocab_size, args.model_type, corpus=args.corpus,
                              text_key=args.text_key, one_doc_per_line=args.one_doc_per_line,
                              on_bad_utf8=args.on_bad_utf8, hub_split=args.hub_split, hub_config=args.hub_config,
                              sample_bytes=args.tokenizer_sample_bytes or None, report=report, seed=args.seed,
                              verbose=args.verbose, **_training_options(args))
    except ERRORS as e:
        print(f"train-tokenizer: error: {e}", file=sys.stderr)
        return 1
    _print(f"wrote {tok.path} (vocab {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.sha256})"
           + (f"\nskipped {report.total} inputs: {report.counts} (first: {report.examples})" if report.total else ""))
    return 0


# ------------------------------------------------------------------------------ prepare-data
def add_prepare_data_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``cratelm prepare-data`` / data_prep/tokenize_corpus.py."""
    add_input_arguments(p)
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model or Hugging Face tokenizer.json to use (default: train a "
                        "sentencepiece model on a sample of the inputs, see --vocab-size)")
    p.add_argument("--val", default="0.005", help="validation split: a fraction (0.005) or a document count (50)")
    p.add_argument("--test", default="0", help="test split: a fraction or a document count (default none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of the tokenizer's sample)")
    p.add_argument("--num-proc", type=int, default=min(os.cpu_count() or 1, 8), help="tokenizer worker processes")
    p.add_argument("--num-shards", type=int, default=1, help="machines (or array tasks) sharing the work")
    p.add_argument("--shard-index", type=int, default=0, help="which of them this run is (0-based)")
    p.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES, help="size bound of each token file")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto", help="token dtype")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents (trials)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_training_arguments(p)


def run_prepare_data(args: argparse.Namespace) -> int:
    """Prepare a corpus from parsed ``args``; print the summary."""
    try:
        summary = prepare_corpus(
            args.inputs, args.out, args.tokenizer, corpus=args.corpus, val=args.val, test=args.test,
            seed=args.seed, num_proc=args.num_proc, text_key=args.text_key, one_doc_per_line=args.one_doc_per_line,
            on_bad_utf8=args.on_bad_utf8, dtype=args.dtype, max_documents=args.max_documents,
            hub_split=args.hub_split, hub_config=args.hub_config, vocab_size=args.vocab_size,
            model_type=args.model_type, progress=args.progress, tokenizer_options=_training_options(args),
            tokenizer_sample_bytes=args.tokenizer_sample_bytes or None, num_shards=args.num_shards,
            shard_index=args.shard_index, max_file_bytes=args.max_file_bytes)
    except ERRORS as e:
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 1
    _print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    """A human-readable summary of `prepare_corpus`'s result."""
    part = f" (part {s['part']} of {s['num_shards']})" if s["num_shards"] > 1 else ""
    lines = [f"prepared {s['out_dir']}{part}: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}), "
             f"{s['bytes']:,} bytes of text ({s['bytes'] / max(s['tokens'] - s['documents'], 1):.2f} bytes/token)",
             f"  tokenize: {s['tokenize_seconds']:.1f} s, {s['tokens_per_s']:,.0f} tokens/s, "
             f"{s['mb_per_s']:.2f} MB/s with {s['num_proc']} workers"
             + (f"; tokenizer training {s['tokenizer_seconds']:.1f} s" if s["tokenizer_trained"] else "")
             + f"; total {s['seconds']:.1f} s"]
    for name, sp in s["splits"].items():
        lines.append(f"  {name:5s}: {sp['num_documents']:,} documents, {sp['num_tokens']:,} tokens, "
                     f"{sp['num_bytes']:,} bytes in {len(sp['files'])} file(s)")
    lines.append(f"  tokenizer: {s['tokenizer']} (sha256 {s['tokenizer_sha256'][:16]}...)")
    if not s["complete"]:
        lines.append("  the corpus is not complete yet: meta.json is written when the last part finishes")
    sk = s["skipped"]
    if sk["total"]:
        lines.append(f"  skipped {sk['total']} inputs:")
        for reason, n in sk["counts"].items():
            lines.append(f"    {n:6d}  {reason}  (e.g. {', '.join(sk['examples'][reason][:3])})")
    if sk["replaced_utf8"]:
        lines.append(f"  {sk['replaced_utf8']} documents had invalid UTF-8 replaced by U+FFFD")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ verify-data
def add_verify_data_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``cratelm verify-data``."""
    p.add_argument("corpus", help="a prepared corpus directory")
    p.add_argument("--no-hashes", dest="hashes", action="store_false", help="sizes and indexes only (fast)")
    p.add_argument("--finalize", action="store_true", help="write meta.json if every part is there")


def run_verify_data(args: argparse.Namespace) -> int:
    """Verify a corpus; print each problem; exit 1 if any."""
    if args.finalize:
        finalize(args.corpus)
    problems = verify_corpus(args.corpus, hashes=args.hashes)
    _print("\n".join(problems) if problems else f"{args.corpus}: complete and consistent")
    return 1 if problems else 0

"""Prepare a corpus: read documents, tokenize them in parallel, split by document, write
token shards (format: docs/data-format.md).

    cratelm prepare-data --corpus python-stdlib --out data/stdlib          # trains a tokenizer too
    cratelm prepare-data data/raw/*.jsonl --text-key text --tokenizer tok.model --out data/mine \\
        --val 0.005 --test 1000 --num-proc 8

OUT/ receives train.bin/.idx, val.bin/.idx (test.* if asked), tokenizer.model (or the given
tokenizer.json) and meta.json.
Robustness: everything is built in OUT/.partial-PID/ and moved into place only when complete;
meta.json is written LAST, so a killed run never leaves a corpus that looks complete, and the
previous corpus in OUT/ stays usable until the new one is ready. A rerun starts over cleanly.
An OUT/ whose meta.json names another tokenizer is never overwritten.

Pipeline: the main thread reads and batches documents; ``num_proc`` threads encode batches
(sentencepiece releases the GIL, so threads scale without pickling text to processes; measured
faster than ``datasets.map(num_proc=...)`` on 2 cores, see cratelm/data/bench.py); results
are written in input order to one temporary token file; the split then copies each document
to its split's shard. The output is the same bytes for every ``num_proc``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cratelm.data import sources as src_lib
from cratelm.data.indexed import META_FILE, ShardWriter, choose_dtype, read_index, write_json_atomic
from cratelm.data.tokenizer import (Tokenizer, add_input_arguments, add_training_arguments, load_tokenizer,
                                    train_tokenizer_on_texts)

SPLITS = ("train", "val", "test")
FORMAT = "cratelm-tokens"
FORMAT_VERSION = 1
_BATCH_CHARS = 1 << 18        # ~256 KiB of text per encode batch
_SPLIT_CHUNK_TOKENS = 1 << 23


class TokenizerMismatchError(ValueError):
    """OUT/ holds a corpus made with another tokenizer."""


# ------------------------------------------------------------------------------ splits
def parse_split_size(text: str | float | int) -> float | int:
    """``"0.005"`` -> 0.005 (a fraction of the documents), ``"50"`` -> 50 (a count)."""
    if isinstance(text, (int, float)):
        value: float | int = text
    else:
        try:
            value = float(text) if any(ch in text for ch in ".eE") else int(text)
        except ValueError:
            raise ValueError(f"split size {text!r}: expected a fraction like 0.005 or a count like 50") from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise ValueError(f"split size {text!r}: a fraction must be in [0, 1), a count >= 0")
    return value


def split_counts(num_documents: int, val: float | int, test: float | int = 0) -> dict[str, int]:
    """Documents per split. A fraction f gives round(f N) documents, at least 1 when f > 0."""
    counts = {}
    for name, size in (("val", val), ("test", test)):
        size = parse_split_size(size)
        counts[name] = max(1, round(size * num_documents)) if isinstance(size, float) and size > 0 else int(size)
    counts["train"] = num_documents - counts["val"] - counts["test"]
    if counts["train"] < 1:
        raise ValueError(f"val={val} ({counts['val']} documents) and test={test} ({counts['test']} documents) "
                         f"leave no training documents out of {num_documents}")
    return counts


def assign_splits(num_documents: int, counts: dict[str, int], seed: int) -> np.ndarray:
    """Split of each document (an index into `SPLITS`): val and test are drawn by a permutation
    seeded by ``seed``; each split keeps the documents in corpus order."""
    perm = np.random.default_rng(seed).permutation(num_documents)
    labels = np.zeros(num_documents, np.uint8)
    labels[perm[: counts["val"]]] = SPLITS.index("val")
    labels[perm[counts["val"]: counts["val"] + counts["test"]]] = SPLITS.index("test")
    return labels


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# ------------------------------------------------------------------------------ tokenization
def tokenize_to_shard(docs: Any, tokenizer: Tokenizer, writer: ShardWriter, num_proc: int = 1,
                      max_documents: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Encode the documents of iterator ``docs`` (each + EOS) with ``num_proc`` threads and
    append them to ``writer`` in input order. Returns counts, UTF-8 bytes per document and timings."""

    def encode(batch: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, lens = tokenizer.encode_documents(batch)
        return ids, lens, np.fromiter(map(_utf8_len, batch), np.int64, len(batch))

    doc_bytes: list[np.ndarray] = []
    stats = {"documents": 0, "tokens": 0, "write_seconds": 0.0}

    def consume(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        ids, lens, nbytes = result
        t = time.perf_counter()
        writer.write(ids, lens)
        stats["write_seconds"] += time.perf_counter() - t
        doc_bytes.append(nbytes)
        stats["documents"] += len(lens)
        stats["tokens"] += len(ids)
        if progress is not None:
            progress.update(int(nbytes.sum()))
            progress.set_postfix(docs=stats["documents"], tokens=stats["tokens"], refresh=False)

    def batches():
        batch: list[str] = []
        chars = n = 0
        for doc in docs:
            batch.append(doc)
            chars += len(doc)
            n += 1
            if chars >= _BATCH_CHARS or len(batch) >= 4096:
                yield batch
                batch, chars = [], 0
            if max_documents is not None and n >= max_documents:
                break
        if batch:
            yield batch

    if num_proc <= 1:
        for batch in batches():
            consume(encode(batch))
    else:
        with ThreadPoolExecutor(num_proc, thread_name_prefix="tokenize") as pool:
            pending: deque[Future] = deque()
            try:
                for batch in batches():
                    pending.append(pool.submit(encode, batch))
                    while len(pending) > 2 * num_proc or (pending and pending[0].done()):
                        consume(pending.popleft().result())
                while pending:
                    consume(pending.popleft().result())
            finally:
                for f in pending:
                    f.cancel()
    stats["doc_bytes"] = np.concatenate(doc_bytes) if doc_bytes else np.zeros(0, np.int64)
    return stats


def write_splits(all_bin: Path, labels: np.ndarray, dtype: str, out_dir: Path) -> dict[str, dict[str, int]]:
    """Copy each document of ``all_bin`` to its split's shard ``out_dir/NAME.bin`` (in corpus
    order); return per split {num_tokens, num_documents}. Splits with no document are not written."""
    _, offsets = read_index(all_bin.with_suffix(".idx"))
    tokens = np.memmap(all_bin, dtype=dtype, mode="r")
    lengths = np.diff(offsets)
    present = [k for k in range(len(SPLITS)) if np.any(labels == k)]
    writers = {k: ShardWriter(out_dir / f"{SPLITS[k]}.bin", dtype) for k in present}
    try:
        start = 0
        while start < len(labels):      # chunks of whole documents, ~8M tokens each
            stop = int(np.searchsorted(offsets, offsets[start] + _SPLIT_CHUNK_TOKENS, side="right"))
            stop = min(max(stop - 1, start + 1), len(labels))
            chunk = np.asarray(tokens[offsets[start]: offsets[stop]])
            chunk_labels = labels[start:stop]
            token_labels = np.repeat(chunk_labels, lengths[start:stop])
            for k, w in writers.items():
                sel = chunk_labels == k
                if sel.any():
                    w.write(chunk if sel.all() else chunk[token_labels == k], lengths[start:stop][sel])
            start = stop
        result = {}
        for k, w in writers.items():
            offs = w.close()
            result[SPLITS[k]] = {"num_tokens": int(offs[-1]), "num_documents": len(offs) - 1}
        return result
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


# ------------------------------------------------------------------------------ the corpus
def _check_existing(out_dir: Path, tokenizer: Tokenizer) -> dict | None:
    """The meta.json already in ``out_dir`` (None if absent); refuse another tokenizer's corpus."""
    path = out_dir / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerMismatchError(f"{path} exists but cannot be read ({e}); remove {out_dir} first") from None
    if meta.get("tokenizer_sha256") != tokenizer.sha256:
        raise TokenizerMismatchError(
            f"{out_dir} holds a corpus made with tokenizer sha256 {meta.get('tokenizer_sha256')} "
            f"({meta.get('tokenizer')}); refusing to overwrite it with tokens of {tokenizer.path} "
            f"(sha256 {tokenizer.sha256}). Choose another --out, remove {out_dir}, or pass "
            f"--tokenizer {out_dir / tokenizer.filename}")
    return meta


def _clean_stale_partials(out_dir: Path) -> None:
    """Remove the temporary directories of killed runs; refuse to run beside a live one."""
    for d in out_dir.glob(".partial-*"):
        try:
            pid = int(d.name.split("-", 1)[1])
            os.kill(pid, 0)                      # raises if no such process
        except (ValueError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
            continue
        except PermissionError:                  # alive, another user's
            pass
        raise RuntimeError(f"{d}: another preparation (pid {pid}) is writing {out_dir}; wait for it, "
                           f"or remove {d} if that process is not a preparation")


def _install(out: Path, partial: Path, tok: Tokenizer, splits: list[str], given_tokenizer: str | None,
             meta: dict) -> None:
    """Move the finished shards and tokenizer from ``partial`` into ``out``: remove the old
    meta.json first (the directory is incomplete from then on) and write the new one last."""
    old = _check_existing(out, tok)
    (out / META_FILE).unlink(missing_ok=True)
    for name in (old or {}).get("splits", {}):
        for ext in (".bin", ".idx"):
            (out / f"{name}{ext}").unlink(missing_ok=True)
    for name in splits:
        for ext in (".bin", ".idx"):
            os.replace(partial / f"{name}{ext}", out / f"{name}{ext}")
    if given_tokenizer is None:                                  # trained into partial/
        os.replace(partial / "tokenizer.vocab", out / "tokenizer.vocab")
        os.replace(partial / "tokenizer.model", out / "tokenizer.model")
    elif Path(given_tokenizer).resolve() != (out / tok.filename).resolve():
        vocab = Path(given_tokenizer).with_suffix(".vocab")      # the human-readable piece list, if any
        if vocab.exists():
            shutil.copyfile(vocab, partial / "tokenizer.vocab")
            os.replace(partial / "tokenizer.vocab", out / "tokenizer.vocab")
        else:
            (out / "tokenizer.vocab").unlink(missing_ok=True)
        shutil.copyfile(given_tokenizer, partial / tok.filename)
        os.replace(partial / tok.filename, out / tok.filename)
    write_json_atomic(out / META_FILE, meta)


def prepare_corpus(inputs: list[Any] | None, out_dir: str | os.PathLike, tokenizer: str | None = None, *,
                   corpus: str | None = None, val: float | int | str = 0.005, test: float | int | str = 0,
                   seed: int = 0, num_proc: int = 1, text_key: str = "text", one_doc_per_line: bool = False,
                   on_bad_utf8: str = "skip", dtype: str = "auto", max_documents: int | None = None,
                   hub_split: str = "train", hub_config: str | None = None, vocab_size: int = 8192,
                   model_type: str = "bpe", tokenizer_options: dict[str, Any] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` (files, directories, globs, ``hf:NAME``, Dataset objects) and/or the
    embedded ``corpus`` into ``out_dir`` and return the summary (also printed by `run`).

    ``tokenizer``: a sentencepiece model; None trains one on the same inputs (``vocab_size``,
    ``model_type`` and ``tokenizer_options`` for `train_tokenizer_on_texts`). ``val`` / ``test``:
    fractions (0.005) or document counts (50). ``max_documents`` stops early (quick trials).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    val, test = parse_split_size(val), parse_split_size(test)
    report = src_lib.SkipReport()
    sources = src_lib.resolve_inputs(inputs, corpus, hub_split=hub_split, hub_config=hub_config,
                                     num_proc=num_proc if num_proc > 1 else None)
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)    # sentencepiece, or a Hugging Face tokenizer.json
        _check_existing(out, tok)          # before any work
    partial = out / f".partial-{os.getpid()}"
    partial.mkdir()
    try:
        t_tok = time.perf_counter()
        if tokenizer is None:
            texts = src_lib.iter_documents(sources, text_key=text_key, one_doc_per_line=one_doc_per_line,
                                           on_bad_utf8=on_bad_utf8, report=src_lib.SkipReport())
            texts = itertools.islice(texts, max_documents)   # None = all
            tok = train_tokenizer_on_texts(texts, str(partial / "tokenizer"), vocab_size, model_type,
                                           **{"seed": seed, **(tokenizer_options or {})})
            _check_existing(out, tok)
        t_tok = time.perf_counter() - t_tok
        if not tok.lossless:
            print(f"prepare: warning: {tok.path} was not trained with the lossless options "
                  f"(see cratelm/data/tokenizer.py): decoding may not give back the exact text", file=sys.stderr)
        dtype = choose_dtype(tok.vocab_size, dtype)

        # 1. tokenize everything, in input order, into one temporary shard
        from tqdm.auto import tqdm
        bar = tqdm(total=None if max_documents else src_lib.source_bytes(sources), unit="B", unit_scale=True,
                   desc=f"tokenize -> {out}", disable=not progress, dynamic_ncols=True)
        docs = src_lib.iter_documents(sources, text_key=text_key, one_doc_per_line=one_doc_per_line,
                                      on_bad_utf8=on_bad_utf8, report=report)
        writer = ShardWriter(partial / "all.bin", dtype)
        t_enc = time.perf_counter()
        try:
            stats = tokenize_to_shard(docs, tok, writer, num_proc, max_documents, bar)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        t_enc = time.perf_counter() - t_enc
        n_docs = stats["documents"]
        if n_docs == 0:
            raise src_lib.BadInputError(f"no documents to tokenize: {report.total} inputs skipped {report.counts} "
                                        f"(first: {report.examples})")

        # 2. split by whole documents
        t_split = time.perf_counter()
        counts = split_counts(n_docs, val, test)
        labels = assign_splits(n_docs, counts, seed)
        splits = write_splits(partial / "all.bin", labels, dtype, partial)
        for name, info in splits.items():
            info["num_bytes"] = int(stats["doc_bytes"][labels == SPLITS.index(name)].sum())
        t_split = time.perf_counter() - t_split

        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "tokenizer": tok.filename, "tokenizer_sha256": tok.sha256,
            "inputs": [str(i) if isinstance(i, (str, os.PathLike)) else f"<{type(i).__name__}>" for i in inputs or []]
            + ([src_lib.describe_corpus(corpus)] if corpus else []),
            "num_tokens": stats["tokens"], "num_documents": n_docs, "num_bytes": int(stats["doc_bytes"].sum()),
            "splits": splits, "split_seed": seed, "split_sizes": {"val": val, "test": test},
            "text_key": text_key, "one_doc_per_line": one_doc_per_line, "on_bad_utf8": on_bad_utf8,
            "max_documents": max_documents, "skipped": report.as_dict(),
        }
        assert sum(s["num_tokens"] for s in splits.values()) == meta["num_tokens"]

        # 3. move into place; meta.json last
        t_move = time.perf_counter()
        _install(out, partial, tok, list(splits), tokenizer, meta)
        t_move = time.perf_counter() - t_move
    finally:
        shutil.rmtree(partial, ignore_errors=True)

    seconds = time.perf_counter() - t_start
    return {
        "out_dir": str(out), "documents": n_docs, "tokens": stats["tokens"], "bytes": meta["num_bytes"],
        "splits": splits, "skipped": report.as_dict(), "tokenizer": str(out / tok.filename),
        "tokenizer_sha256": tok.sha256, "tokenizer_trained": tokenizer is None, "dtype": dtype,
        "num_proc": num_proc, "seconds": seconds, "tokenizer_seconds": t_tok, "tokenize_seconds": t_enc,
        "write_seconds": stats["write_seconds"] + t_split + t_move,
        "tokens_per_s": stats["tokens"] / t_enc if t_enc else 0.0,
        "mb_per_s": meta["num_bytes"] / 1e6 / t_enc if t_enc else 0.0,
    }


def format_summary(s: dict[str, Any]) -> str:
    """A human-readable summary of `prepare_corpus`'s result."""
    lines = [f"prepared {s['out_dir']}: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}), "
             f"{s['bytes']:,} bytes of text ({s['bytes'] / max(s['tokens'] - s['documents'], 1):.2f} bytes/token)",
             f"  tokenize: {s['tokenize_seconds']:.1f} s, {s['tokens_per_s']:,.0f} tokens/s, "
             f"{s['mb_per_s']:.2f} MB/s with {s['num_proc']} workers; writing shards {s['write_seconds']:.2f} s"
             + (f"; tokenizer training {s['tokenizer_seconds']:.1f} s" if s["tokenizer_trained"] else "")
             + f"; total {s['seconds']:.1f} s"]
    for name, sp in s["splits"].items():
        lines.append(f"  {name:5s}: {sp['num_documents']:,} documents, {sp['num_tokens']:,} tokens, "
                     f"{sp['num_bytes']:,} bytes")
    lines.append(f"  tokenizer: {s['tokenizer']} (sha256 {s['tokenizer_sha256'][:16]}...)")
    sk = s["skipped"]
    if sk["total"]:
        lines.append(f"  skipped {sk['total']} inputs:")
        for reason, n in sk["counts"].items():
            lines.append(f"    {n:6d}  {reason}  (e.g. {', '.join(sk['examples'][reason][:3])})")
    if sk["replaced_utf8_files"]:
        lines.append(f"  {sk['replaced_utf8_files']} files had invalid UTF-8 replaced by U+FFFD")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``cratelm prepare-data`` / data_prep/tokenize_corpus.py."""
    add_input_arguments(p)
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model or Hugging Face tokenizer.json to use (default: train a "
                        "sentencepiece model on the inputs, see --vocab-size)")
    p.add_argument("--val", default="0.005", help="validation split: a fraction (0.005) or a document count (50)")
    p.add_argument("--test", default="0", help="test split: a fraction or a document count (default none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (and of the tokenizer's line sample)")
    p.add_argument("--num-proc", type=int, default=min(os.cpu_count() or 1, 8), help="tokenizer workers")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto", help="token dtype in .bin")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents (trials)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Prepare a corpus from parsed ``args``; print the summary."""
    try:
        summary = prepare_corpus(
            args.inputs, args.out, args.tokenizer, corpus=args.corpus, val=args.val, test=args.test,
            seed=args.seed, num_proc=args.num_proc, text_key=args.text_key, one_doc_per_line=args.one_doc_per_line,
            on_bad_utf8=args.on_bad_utf8, dtype=args.dtype, max_documents=args.max_documents,
            hub_split=args.hub_split, hub_config=args.hub_config, vocab_size=args.vocab_size,
            model_type=args.model_type, progress=args.progress,
            tokenizer_options={"character_coverage": args.character_coverage, "special_tokens": args.special_tokens,
                               "input_sentence_size": args.input_sentence_size, "split_digits": args.split_digits,
                               "num_threads": args.tokenizer_threads})
    except (src_lib.BadInputError, TokenizerMismatchError, ValueError, OSError, RuntimeError) as e:
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0

"""Prepare a corpus: read documents as a stream, tokenize them over worker processes, split
them by document, write bounded token files (format: docs/data-format.md).

    cratelm prepare-data --corpus python-stdlib --out data/stdlib          # trains a tokenizer too
    cratelm prepare-data data/raw/*.jsonl --text-key text --tokenizer tok.model --out data/mine \\
        --val 0.005 --test 1000 --num-proc 8
    cratelm prepare-data 'web/*.jsonl' --tokenizer tok.model --out data/web --num-shards 64 --shard-index 7

Memory does not grow with the corpus: inputs are read in tasks of ~4 MiB (reading.py), at most
2 x num_proc in flight (pipeline.py), and shards are written as they come (`SplitWriter`).
Splits: a document is in ``val`` when its draw (a hash of seed, source name and position, so
the same on every machine) is below the val fraction, in ``test`` when above 1 - the test
fraction; a count (``--val 50``) holds out the documents of smallest (test: largest) draws.
``--num-shards N --shard-index I``: this run takes the I-th contiguous slice of the input
tasks and writes part I; the parts in order are the corpus prepared in one go, token for token.

Robustness: a part is built in OUT/.partial-HOST-PID/ and renamed into place only when
complete; meta.json is removed first and written LAST (by whichever part completes the set),
so a killed run never leaves a corpus that looks complete. An OUT/ whose corpus was made by
another tokenizer is never overwritten.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cratelm.data import sources as src_lib
from cratelm.data.indexed import (META_FILE, PART_FILE, SplitWriter, choose_dtype, part_name,
                                  write_json_atomic)
from cratelm.data.pipeline import encode_tasks
from cratelm.data.reading import SkipLocator, iter_documents
from cratelm.data.tasks import ReadOptions, dataset_tasks, plan_tasks, sample_tasks
from cratelm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer_on_texts

SPLITS = ("train", "val", "test")
FORMAT = "cratelm-tokens"
FORMAT_VERSION = 2
MAX_FILE_BYTES = 2 << 30
TOKENIZER_SAMPLE_BYTES = 256 << 20


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


class Splitter:
    """Assigns documents to splits by their draws, writing them in input order: fractions at
    once; counts through a holdout heap of that many documents (written at `finish`; a
    document pushed out of it goes to train then)."""

    def __init__(self, writers: dict[str, SplitWriter], val: float | int, test: float | int) -> None:
        self.writers = writers
        self.fraction = {n: v for n, v in (("val", val), ("test", test)) if isinstance(v, float)}
        if sum(self.fraction.values()) >= 1:
            raise ValueError(f"val={val} + test={test} leave no training documents")
        self.count = {n: v for n, v in (("val", val), ("test", test)) if isinstance(v, int) and v > 0}
        self.heaps: dict[str, list] = {n: [] for n in self.count}
        self.seq = 0

    def add(self, ids: np.ndarray, lens: np.ndarray, nbytes: np.ndarray, draws: np.ndarray) -> None:
        labels = np.zeros(len(lens), np.int8)
        labels[draws < self.fraction.get("val", 0.0)] = 1
        labels[draws >= 1 - self.fraction.get("test", 0.0)] = 2
        ends = np.cumsum(lens)
        starts = ends - lens
        for k in (0, 1, 2):
            sel = labels == k
            if not sel.any() or (k == 0 and self.count):
                continue
            toks = ids if sel.all() else ids[np.repeat(sel, lens)]
            self.writers[SPLITS[k]].write(toks, lens[sel], int(nbytes[sel].sum()))
        if self.count:       # train candidates go through the holdouts, one by one
            for j in np.flatnonzero(labels == 0):
                self._hold((float(draws[j]), ids[starts[j]: ends[j]], int(nbytes[j])))

    def _hold(self, doc: tuple[float, np.ndarray, int]) -> None:
        """Offer ``doc`` (draw, tokens, bytes) to each holdout; what none keeps goes to train."""
        for name, heap in self.heaps.items():
            self.seq += 1
            item = (-doc[0] if name == "val" else doc[0], self.seq, doc)   # the heap's root is evicted first
            if len(heap) < self.count[name]:
                heapq.heappush(heap, item)
                return
            doc = heapq.heappushpop(heap, item)[2]
        self.writers["train"].write(doc[1], np.array([len(doc[1])]), doc[2])

    def finish(self) -> None:
        for name, heap in self.heaps.items():
            for _, _, (_, toks, nb) in sorted(heap, key=lambda e: e[1]):     # input order
                self.writers[name].write(toks, np.array([len(toks)]), nb)


# ------------------------------------------------------------------------------ the corpus
def _check_existing(out_dir: Path, tokenizer: Tokenizer) -> dict | None:
    """The meta.json already in ``out_dir`` (None if absent); refuse another tokenizer's corpus."""
    for path in [out_dir / META_FILE, *sorted(out_dir.glob(f"part-*/{PART_FILE}"))]:
        if not path.exists():
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerMismatchError(f"{path} exists but cannot be read ({e}); remove {out_dir} first") from None
        sha = meta.get("tokenizer_sha256") or meta.get("settings", {}).get("tokenizer_sha256")
        if sha != tokenizer.sha256:
            raise TokenizerMismatchError(
                f"{out_dir} holds a corpus made with tokenizer sha256 {sha}; refusing to "
                f"overwrite it with tokens of {tokenizer.path} (sha256 {tokenizer.sha256}). Choose another --out, "
                f"remove {out_dir}, or pass --tokenizer {out_dir / tokenizer.filename}")
    return None


def _clean_stale_partials(out_dir: Path) -> None:
    """Remove this host's temporary directories of killed runs; refuse to run beside a live one.
    (Other hosts' are left alone: their process ids mean nothing here.)"""
    host = socket.gethostname()
    for d in out_dir.glob(f".partial-{host}-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)                      # raises if no such process
        except (ValueError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
            continue
        except PermissionError:                  # alive, another user's
            pass
        raise RuntimeError(f"{d}: another preparation (pid {pid}) is writing {out_dir}; wait for it, "
                           f"or remove {d} if that process is not a preparation")


def _install_tokenizer(out: Path, partial: Path, given: str | None, filename: str) -> None:
    """Copy the tokenizer (sentencepiece .model + its .vocab, or a tokenizer.json) into ``out``."""
    if given is not None and Path(given).resolve() == (out / filename).resolve():
        return
    if given is None:                                              # trained into partial/: .model last
        for ext in (".vocab", ".model"):
            os.replace(partial / f"tokenizer{ext}", out / f"tokenizer{ext}")
        return
    vocab = Path(given).with_suffix(".vocab")                      # the piece list of a sentencepiece model
    if filename == "tokenizer.model" and vocab.exists():
        shutil.copyfile(vocab, partial / "copy.vocab")
        os.replace(partial / "copy.vocab", out / "tokenizer.vocab")
    else:
        (out / "tokenizer.vocab").unlink(missing_ok=True)
    shutil.copyfile(given, partial / "copy")
    os.replace(partial / "copy", out / filename)


def _install_part(out: Path, partial: Path, part: str, num_shards: int) -> None:
    """Move the finished part into ``out``: meta.json goes first (the corpus is incomplete from
    then on), with the flat files of a version 1 corpus and the parts of another sharding."""
    (out / META_FILE).unlink(missing_ok=True)
    for old in out.glob("part-*"):
        if old.name == part or not old.name.endswith(f"-of-{num_shards:05d}"):
            shutil.rmtree(old)
    for old in out.glob("*.bin"):
        old.unlink()
    for old in out.glob("*.idx"):
        old.unlink()
    os.replace(partial / part, out / part)


def finalize(out_dir: str | os.PathLike) -> dict | None:
    """Write meta.json when every part is complete and they agree; return it (None while
    parts are missing). Cheap (reads the part.json files); several parts may call it at once."""
    out = Path(out_dir)
    infos = sorted(out.glob(f"part-*/{PART_FILE}"))
    if not infos:
        return None
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in infos]
    n = parts[0]["settings"]["num_shards"]
    if len(parts) != n or any(p["settings"] != parts[0]["settings"] for p in parts):
        return None
    report = src_lib.SkipReport()
    report.merge(parts[0]["skipped_inputs"])
    splits: dict[str, dict[str, int]] = {}
    for p in parts:
        report.merge(p["skipped"])
        for name, s in p["splits"].items():
            tot = splits.setdefault(name, {"num_tokens": 0, "num_documents": 0, "num_bytes": 0})
            for k in tot:
                tot[k] += s[k]
    splits = {k: v for k, v in splits.items() if v["num_documents"]}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **parts[0]["settings"],
            "parts": [p.parent.name for p in infos], "splits": splits, "skipped": report.as_dict(),
            **{k: sum(s[k] for s in splits.values()) for k in ("num_tokens", "num_documents", "num_bytes")}}
    write_json_atomic(out / META_FILE, meta)
    return meta


def prepare_corpus(inputs: list[Any] | None, out_dir: str | os.PathLike, tokenizer: str | None = None, *,
                   corpus: str | None = None, val: float | int | str = 0.005, test: float | int | str = 0,
                   seed: int = 0, num_proc: int = 1, text_key: str = "text", one_doc_per_line: bool = False,
                   on_bad_utf8: str = "skip", dtype: str = "auto", max_documents: int | None = None,
                   hub_split: str = "train", hub_config: str | None = None, vocab_size: int = 8192,
                   model_type: str = "bpe", tokenizer_options: dict[str, Any] | None = None,
                   tokenizer_sample_bytes: int | None = TOKENIZER_SAMPLE_BYTES, num_shards: int = 1,
                   shard_index: int = 0, max_file_bytes: int = MAX_FILE_BYTES, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``inputs`` (files, directories, globs, ``hf:NAME``, Dataset objects) and/or the
    embedded ``corpus`` into ``out_dir`` (part ``shard_index`` of ``num_shards``); return the
    summary (printed by ``cratelm prepare-data``).

    ``tokenizer``: a sentencepiece model; None trains one on a seeded sample of about
    ``tokenizer_sample_bytes`` of the inputs (None: all). ``val`` / ``test``: fractions (0.005)
    or document counts (50, one part only). ``max_documents`` stops early (quick trials).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a directory")
    val, test = parse_split_size(val), parse_split_size(test)
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} not in [0, --num-shards {num_shards})")
    if num_shards > 1 and tokenizer is None:
        raise ValueError("--num-shards > 1 needs --tokenizer: every part must use the same one (train it first "
                         "with `cratelm train-tokenizer`)")
    if num_shards > 1 and (isinstance(val, int) and val or isinstance(test, int) and test or max_documents):
        raise ValueError("--num-shards > 1: give --val / --test as fractions (a count needs the whole corpus in one "
                         "run), and no --max-documents")
    opts = ReadOptions(text_key, one_doc_per_line, on_bad_utf8)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None   # sentencepiece, or a tokenizer.json
    sources = src_lib.resolve_inputs(inputs, corpus, hub_split=hub_split, hub_config=hub_config, exclude=out)
    skipped_inputs = src_lib.SkipReport()
    tasks = plan_tasks(sources, opts, skipped_inputs, None if max_documents is None else 1 << 16)  # trials: small
    if not tasks:
        raise src_lib.BadInputError(f"no usable input: {skipped_inputs.total} inputs skipped "
                                    f"{skipped_inputs.counts} (first: {skipped_inputs.examples})")
    if num_shards > 1 and any(t.pieces[0][1] < 0 for t in tasks):
        raise ValueError("--num-shards > 1 reads files only (not hf:NAME or Dataset objects): save the dataset "
                         "as parquet or jsonl files first")
    if (val or test) and len(tasks) == 1 and len(tasks[0].pieces) == 1 and tasks[0].pieces[0][1] == 0 \
            and sources[tasks[0].pieces[0][0]].kind == "text" and not one_doc_per_line:
        raise ValueError(f"the input is one document ({sources[tasks[0].pieces[0][0]].name}): it cannot be split "
                         f"into train and val/test; pass --val 0 --test 0, or --one-doc-per-line")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f".partial-{socket.gethostname()}-{os.getpid()}"
    try:
        _clean_stale_partials(out)
        if tok is not None:
            _check_existing(out, tok)              # before any work
        partial.mkdir()
        t_tok = time.perf_counter()
        if tok is None:
            train_report = src_lib.SkipReport()
            texts = itertools.islice(iter_documents(sample_tasks(tasks, tokenizer_sample_bytes, seed), sources, opts,
                                                    train_report, tokenizer_sample_bytes), max_documents)
            tok = train_tokenizer_on_texts(texts, str(partial / "tokenizer"), vocab_size, model_type,
                                           **{"seed": seed, **(tokenizer_options or {})},
                                           name=str(out / "tokenizer.model"), report=train_report)
            _check_existing(out, tok)
        t_tok = time.perf_counter() - t_tok
        if not tok.lossless:
            print(f"prepare: warning: {tok.path} was not trained with the lossless options "
                  f"(see cratelm/data/tokenizer.py): decoding may not give back the exact text", file=sys.stderr)
        dtype = choose_dtype(tok.vocab_size, dtype)
        lo, hi = len(tasks) * shard_index // num_shards, len(tasks) * (shard_index + 1) // num_shards
        summary = _tokenize(tasks[lo:hi], sources, opts, tok, dtype, partial / part_name(shard_index, num_shards),
                            val, test, seed, num_proc, max_documents, max_file_bytes, progress, out)
        settings = {"dtype": dtype, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                    "tokenizer": tok.filename, "tokenizer_sha256": tok.sha256, "num_shards": num_shards,
                    "inputs": [str(i) if isinstance(i, (str, os.PathLike)) else f"<{type(i).__name__}>"
                               for i in inputs or []] + ([src_lib.describe_corpus(corpus)] if corpus else []),
                    "num_tasks": len(tasks), "split_seed": seed, "split_sizes": {"val": val, "test": test},
                    "text_key": text_key, "one_doc_per_line": one_doc_per_line, "on_bad_utf8": on_bad_utf8,
                    "max_documents": max_documents}
        write_json_atomic(partial / part_name(shard_index, num_shards) / PART_FILE,
                          {"part": shard_index, "tasks": [lo, hi], "settings": settings,
                           "skipped_inputs": skipped_inputs.as_dict(), "skipped": summary.pop("report").as_dict(),
                           "splits": summary["splits"]})
        _install_part(out, partial, part_name(shard_index, num_shards), num_shards)
        _install_tokenizer(out, partial, tokenizer, tok.filename)
        meta = finalize(out)
    except BaseException:
        if created and not any(p for p in out.iterdir() if p != partial):
            shutil.rmtree(out, ignore_errors=True)          # a failed run leaves no empty --out behind
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    report = src_lib.SkipReport()
    report.merge(skipped_inputs.as_dict())
    report.merge(json.loads((out / part_name(shard_index, num_shards) / PART_FILE).read_text())["skipped"])
    summary.update(out_dir=str(out), skipped=report.as_dict(), tokenizer=str(out / tok.filename),
                   tokenizer_sha256=tok.sha256, tokenizer_trained=tokenizer is None, dtype=dtype, num_proc=num_proc,
                   seconds=time.perf_counter() - t_start, tokenizer_seconds=t_tok, part=shard_index,
                   num_shards=num_shards, complete=meta is not None)
    return summary


def _tokenize(tasks: list, sources: list, opts: ReadOptions, tok: Any, dtype: str, folder: Path,
              val: float | int, test: float | int, seed: int, num_proc: int, max_documents: int | None,
              max_file_bytes: int, progress: bool, out: Path) -> dict[str, Any]:
    """Encode ``tasks`` and write the splits of one part into ``folder``."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True)
    writers = {n: SplitWriter(folder, n, dtype, max_file_bytes // np.dtype(dtype).itemsize)
               for n, size in zip(SPLITS, (1, val, test)) if size}
    splitter = Splitter(writers, val, test)
    report = src_lib.SkipReport()
    locate = SkipLocator(sources, report)
    total = sum(t.nbytes for t in tasks)
    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=f"tokenize -> {out}", disable=not progress,
               dynamic_ncols=True)
    expanded = (sub for t in tasks for sub in (dataset_tasks(t, sources, opts) if t.pieces[0][1] < 0 else [t]))
    docs = tokens = 0
    t_enc = time.perf_counter()
    try:
        for task, enc in encode_tasks(expanded, sources, opts, tok.path, dtype, seed, num_proc):
            locate.add(task, enc.found)
            ids, lens, nbytes, draws = enc.ids, enc.lens, enc.nbytes, enc.draw
            if max_documents is not None and docs + len(lens) >= max_documents:
                keep = max_documents - docs
                ids, lens, nbytes, draws = ids[: int(lens[:keep].sum())], lens[:keep], nbytes[:keep], draws[:keep]
            splitter.add(ids, lens, nbytes, draws)
            docs, tokens = docs + len(lens), tokens + len(ids)
            bar.update(task.nbytes or int(nbytes.sum()))
            bar.set_postfix(docs=docs, tokens=tokens, refresh=False)
            if max_documents is not None and docs >= max_documents:
                break
        splitter.finish()
        splits = {n: w.close() for n, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    t_enc = time.perf_counter() - t_enc
    if docs == 0:
        raise src_lib.BadInputError(f"no documents to tokenize: {report.total} skipped {report.counts} "
                                    f"(first: {report.examples})")
    for name in [n for n, s in splits.items() if not s["num_documents"]]:
        for f in folder.glob(f"{name}.*"):
            f.unlink()
        del splits[name]
    nbytes_total = sum(s["num_bytes"] for s in splits.values())
    return {"documents": docs, "tokens": tokens, "bytes": nbytes_total, "splits": splits, "report": report,
            "tokenize_seconds": t_enc, "tokens_per_s": tokens / t_enc if t_enc else 0.0,
            "mb_per_s": nbytes_total / 1e6 / t_enc if t_enc else 0.0}

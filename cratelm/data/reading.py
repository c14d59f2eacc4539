"""Reading documents incrementally, as independent tasks that workers can run in any process.

The inputs are planned once into an ordered list of `Task`s of about ``chunk_bytes`` each:
line-based files (``.jsonl``, and text with one document per line) are cut into byte ranges
(a line belongs to the range holding its first byte), parquet files into row groups, and
one-document-per-file text (and ``.json``) files are grouped whole. A worker reads a task on
its own (no text crosses processes, except rows of in-memory or streamed ``datasets``, read
by the main process in batches). The plan depends only on the inputs, so that the same inputs
give the same tasks on every machine: ``--num-shards N --shard-index I`` takes a contiguous
slice of them, and the parts put back in order are the corpus prepared in one go.

Each document gets a key, (source name, byte offset of its line / row number), from which its
split is drawn (cratelm/data/prepare.py): the same split whatever machine reads it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cratelm.data.sources import BadInputError, SkipReport, Source
from cratelm.data.tasks import ReadOptions, Task, dataset_tasks, line_based
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass
class Skip:
    """A skipped input, located by its piece of the task and (line-based) its line in the piece."""

    reason: str
    piece: int = 0
    line: int | None = None     # 0-based line within the piece
    detail: str = ""


@dataclass
class TaskDocs:
    """What reading a task found besides its documents."""

    skips: list[Skip] = field(default_factory=list)
    piece_lines: dict[int, int] = field(default_factory=dict)   # lines read, per line-based piece
    replaced: int = 0


def name_hash(name: str) -> int:
    """64-bit hash of a source's name: with the byte offset (or row) of a document in it, the
    document's identity, the same on every machine and for every sharding."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


@dataclass
class Docs:
    """The documents of a task, in order: text, UTF-8 bytes, source name hash, byte offset or row."""

    texts: list[str] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


def read_task(task: Task, sources: list[Source], opts: ReadOptions, out: TaskDocs) -> Docs:
    """The documents of ``task``; skips go to ``out``."""
    docs = Docs()
    for p, (i, start, stop) in enumerate(task.pieces):
        src = sources[i]
        h = name_hash(src.identity)

        def add(text: Any, pos: int, line: int | None, where: str) -> None:
            if not isinstance(text, str) or not text:
                out.skips.append(Skip("empty or non-string value" if where == "row" else "empty document",
                                      p, line, f"row {pos}" if where == "row" else where))
                return
            nbytes = len(text) if text.isascii() else _checked_len(text, opts.on_bad_utf8)
            if nbytes is None:
                out.skips.append(Skip("lone surrogate (not encodable as UTF-8)", p, line,
                                      f"row {pos}" if where == "row" else where))
                return
            if nbytes < 0:
                text, nbytes = _SURROGATES.sub("\ufffd", text), -nbytes
                out.replaced += 1
            docs.texts.append(text)
            docs.nbytes.append(nbytes)
            docs.hashes.append(h)
            docs.positions.append(pos)

        if task.texts is not None:
            for r, t in enumerate(task.texts):
                add(t, start + r, None, "row")
        elif src.kind == "parquet":
            for args in _parquet_rows(src.name, start, stop, opts.text_key):
                add(*args)
        elif line_based(src, opts):
            _lines(src, start, stop, opts, out, p, add)
        else:
            for args in _whole_file(src, opts, out, p):
                add(*args)
    return docs


def _checked_len(text: str, on_bad_utf8: str) -> int | None:
    """UTF-8 length; None when it holds a lone surrogate (skip), -length after U+FFFD (replace)."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        if on_bad_utf8 == "fail":
            raise BadInputError(f"lone surrogate {text[e.start]!r} at character {e.start} of a document "
                                f"(not encodable as UTF-8); use --on-bad-utf8 skip or replace") from None
        if on_bad_utf8 == "skip":
            return None
        return -len(_SURROGATES.sub("\ufffd", text).encode("utf-8"))


def _decode(data: bytes, where: str, opts: ReadOptions, out: TaskDocs) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if opts.on_bad_utf8 == "fail":
            raise BadInputError(f"{where}: not valid UTF-8 at byte {e.start} ({e.reason}); "
                                f"use --on-bad-utf8 skip or replace") from None
        if opts.on_bad_utf8 == "skip":
            return None
        out.replaced += 1
        return data.decode("utf-8", errors="replace")


def _lines(src: Source, start: int, stop: int, opts: ReadOptions, out: TaskDocs, p: int, add: Any) -> None:
    """``add`` the documents of the lines starting in [start, stop) (the hot loop of short documents)."""
    n = 0
    jsonl, key, loads = src.kind == "jsonl", opts.text_key, json.loads
    with open(src.name, "rb") as f:
        f.seek(start - 1 if start else 0)
        if start:
            f.readline()                # the line holding byte start - 1 belongs to the piece before
        pos = f.tell()
        for raw in f:
            if pos >= stop:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = _decode(raw, f"{src.name}: line starting at byte {pos}", opts, out)
            if line is None:
                out.skips.append(Skip("not valid UTF-8", p, n))
            elif not jsonl:
                add(line.rstrip("\n").removesuffix("\r") or None, pos, n, "") if line.strip("\r\n") else None
            elif not line.isspace():
                try:
                    obj = loads(line)
                except ValueError as e:
                    out.skips.append(Skip("not JSON", p, n, f"({getattr(e, 'msg', e)})"))
                else:
                    if type(obj) is dict and type(text := obj.get(key)) is str and text:
                        add(text, pos, n, "")
                    else:
                        for args in _record_text(obj, key, out, p, n, pos, ""):
                            add(*args)
            pos += len(raw)
            n += 1
    out.piece_lines[p] = n


def _json_record(line: str, src: Source, opts: ReadOptions, out: TaskDocs, p: int, n: int | None,
                 pos: int, where: str = "") -> Iterator[tuple]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        out.skips.append(Skip("not JSON", p, n, f"({e.msg})"))
        return
    yield from _record_text(obj, opts.text_key, out, p, n, pos, where)


def _record_text(obj: Any, key: str, out: TaskDocs, p: int, n: int | None, pos: int, where: str) -> Iterator[tuple]:
    if not isinstance(obj, dict):
        out.skips.append(Skip(f"JSON record is not an object (need key {key!r})", p, n, where))
    elif key not in obj:
        out.skips.append(Skip(f"JSON record lacks key {key!r}", p, n, where))
    elif not isinstance(obj[key], str):
        out.skips.append(Skip(f"JSON {key!r} is not a string", p, n, where))
    else:
        yield obj[key], pos, n, where


def _whole_file(src: Source, opts: ReadOptions, out: TaskDocs, p: int) -> Iterator[tuple]:
    try:
        with open(src.name, "rb") as f:
            data = f.read()
    except OSError as e:
        out.skips.append(Skip(f"unreadable ({e.strerror or type(e).__name__})", p))
        return
    text = _decode(data, src.name, opts, out)
    if text is None:
        out.skips.append(Skip("not valid UTF-8", p))
    elif src.kind != "json":
        yield text, 0, None, ""
        return
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:               # JSON lines named .json
            offset = 0
            for n, line in enumerate(text.split("\n")):
                if line.strip():
                    yield from _json_record(line, src, opts, out, p, n, offset)
                offset += len(line.encode("utf-8")) + 1
            return
        records = obj if isinstance(obj, list) else [obj]
        for k, rec in enumerate(records):
            yield from _record_text(rec, opts.text_key, out, p, None, k, f"[{k}]" if isinstance(obj, list) else "")


def _parquet_rows(path: str, start: int, stop: int, key: str) -> Iterator[tuple]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
    for batch in pf.iter_batches(columns=[key], batch_size=1024, row_groups=list(range(start, stop))):
        for text in batch.column(0).to_pylist():
            yield text, row, None, "row"
            row += 1


class SkipLocator:
    """Turns a task's `Skip`s into report entries ``file:line`` in input order, keeping the
    line count of each line-based file across its pieces (tasks must be given in order)."""

    def __init__(self, sources: list[Source], report: SkipReport) -> None:
        self.sources, self.report = sources, report
        self._lines: dict[int, tuple[int, int]] = {}    # source -> (byte offset reached, lines before it)

    def _base(self, i: int, start: int) -> int:
        if start <= 0:
            return 0
        reached, lines = self._lines.get(i, (-1, 0))
        if reached != start:            # a part that starts inside a file: count the lines before it once
            with open(self.sources[i].name, "rb") as f:
                lines = _count_lines(f, start)
        return lines

    def add(self, task: Task, found: TaskDocs) -> None:
        bases = {p: self._base(task.pieces[p][0], task.pieces[p][1]) for p in found.piece_lines}
        for s in found.skips:
            name = self.sources[task.pieces[s.piece][0]].name
            where = name if s.line is None else f"{name}:{bases.get(s.piece, 0) + s.line + 1}"
            if s.detail:
                where += f" {s.detail}" if s.detail.startswith("(") else s.detail if s.detail.startswith("[") \
                    else f":{s.detail}"
            self.report.skip(s.reason, where)
        self.report.replaced += found.replaced
        for p, n in found.piece_lines.items():
            i, _, stop = task.pieces[p]
            self._lines[i] = (stop, bases[p] + n)


def _count_lines(f: Any, stop: int) -> int:
    """Newlines in the first ``stop`` bytes of the open binary file ``f``."""
    f.seek(0)
    count, left = 0, stop
    while left > 0:
        block = f.read(min(left, 1 << 22))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


def iter_documents(tasks: list[Task], sources: list[Source], opts: ReadOptions, report: SkipReport,
                   max_bytes: int | None = None) -> Iterator[str]:
    """The documents of ``tasks`` read here, in order (datasets expanded; at most about
    ``max_bytes`` from each dataset); skips counted in ``report``."""
    locate = SkipLocator(sources, report)
    for task in tasks:
        subtasks = dataset_tasks(task, sources, opts) if task.pieces[0][1] < 0 else [task]
        taken = 0
        for sub in subtasks:
            found = TaskDocs()
            docs = read_task(sub, sources, opts, found)
            taken += sum(docs.nbytes)
            yield from docs.texts
            locate.add(sub, found)
            if max_bytes is not None and task.pieces[0][1] < 0 and taken >= max_bytes:
                break

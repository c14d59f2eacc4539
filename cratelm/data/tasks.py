"""Planning the reading of a corpus: the inputs cut into an ordered list of `Task`s of about
``CHUNK_BYTES`` each (see cratelm/data/reading.py for why, and for reading them): byte ranges
of line-based files, row groups of parquet files, groups of whole files; a dataset is one
placeholder task, expanded into batches of rows by the process that reads it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
import random
from typing import Any

from cratelm.data.sources import BAD_UTF8_POLICIES, BadInputError, SkipReport, Source

CHUNK_BYTES = 4 << 20
_BINARY_PROBE = 8192


@dataclass(frozen=True)
class ReadOptions:
    """How documents are read (the same for every task)."""

    text_key: str = "text"
    one_doc_per_line: bool = False
    on_bad_utf8: str = "skip"

    def __post_init__(self) -> None:
        if self.on_bad_utf8 not in BAD_UTF8_POLICIES:
            raise ValueError(f"on_bad_utf8={self.on_bad_utf8!r}: expected one of {BAD_UTF8_POLICIES}")


@dataclass(frozen=True)
class Task:
    """Pieces (source index, start, stop) read in order; or rows of a dataset (``texts``)."""

    pieces: tuple[tuple[int, int, int], ...]
    nbytes: int
    texts: tuple[str, ...] | None = None


def line_based(src: Source, opts: ReadOptions) -> bool:
    return src.kind == "jsonl" or (src.kind == "text" and opts.one_doc_per_line)


def probe_file(path: str, report: SkipReport) -> int | None:
    """The size of a regular, readable, non-empty, non-binary file; None (counted) otherwise.
    A FIFO or device is never opened (it could block forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        report.skip(f"unreadable ({e.strerror or type(e).__name__})", path)
        return None
    if not stat.S_ISREG(st.st_mode):
        report.skip("not a regular file (FIFO, socket or device)", path)
        return None
    if st.st_size == 0:
        report.skip("empty file", path)
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(_BINARY_PROBE)
    except OSError as e:
        report.skip(f"unreadable ({e.strerror or type(e).__name__})", path)
        return None
    if b"\x00" in head:
        report.skip("binary (NUL byte)", path)
        return None
    return st.st_size


def plan_tasks(sources: list[Source], opts: ReadOptions, report: SkipReport,
               chunk_bytes: int | None = None) -> list[Task]:
    """The ordered tasks of ``sources``; unusable files are counted in ``report``. A dataset
    source is one placeholder task (pieces ``((i, -1, -1),)``) expanded by `dataset_tasks`."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    tasks: list[Task] = []
    group: list[tuple[int, int, int]] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        if group:
            tasks.append(Task(tuple(group), size))
        group, size = [], 0

    for i, src in enumerate(sources):
        if src.kind == "dataset":
            flush()
            tasks.append(Task(((i, -1, -1),), 0))
        elif src.kind == "parquet":
            flush()
            tasks += _parquet_tasks(i, src.name, opts, report, chunk_bytes)
        elif (n := probe_file(src.name, report)) is None:
            continue
        elif line_based(src, opts):
            flush()
            tasks += [Task(((i, a, min(a + chunk_bytes, n)),), min(chunk_bytes, n - a))
                      for a in range(0, n, chunk_bytes)]
        else:
            group.append((i, 0, n))
            size += n
            if size >= chunk_bytes:
                flush()
    flush()
    return tasks


def _parquet_tasks(i: int, path: str, opts: ReadOptions, report: SkipReport, chunk_bytes: int) -> list[Task]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        names = pq.read_schema(path).names
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        report.skip(f"unreadable parquet ({type(e).__name__})", path)
        return []
    if opts.text_key not in names:
        report.skip(f"parquet lacks column {opts.text_key!r}", path)
        return []
    tasks, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes or g == meta.num_row_groups - 1:
            tasks.append(Task(((i, start, g + 1),), size))
            start, size = g + 1, 0
    return tasks


def dataset_tasks(task: Task, sources: list[Source], opts: ReadOptions, batch: int = 4096) -> Iterator[Task]:
    """Expand a dataset placeholder into tasks of ``batch`` rows (read here, in this process)."""
    (i, _, _), = task.pieces
    src = sources[i]
    names = getattr(src.dataset, "column_names", None)
    if names is not None and opts.text_key not in names:
        raise BadInputError(f"{src.name}: no column {opts.text_key!r} (columns: {names}); use --text-key")
    rows: list[Any] = []
    row0 = 0
    for row in src.dataset:
        rows.append(row.get(opts.text_key) if isinstance(row, dict) else None)
        if len(rows) == batch:
            yield Task(((i, row0, row0 + len(rows)),), 0, tuple(rows))
            row0, rows = row0 + len(rows), []
    if rows:
        yield Task(((i, row0, row0 + len(rows)),), 0, tuple(rows))


def sample_tasks(tasks: list[Task], sample_bytes: int | None, seed: int) -> list[Task]:
    """A seeded sample of ``tasks`` (in input order) of about ``sample_bytes`` of input, for
    training a tokenizer: whole tasks drawn at random until the budget is reached; every
    dataset placeholder is kept (`iter_documents` reads its first rows up to its share)."""
    total = sum(t.nbytes for t in tasks)
    if sample_bytes is None or total <= sample_bytes:
        return tasks
    order = list(range(len(tasks)))
    random.Random(seed).shuffle(order)
    chosen, size = set(), 0
    for k in order:
        if size >= sample_bytes:
            break
        if tasks[k].texts is None and tasks[k].pieces[0][1] >= 0:
            chosen.add(k)
            size += tasks[k].nbytes
    return [t for k, t in enumerate(tasks) if k in chosen or t.pieces[0][1] < 0]

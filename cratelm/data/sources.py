"""Where documents come from: files, directories, globs, ``hf:NAME`` hub datasets, a
``datasets.Dataset`` object, or the embedded ``python-stdlib`` corpus.

Formats, by file name:
    *.jsonl            one JSON object per line; the document is its ``text_key`` field
    *.json             a JSON array of objects, one object, or JSON lines
    *.parquet          the ``text_key`` column
    anything else      UTF-8 text: one document per file (or per line with ``one_doc_per_line``)

Directories are walked recursively in sorted order; names starting with "." (.git, editor
files) are left out. Globs are expanded by Python's glob with ``**`` allowed.

Bad input never vanishes silently and never stops a run halfway (except ``on_bad_utf8="fail"``):
a missing path or a glob matching nothing is an error before any work starts; an unreadable,
binary (a NUL byte in its first 8 KiB, as git decides), empty or non-UTF-8 file, and a JSON
line that does not parse or lacks the text key are skipped and counted in a `SkipReport`,
with the file (and line) of the first few of each kind.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STDLIB = "python-stdlib"
CORPORA = (STDLIB,)
BAD_UTF8_POLICIES = ("skip", "replace", "fail")
HUB_PREFIX = "hf:"
_GLOB_CHARS = set("*?[")
_BINARY_PROBE = 8192
_EXAMPLES_PER_REASON = 5


class BadInputError(ValueError):
    """Input that cannot be used, named with its file (and line)."""


@dataclass
class SkipReport:
    """Counts of skipped inputs by reason, with the first few locations of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    replaced_files: int = 0
    """Files whose invalid UTF-8 was replaced by U+FFFD (``on_bad_utf8="replace"``)."""

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped input of ``reason`` at ``where`` (``file`` or ``file:line``)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _EXAMPLES_PER_REASON:
            ex.append(where)

    @property
    def total(self) -> int:
        """All skipped inputs."""
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """A JSON-ready summary."""
        return {"total": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": dict(sorted(self.examples.items())), "replaced_utf8_files": self.replaced_files}


@dataclass(frozen=True)
class Source:
    """One resolved input: a file (``kind`` from its extension), or a dataset."""

    kind: str            # "text" | "jsonl" | "json" | "parquet" | "dataset" ("hub" while unloaded)
    name: str            # the path, or "hf:NAME" / "<datasets.Dataset>" for datasets
    dataset: Any = None  # a datasets.Dataset for kind == "dataset"


def python_stdlib_files() -> tuple[Path, list[Path]]:
    """(stdlib root, its ``.py`` files sorted by relative path), site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def describe_corpus(corpus: str) -> dict:
    """What an embedded corpus is, for meta.json (no timestamps: the same on every run)."""
    if corpus != STDLIB:
        raise ValueError(f"corpus={corpus!r}: known corpora are {list(CORPORA)}")
    root, files = python_stdlib_files()
    return {"corpus": STDLIB, "root": str(root), "python": sys.version.split()[0], "files": len(files)}


def _kind_of(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(suffix, "text")


def _walk(directory: Path) -> list[Path]:
    """Every file under ``directory`` (names starting with '.' excluded), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return sorted(out)


def resolve_inputs(inputs: list[Any] | None, corpus: str | None = None, *, hub_split: str = "train",
                   hub_config: str | None = None, num_proc: int | None = None) -> list[Source]:
    """Expand files, directories, globs, ``hf:NAME`` and Dataset objects into `Source`s, in
    the order given (directory and glob contents sorted). Raises `BadInputError` naming every
    missing path before any reading starts."""
    sources: list[Source] = []
    missing: list[str] = []
    if corpus is not None:
        if corpus not in CORPORA:
            raise BadInputError(f"corpus={corpus!r}: known corpora are {list(CORPORA)}")
        sources += [Source("text", str(p)) for p in python_stdlib_files()[1]]
    for item in inputs or []:
        if not isinstance(item, (str, os.PathLike)):  # a datasets.Dataset (or anything with columns)
            sources.append(Source("dataset", f"<{type(item).__name__}>", item))
        elif str(item).startswith(HUB_PREFIX):
            sources.append(Source("hub", str(item)))     # loaded below, once every path is known to exist
        elif Path(item).is_dir():
            files = _walk(Path(item))
            if not files:
                missing.append(f"{item} (an empty directory)")
            sources += [Source(_kind_of(p), str(p)) for p in files]
        elif _GLOB_CHARS & set(str(item)):
            matches = sorted(globlib.glob(str(item), recursive=True))
            files = sorted({Path(m) for m in matches if Path(m).is_file()}
                           | {f for m in matches if Path(m).is_dir() for f in _walk(Path(m))})
            if not files:
                missing.append(f"{item} (a glob matching no file)")
            sources += [Source(_kind_of(p), str(p)) for p in files]
        elif os.path.lexists(item):   # a file, or a broken link: reported when read
            sources.append(Source(_kind_of(Path(item)), str(item)))
        else:
            missing.append(str(item))
    if missing:
        raise BadInputError("input not found: " + ", ".join(missing)
                            + f" (hub datasets are written {HUB_PREFIX}NAME)")
    if not sources:
        raise BadInputError("no inputs: give files, directories, globs, hf:NAME, or --corpus python-stdlib")
    return [Source("dataset", s.name, load_hub_dataset(s.name, hub_split, hub_config, num_proc))
            if s.kind == "hub" else s for s in sources]


def load_hub_dataset(spec: str, split: str = "train", config: str | None = None, num_proc: int | None = None) -> Any:
    """``datasets.load_dataset`` of ``hf:NAME`` with ``num_proc`` workers (needs the network,
    or the datasets cache)."""
    import datasets

    name = spec[len(HUB_PREFIX):]
    try:
        return datasets.load_dataset(name, config, split=split, num_proc=num_proc)
    except Exception as e:  # noqa: BLE001 - many network/hub error types; all mean "cannot load"
        raise BadInputError(f"{spec}: cannot load hub dataset {name!r} (config={config}, split={split}): "
                            f"{type(e).__name__}: {e}") from e


def read_bytes(path: str, report: SkipReport) -> bytes | None:
    """The bytes of a file, or None (counted) when it is unreadable, binary or empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        report.skip(f"unreadable ({e.strerror or type(e).__name__})", path)
        return None
    if not data:
        report.skip("empty file", path)
        return None
    if b"\x00" in data[:_BINARY_PROBE]:
        report.skip("binary (NUL byte)", path)
        return None
    return data


def decode_utf8(data: bytes, where: str, on_bad_utf8: str, report: SkipReport) -> str | None:
    """Decode UTF-8 per ``on_bad_utf8``: skip (None, counted), replace (U+FFFD), or fail."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_bad_utf8 == "fail":
            raise BadInputError(f"{where}: not valid UTF-8 at byte {e.start} ({e.reason}); "
                                f"use --on-bad-utf8 skip or replace") from None
        if on_bad_utf8 == "skip":
            report.skip("not valid UTF-8", where)
            return None
        report.replaced_files += 1
        return data.decode("utf-8", errors="replace")


def _records_text(records: Any, where: str, text_key: str, report: SkipReport,
                  line: int | None = None) -> Iterator[str]:
    loc = f"{where}:{line}" if line is not None else where
    if not isinstance(records, dict):
        report.skip(f"JSON record is not an object (need key {text_key!r})", loc)
        return
    if text_key not in records:
        report.skip(f"JSON record lacks key {text_key!r}", loc)
        return
    text = records[text_key]
    if not isinstance(text, str):
        report.skip(f"JSON {text_key!r} is not a string", loc)
    elif not text:
        report.skip("empty document", loc)
    else:
        yield text


def _json_lines(text: str, where: str, text_key: str, report: SkipReport) -> Iterator[str]:
    # split at "\n" only: str.splitlines would also split at U+2028 etc., legal inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip("not JSON", f"{where}:{lineno} ({e.msg})")
            continue
        yield from _records_text(obj, where, text_key, report, lineno)


def _json_file(text: str, where: str, text_key: str, report: SkipReport) -> Iterator[str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        yield from _json_lines(text, where, text_key, report)  # JSON lines named .json
        return
    records = obj if isinstance(obj, list) else [obj]
    for i, rec in enumerate(records):
        yield from _records_text(rec, f"{where}[{i}]" if isinstance(obj, list) else where, text_key, report)


def _parquet(path: str, text_key: str, report: SkipReport) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        report.skip(f"unreadable parquet ({type(e).__name__})", path)
        return
    if text_key not in pf.schema_arrow.names:
        report.skip(f"parquet lacks column {text_key!r}", path)
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text:
                yield text
            else:
                report.skip("empty or non-string parquet value", f"{path}:row {row}")
            row += 1


def _dataset(src: Source, text_key: str, report: SkipReport) -> Iterator[str]:
    ds = src.dataset
    names = getattr(ds, "column_names", None)
    if names is not None and text_key not in names:
        raise BadInputError(f"{src.name}: no column {text_key!r} (columns: {names}); use --text-key")
    for i, row in enumerate(ds):
        text = row.get(text_key) if isinstance(row, dict) else None
        if isinstance(text, str) and text:
            yield text
        else:
            report.skip("empty or non-string dataset value", f"{src.name}:row {i}")


def iter_source(src: Source, *, text_key: str = "text", one_doc_per_line: bool = False,
                on_bad_utf8: str = "skip", report: SkipReport) -> Iterator[str]:
    """The documents of one source, in order; bad parts are counted in ``report``."""
    if src.kind == "dataset":
        yield from _dataset(src, text_key, report)
        return
    if src.kind == "parquet":
        yield from _parquet(src.name, text_key, report)
        return
    data = read_bytes(src.name, report)
    if data is None:
        return
    text = decode_utf8(data, src.name, on_bad_utf8, report)
    if text is None:
        return
    if src.kind == "jsonl":
        yield from _json_lines(text, src.name, text_key, report)
    elif src.kind == "json":
        yield from _json_file(text, src.name, text_key, report)
    elif one_doc_per_line:
        # lines end at "\n" or "\r\n" (not at the other separators str.splitlines knows);
        # blank lines are separators, not documents
        for line in text.split("\n"):
            line = line[:-1] if line.endswith("\r") else line
            if line:
                yield line
    else:
        yield text


def iter_documents(sources: list[Source], *, text_key: str = "text", one_doc_per_line: bool = False,
                   on_bad_utf8: str = "skip", report: SkipReport | None = None) -> Iterator[str]:
    """Every document of ``sources`` in order (see `iter_source`)."""
    if on_bad_utf8 not in BAD_UTF8_POLICIES:
        raise ValueError(f"on_bad_utf8={on_bad_utf8!r}: expected one of {BAD_UTF8_POLICIES}")
    report = report if report is not None else SkipReport()
    for src in sources:
        yield from iter_source(src, text_key=text_key, one_doc_per_line=one_doc_per_line,
                               on_bad_utf8=on_bad_utf8, report=report)


def source_bytes(sources: list[Source]) -> int | None:
    """Total size of the file sources (for a progress bar), None if some are datasets."""
    total = 0
    for src in sources:
        if src.kind == "dataset":
            return None
        try:
            total += os.path.getsize(src.name)
        except OSError:
            pass
    return total

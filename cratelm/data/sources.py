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
binary (a NUL byte in its first 8 KiB, as git decides), empty, non-regular (FIFO, device) or
non-UTF-8 file, and a JSON line that does not parse, lacks the text key or holds a lone
surrogate are skipped and counted in a `SkipReport`, with the file (and line) of the first few
of each kind. Reading itself is in cratelm/data/reading.py.
"""

from __future__ import annotations

import glob as globlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STDLIB = "python-stdlib"
CORPORA = (STDLIB,)
BAD_UTF8_POLICIES = ("skip", "replace", "fail")
HUB_PREFIX = "hf:"
_GLOB_CHARS = set("*?[")
_EXAMPLES_PER_REASON = 5


class BadInputError(ValueError):
    """Input that cannot be used, named with its file (and line)."""


@dataclass
class SkipReport:
    """Counts of skipped inputs by reason, with the first few locations of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    replaced: int = 0
    """Documents (or whole text files) whose invalid UTF-8 or lone surrogates were replaced by
    U+FFFD (``on_bad_utf8="replace"``)."""

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
                "examples": dict(sorted(self.examples.items())), "replaced_utf8": self.replaced}

    def merge(self, other: dict) -> None:
        """Add the counts of another report's `as_dict` (another part of the same corpus)."""
        for reason, n in other.get("counts", {}).items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex += other["examples"].get(reason, [])[: _EXAMPLES_PER_REASON - len(ex)]
        self.replaced += other.get("replaced_utf8", 0)


@dataclass(frozen=True)
class Source:
    """One resolved input: a file (``kind`` from its extension), or a dataset."""

    kind: str            # "text" | "jsonl" | "json" | "parquet" | "dataset" ("hub" while unloaded)
    name: str            # the path, or "hf:NAME" / "<datasets.Dataset>" for datasets
    dataset: Any = None  # a datasets.Dataset for kind == "dataset"
    key: str | None = None   # the name its documents' split draws hash, when not ``name``

    @property
    def identity(self) -> str:
        """What a document's split draw hashes with its position: the name as given, or for
        the embedded corpus its path under the standard library (the same on every install)."""
        return self.key or self.name


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


def _walk(directory: Path, exclude: Path | None = None) -> list[Path]:
    """Every file under ``directory`` (names starting with '.' and the ``exclude`` directory
    left out), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or Path(dirpath, d).resolve() != exclude))
        out += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return sorted(out)


def resolve_inputs(inputs: list[Any] | None, corpus: str | None = None, *, hub_split: str = "train",
                   hub_config: str | None = None, exclude: str | os.PathLike | None = None) -> list[Source]:
    """Expand files, directories, globs, ``hf:NAME`` and Dataset objects into `Source`s, in
    the order given (directory and glob contents sorted); files under ``exclude`` (the output
    directory) are left out. Raises `BadInputError` naming every missing path before any
    reading starts."""
    sources: list[Source] = []
    skip_dir = Path(exclude).resolve() if exclude is not None else None
    missing: list[str] = []
    if corpus is not None:
        if corpus not in CORPORA:
            raise BadInputError(f"corpus={corpus!r}: known corpora are {list(CORPORA)}")
        root, files = python_stdlib_files()
        sources += [Source("text", str(p), key=f"{corpus}/{p.relative_to(root).as_posix()}") for p in files]
    for item in inputs or []:
        if not isinstance(item, (str, os.PathLike)):  # a datasets.Dataset (or anything with columns)
            sources.append(Source("dataset", f"<{type(item).__name__}>", item))
        elif str(item).startswith(HUB_PREFIX):
            sources.append(Source("hub", str(item)))     # loaded below, once every path is known to exist
        elif Path(item).is_dir():
            files = _walk(Path(item), skip_dir)
            if not files:
                missing.append(f"{item} (an empty directory)")
            sources += [Source(_kind_of(p), str(p)) for p in files]
        elif _GLOB_CHARS & set(str(item)):
            matches = sorted(globlib.glob(str(item), recursive=True))
            files = sorted({Path(m) for m in matches if not Path(m).is_dir()}
                           | {f for m in matches if Path(m).is_dir() for f in _walk(Path(m), skip_dir)})
            files = [f for f in files if skip_dir is None or skip_dir not in f.resolve().parents]
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
    return [Source("dataset", s.name, load_hub_dataset(s.name, hub_split, hub_config))
            if s.kind == "hub" else s for s in sources]


def load_hub_dataset(spec: str, split: str = "train", config: str | None = None) -> Any:
    """``datasets.load_dataset`` of ``hf:NAME``, streaming: rows are read as they are needed,
    nothing is downloaded whole (needs the network, or the datasets cache)."""
    import datasets

    name = spec[len(HUB_PREFIX):]
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - many network/hub error types; all mean "cannot load"
        raise BadInputError(f"{spec}: cannot load hub dataset {name!r} (config={config}, split={split}): "
                            f"{type(e).__name__}: {e}") from e

"""Indexed token shards: ``NAME.bin`` + ``NAME.idx`` + one ``meta.json`` per corpus directory.

The format is documented byte by byte in docs/data-format.md; in short:

    NAME.bin   the token ids of every document, back to back, each document followed by
               EOS; little-endian uint16 (vocab_size <= 65536) or uint32
    NAME.idx   32-byte header  magic b"CRLMIDX\\0" | uint32 version | uint32 dtype code
                               (= bytes per token: 2 or 4) | uint64 document count N
                               | uint64 reserved (0)
               then int64[N + 1] document offsets into NAME.bin, in tokens
               (offsets[0] = 0, offsets[N] = number of tokens)
    meta.json  written LAST: its presence marks a complete corpus

Reads are zero-copy (``np.memmap``); an `IndexedTokens` pickles as its path so that data
loader workers reopen the files instead of copying them. Every file is written under a
temporary name and renamed into place when complete (`atomic_path`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC = b"CRLMIDX\x00"
VERSION = 1
HEADER_BYTES = 32
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DTYPE_CODES: dict[int, str] = {2: "uint16", 4: "uint32"}  # code = bytes per token
META_FILE = "meta.json"


class ShardFormatError(ValueError):
    """A shard or meta.json that is missing, incomplete or inconsistent."""


def choose_dtype(vocab_size: int, requested: str = "auto") -> str:
    """The token dtype name for ``vocab_size``: the smallest that fits when ``requested`` is
    "auto"; otherwise ``requested``, checked (ids run from 0 to vocab_size - 1)."""
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested not in DTYPES:
        raise ValueError(f"dtype={requested!r}: expected 'auto', 'uint16' or 'uint32'")
    limit = np.iinfo(DTYPES[requested]).max + 1
    if vocab_size > limit:
        raise ValueError(f"vocab_size={vocab_size} does not fit dtype {requested} (at most {limit} ids); "
                         f"use --dtype uint32 or auto")
    return requested


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block
    completes, delete it otherwise. A killed writer leaves ``.NAME.tmp-PID`` at worst."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (the same bytes for the same object)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_index(path: str | os.PathLike, dtype: str, offsets: np.ndarray) -> None:
    """Write a ``.idx`` file (atomically) for documents delimited by ``offsets`` (N + 1 int64)."""
    offsets = np.ascontiguousarray(offsets, dtype="<i8")
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: offsets must start at 0 and never decrease")
    header = MAGIC + np.array([VERSION, DTYPES[dtype].itemsize], "<u4").tobytes() \
        + np.array([len(offsets) - 1, 0], "<u8").tobytes()
    assert len(header) == HEADER_BYTES
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header)
        f.write(offsets.tobytes())


def read_index(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """Read a ``.idx`` file: (dtype name, int64 document offsets memmap of N + 1 entries)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: index file not found") from None
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise ShardFormatError(f"{path}: not a cratelm index (magic {header[:8]!r}, expected {MAGIC!r})")
    version, code = np.frombuffer(header, "<u4", 2, 8)
    count = int(np.frombuffer(header, "<u8", 1, 16)[0])
    if version != VERSION:
        raise ShardFormatError(f"{path}: format version {version}, this reader knows {VERSION}")
    if int(code) not in DTYPE_CODES:
        raise ShardFormatError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
    expected = HEADER_BYTES + 8 * (count + 1)
    if path.stat().st_size != expected:
        raise ShardFormatError(f"{path}: {path.stat().st_size} bytes, expected {expected} for {count} documents")
    offsets = np.memmap(path, dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(count + 1,))
    return DTYPE_CODES[int(code)], offsets


class ShardWriter:
    """Append documents (token arrays that already end with EOS) to ``NAME.bin`` and write
    ``NAME.idx`` on `close`. Both files appear under their final names only at `close`."""

    def __init__(self, bin_path: str | os.PathLike, dtype: str) -> None:
        self.bin_path = Path(bin_path)
        self.idx_path = self.bin_path.with_suffix(".idx")
        self.dtype = dtype
        self._np_dtype = DTYPES[dtype]
        self._tmp = self.bin_path.with_name(f".{self.bin_path.name}.tmp-{os.getpid()}")
        self._file: BinaryIO | None = open(self._tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append ``tokens``: the concatenation of documents of ``doc_lengths`` tokens each."""
        assert self._file is not None, "writer is closed"
        self._file.write(np.ascontiguousarray(tokens, dtype=self._np_dtype).tobytes())
        self._lengths.append(np.asarray(doc_lengths, dtype=np.int64))
        self.num_tokens += len(tokens)

    def close(self) -> np.ndarray:
        """Finish both files; return the document offsets (N + 1)."""
        assert self._file is not None, "writer is closed"
        self._file.close()
        self._file = None
        lengths = np.concatenate([np.zeros(1, np.int64), *self._lengths])
        offsets = np.cumsum(lengths)
        if offsets[-1] != self.num_tokens:
            raise AssertionError(f"{self.bin_path}: lengths sum to {offsets[-1]}, wrote {self.num_tokens} tokens")
        os.replace(self._tmp, self.bin_path)
        write_index(self.idx_path, self.dtype, offsets)
        return offsets

    def abort(self) -> None:
        """Drop the partial ``.bin`` (called on errors)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def resolve_shard(path: str | os.PathLike, name: str | None = None) -> tuple[Path, str]:
    """(corpus directory, split name) of ``dir/NAME.bin``, ``dir/NAME.idx``, ``dir/NAME``,
    or ``dir`` + ``name`` (a directory alone means its ``train`` split)."""
    p = Path(path)
    if p.is_dir():
        return p, name or "train"
    if name is not None:
        raise ValueError(f"{path}: give either a corpus directory + name, or a shard path, not both")
    if p.suffix in (".bin", ".idx"):
        return p.parent, p.stem
    if p.with_suffix(".bin").exists() or p.parent.joinpath(META_FILE).exists():
        return p.parent, p.name
    raise FileNotFoundError(f"{path}: no such corpus directory or token shard")


def read_meta(corpus_dir: str | os.PathLike) -> dict:
    """The corpus' meta.json; a clear error if it is absent (an incomplete or killed preparation)."""
    path = Path(corpus_dir) / META_FILE
    if not Path(corpus_dir).is_dir():
        raise FileNotFoundError(f"{corpus_dir}: no such corpus directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardFormatError(f"{path} not found: {corpus_dir} is not a complete prepared corpus "
                               f"(meta.json is written last; was the preparation interrupted?)") from None
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from None


class IndexedTokens:
    """A zero-copy view of one split of a prepared corpus.

    ``IndexedTokens("data/stdlib/val.bin")`` or ``IndexedTokens("data/stdlib", "val")``.
    Attributes: ``tokens`` (read-only np.memmap), ``doc_offsets`` (int64, N + 1),
    ``meta`` (the corpus meta.json), ``num_tokens``, ``num_documents``, ``dtype``, ``name``.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        self.dir, self.name = resolve_shard(path, name)
        self.meta = read_meta(self.dir)
        self.bin_path = self.dir / f"{self.name}.bin"
        self.idx_path = self.dir / f"{self.name}.idx"
        splits = self.meta.get("splits", {})
        if self.name not in splits:
            raise ShardFormatError(f"{self.dir / META_FILE}: no split {self.name!r} (has {sorted(splits)})")
        self.dtype, self.doc_offsets = read_index(self.idx_path)
        if self.dtype != self.meta.get("dtype"):
            raise ShardFormatError(f"{self.idx_path}: dtype {self.dtype} but meta.json says {self.meta.get('dtype')}")
        self.num_documents = len(self.doc_offsets) - 1
        self.num_tokens = int(self.doc_offsets[-1])
        itemsize = DTYPES[self.dtype].itemsize
        if not self.bin_path.exists() or self.bin_path.stat().st_size != self.num_tokens * itemsize:
            size = self.bin_path.stat().st_size if self.bin_path.exists() else "missing"
            raise ShardFormatError(f"{self.bin_path}: size {size}, expected {self.num_tokens * itemsize} bytes "
                                   f"({self.num_tokens} {self.dtype} tokens per {self.idx_path.name})")
        split = splits[self.name]
        if (split.get("num_tokens"), split.get("num_documents")) != (self.num_tokens, self.num_documents):
            raise ShardFormatError(f"{self.dir / META_FILE}: split {self.name} records {split.get('num_tokens')} "
                                   f"tokens / {split.get('num_documents')} documents, the shard has "
                                   f"{self.num_tokens} / {self.num_documents}")
        # np.memmap cannot map an empty file; an empty split is a valid (if useless) shard
        self.tokens = (np.memmap(self.bin_path, dtype=DTYPES[self.dtype], mode="r") if self.num_tokens
                       else np.zeros(0, DTYPES[self.dtype]))

    @property
    def eos_id(self) -> int:
        """The EOS id that ends every document."""
        return int(self.meta["eos_id"])

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of this split's documents (for bits per byte)."""
        return int(self.meta["splits"][self.name]["num_bytes"])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``, its trailing EOS included."""
        if not -self.num_documents <= i < self.num_documents:
            raise IndexError(f"{self.bin_path}: document {i} out of range ({self.num_documents} documents)")
        i %= self.num_documents
        return self.tokens[self.doc_offsets[i]: self.doc_offsets[i + 1]]

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        return (f"IndexedTokens({str(self.bin_path)!r}: {self.num_documents} documents, "
                f"{self.num_tokens} {self.dtype} tokens)")

    # pickle as the path: loader workers reopen the memmaps instead of copying them
    def __getstate__(self) -> dict:
        return {"dir": str(self.dir), "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"], state["name"])

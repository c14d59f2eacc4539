"""Indexed token shards: token files + an index per split + one ``meta.json`` per corpus.

The format is documented byte by byte in docs/data-format.md. Version 2 (what prepare-data
writes): the corpus is a sequence of parts ``part-IIIII-of-NNNNN/`` (one per machine or array
task; a single one when prepared in one go), each holding per split ``NAME.idx`` and the token
stream cut into files ``NAME.KKKKK.bin`` of bounded size (documents may run across files) and a
``part.json`` listing them with their sizes and sha256; ``meta.json`` lists the parts and is
written once every part is complete. Version 1 (still read; `ShardWriter` writes it): one
file pair per split beside meta.json:

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
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cratelm.utils import file_sha256

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


PART_FILE = "part.json"


def part_name(index: int, num_shards: int) -> str:
    """The directory of part ``index`` of ``num_shards``."""
    return f"part-{index:05d}-of-{num_shards:05d}"


class TokenStream:
    """Read-only concatenation of token files, sliced like an array (``stream[a:b]`` -> numpy).
    Slices are read with ``pread`` (files opened on first use): no memory map, so a window costs
    one system call whatever the corpus size, and resident memory does not grow with what was
    read (a map's page faults on a cold or sparse file also cost far more: 4 ms vs 6 us measured)."""

    def __init__(self, files: list[tuple[Path, int]], dtype: str) -> None:
        self.files = [Path(f) for f, _ in files]
        self.dtype = DTYPES[dtype]
        self.starts = np.concatenate([[0], np.cumsum([n for _, n in files], dtype=np.int64)]).astype(np.int64)
        self._fds: dict[int, int] = {}

    def _read(self, k: int, start: int, stop: int) -> np.ndarray:
        if k not in self._fds:
            self._fds[k] = os.open(self.files[k], os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self._fds[k], (stop - start) * size, start * size)
        if len(data) != (stop - start) * size:
            raise ShardFormatError(f"{self.files[k]}: short read at token {start} (file truncated?)")
        return np.frombuffer(data, self.dtype)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: int | slice) -> np.ndarray:
        n = len(self)
        if not isinstance(key, slice):
            i = int(key) + (n if int(key) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"token {key} out of range ({n} tokens)")
            return self[i: i + 1][0]
        start, stop, step = key.indices(n)
        if step != 1:
            raise ValueError("TokenStream: only contiguous slices")
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.starts, start, side="right") - 1)
        last = int(np.searchsorted(self.starts, stop - 1, side="right") - 1)
        pieces = [self._read(k, int(max(start - self.starts[k], 0)),
                             int(min(stop, self.starts[k + 1]) - self.starts[k])) for k in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class SplitWriter:
    """Write one split of one part: ``NAME.KKKKK.bin`` files of at most ``max_file_tokens``
    tokens each and ``NAME.idx`` (offsets streamed to disk: memory does not grow with the
    corpus). Call `write` with whole documents, then `close` for the part.json entry."""

    def __init__(self, folder: str | os.PathLike, name: str, dtype: str, max_file_tokens: int) -> None:
        self.folder, self.name, self.dtype = Path(folder), name, dtype
        self.max_file_tokens = max(1, int(max_file_tokens))
        self.files: list[dict] = []
        self.num_tokens = self.num_documents = self.num_bytes = 0
        self._bin: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._idx = open(self.folder / f"{name}.idx", "wb")
        self._idx.write(bytes(HEADER_BYTES) + np.zeros(1, "<i8").tobytes())   # header patched at close

    def _roll(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self.files[-1]["sha256"] = self._hash.hexdigest()
        name = f"{self.name}.{len(self.files):05d}.bin"
        self._bin, self._hash = open(self.folder / name, "wb"), hashlib.sha256()
        self.files.append({"file": name, "num_tokens": 0})

    def write(self, tokens: np.ndarray, doc_lengths: np.ndarray, num_bytes: int = 0) -> None:
        """Append whole documents: ``tokens`` = their concatenation, ``doc_lengths`` tokens each."""
        tokens = np.ascontiguousarray(tokens, dtype=DTYPES[self.dtype])
        done = 0
        while done < len(tokens):
            if self._bin is None or self.files[-1]["num_tokens"] >= self.max_file_tokens:
                self._roll()
            take = min(len(tokens) - done, self.max_file_tokens - self.files[-1]["num_tokens"])
            data = tokens[done: done + take].tobytes()
            self._bin.write(data)
            self._hash.update(data)
            self.files[-1]["num_tokens"] += take
            done += take
        ends = self.num_tokens + np.cumsum(np.asarray(doc_lengths, np.int64))
        self._idx.write(ends.astype("<i8").tobytes())
        self.num_tokens += len(tokens)
        self.num_documents += len(doc_lengths)
        self.num_bytes += int(num_bytes)

    def close(self) -> dict:
        """Finish the files; return this split's part.json entry."""
        if self._bin is not None:
            self._bin.close()
            self.files[-1]["sha256"] = self._hash.hexdigest()
        header = MAGIC + np.array([VERSION, DTYPES[self.dtype].itemsize], "<u4").tobytes() \
            + np.array([self.num_documents, 0], "<u8").tobytes()
        self._idx.seek(0)
        self._idx.write(header)
        self._idx.close()
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "num_bytes": self.num_bytes,
                "files": self.files, "index": f"{self.name}.idx",
                "index_sha256": file_sha256(self.folder / f"{self.name}.idx")}

    def abort(self) -> None:
        """Close the files (the part directory is removed by the caller)."""
        for f in (self._bin, self._idx):
            if f is not None and not f.closed:
                f.close()


def read_part(corpus_dir: Path, part: str) -> dict:
    """A part's part.json; a clear error when it is missing (that part is not finished)."""
    path = corpus_dir / part / PART_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardFormatError(f"{path} not found: part {part} of {corpus_dir} is missing or unfinished") from None
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from None

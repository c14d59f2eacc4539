"""Reading a prepared corpus: `IndexedTokens`, one split of it, zero-copy, in either layout
(version 2 parts, version 1 flat files; docs/data-format.md), every size checked against
meta.json and part.json when opened (hashes: `cratelm verify-data`, cratelm/data/verify.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cratelm.data.indexed import DTYPES, META_FILE, ShardFormatError, TokenStream, read_index, read_part

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
        self.dtype = str(self.meta.get("dtype"))
        if self.dtype not in DTYPES:
            raise ShardFormatError(f"{self.dir / META_FILE}: dtype {self.dtype!r} (known: {sorted(DTYPES)})")
        # pieces: (idx path, [(bin path, tokens)]) in stream order: the parts, or the flat pair
        pieces = self._v2_pieces() if "parts" in self.meta else [(self.idx_path, [(self.bin_path, None)])]
        self._offsets: list[np.ndarray] = []
        files: list[tuple[Path, int]] = []
        for idx_path, bins in pieces:
            dtype, offsets = read_index(idx_path)
            if dtype != self.dtype:
                raise ShardFormatError(f"{idx_path}: dtype {dtype} but meta.json says {self.dtype}")
            self._offsets.append(offsets)
            expect = sum(n for _, n in bins) if bins[0][1] is not None else int(offsets[-1])
            if expect != int(offsets[-1]):
                raise ShardFormatError(f"{idx_path}: {int(offsets[-1])} tokens, its part.json lists {expect}")
            for path, n in bins:
                n = int(offsets[-1]) if n is None else n
                size = path.stat().st_size if path.exists() else "missing"
                if size != n * DTYPES[self.dtype].itemsize:
                    raise ShardFormatError(f"{path}: size {size}, expected {n * DTYPES[self.dtype].itemsize} bytes "
                                           f"({n} {self.dtype} tokens per {idx_path.name})")
                files.append((path, n))
        self._doc_starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets], dtype=np.int64)
        self._token_starts = np.cumsum([0] + [int(o[-1]) for o in self._offsets], dtype=np.int64)
        self.num_documents = int(self._doc_starts[-1])
        self.num_tokens = int(self._token_starts[-1])
        split = splits[self.name]
        if (split.get("num_tokens"), split.get("num_documents")) != (self.num_tokens, self.num_documents):
            raise ShardFormatError(f"{self.dir / META_FILE}: split {self.name} records {split.get('num_tokens')} "
                                   f"tokens / {split.get('num_documents')} documents, the shard has "
                                   f"{self.num_tokens} / {self.num_documents}")
        self.tokens = TokenStream(files, self.dtype)   # slices are numpy arrays; nothing is read here

    def _v2_pieces(self) -> list[tuple[Path, list[tuple[Path, int]]]]:
        pieces = []
        for part in self.meta["parts"]:
            info = read_part(self.dir, part).get("splits", {}).get(self.name)
            if info and info["num_documents"]:
                pieces.append((self.dir / part / info["index"],
                               [(self.dir / part / f["file"], int(f["num_tokens"])) for f in info["files"]]))
        if not pieces:
            raise ShardFormatError(f"{self.dir}: split {self.name} has no documents in any part")
        return pieces

    @property
    def doc_offsets(self) -> np.ndarray:
        """Document offsets into `tokens` (N + 1 int64); spans every part (O(N) memory: small
        corpora and tests; `document` reads one without it)."""
        if len(self._offsets) == 1:
            return self._offsets[0]
        rest = [o[1:] + b for o, b in zip(self._offsets[1:], self._token_starts[1:])]
        return np.concatenate([self._offsets[0], *rest])

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
        p = int(np.searchsorted(self._doc_starts, i, side="right") - 1)
        offsets, base, j = self._offsets[p], int(self._token_starts[p]), i - int(self._doc_starts[p])
        return self.tokens[base + int(offsets[j]): base + int(offsets[j + 1])]

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

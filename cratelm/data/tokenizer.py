"""A lossless sentencepiece tokenizer: train it, load it, encode and decode.

Lossless means ``decode(encode(text)) == text`` for any UTF-8 text: whitespace runs,
newlines, tabs, CRLF, NUL, emoji, zero-width spaces. sentencepiece gives that with the
options in `LOSSLESS_OPTIONS`. Training is fed line by line (so "\\n" never reaches the
trainer and is a user-defined symbol, as is "\\t"), from a deterministic seeded sample of at
most ``input_sentence_size`` lines: the same inputs give the same model file, byte for byte.

    cratelm train-tokenizer --corpus python-stdlib --out data/tok/stdlib --vocab-size 8192
    python data_prep/train_tokenizer.py data/my_texts/ --out data/tok/mine --vocab-size 32000
"""

from __future__ import annotations

import io
import itertools
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from cratelm.data import sources as src_lib
from cratelm.data.indexed import atomic_path
from cratelm.data.reading import iter_documents
from cratelm.data.tasks import ReadOptions, plan_tasks, sample_tasks
from cratelm.utils import file_sha256  # noqa: F401  (also imported from here)

LOSSLESS_OPTIONS: dict[str, Any] = {
    "normalization_rule_name": "identity",  # no NFKC: keep every code point as written
    "add_dummy_prefix": False,              # no space invented at the start of a text
    "remove_extra_whitespaces": False,      # keep runs of spaces, leading and trailing ones
    "byte_fallback": True,                  # characters outside the vocabulary become bytes
    "allow_whitespace_only_pieces": True,   # indentation "    " may be one piece
}
LINE_SYMBOLS = ["\n", "\t"]
META_SYMBOL = "\u2581"   # sentencepiece's visible space, a character like any other in our texts
MODEL_TYPES = ("bpe", "unigram")
CONTROL_PIECES = {"<unk>": "unknown", "<s>": "BOS", "</s>": "EOS"}


class Tokenizer:
    """A sentencepiece model: ``encode(str) -> list[int]``, ``decode(ids) -> str``,
    ``eos_id``, ``vocab_size``, ``sha256``, ``path``. Pickles as its path."""

    filename = "tokenizer.model"   # its name in a corpus, run or model directory

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer {self.path}: no such file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"tokenizer {self.path}: not a sentencepiece model ({e})") from None
        self.sha256 = file_sha256(self.path)
        self.vocab_size = int(self.sp.get_piece_size())
        self.eos_id = int(self.sp.eos_id())
        if self.eos_id < 0:
            raise ValueError(f"tokenizer {self.path}: has no EOS piece (train it with eos_id >= 0)")
        self.newline_id = int(self.sp.piece_to_id("\n"))
        self.lossless, self._split_lines = self._inspect()

    def _inspect(self) -> tuple[bool, bool]:
        """(trained with the lossless options?, may a text be encoded line by line?).

        Encoding line by line gives the same ids as the whole text (tested) when "\\n" is a
        piece that no other piece contains and nothing in the normalizer looks across lines;
        it is ~25% faster (sentencepiece's cost grows faster than linearly in text length).
        """
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
            proto = pb.ModelProto()
            proto.ParseFromString(Path(self.path).read_bytes())
        except Exception:  # noqa: BLE001 - protobuf missing or incompatible: be conservative
            return False, False
        norm = proto.normalizer_spec
        lossless = (norm.name == "identity" and not norm.add_dummy_prefix and not norm.remove_extra_whitespaces
                    and proto.trainer_spec.byte_fallback)
        newline_ok = self.newline_id != self.sp.unk_id() and not any(
            "\n" in p.piece for i, p in enumerate(proto.pieces) if i != self.newline_id)
        return lossless, lossless and newline_ok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        if META_SYMBOL in text:
            # sentencepiece writes a space as U+2581 inside pieces, so a literal U+2581 would
            # decode as a space: spell it with its three byte-fallback pieces instead
            meta = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SYMBOL.encode()]
            out: list[int] = []
            for i, part in enumerate(text.split(META_SYMBOL)):
                out += (meta if i else []) + self.encode(part)
            return out
        if not self._split_lines or "\n" not in text:
            return self.sp.encode(text)
        out: list[int] = []
        for i, ids in enumerate(self.sp.encode(text.split("\n"), num_threads=1)):
            if i:
                out.append(self.newline_id)
            out += ids
        return out

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents, each followed by EOS: (all ids as one int64 array, tokens per
        document). The array equals ``concat(encode(t) + [eos_id] for t in texts)``.

        Releases the GIL inside sentencepiece, so threads calling it run in parallel.
        """
        if any(META_SYMBOL in t for t in texts):    # rare: take the careful path for this batch
            encoded = [self.encode(t) + [self.eos_id] for t in texts]
            lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
            return np.fromiter(itertools.chain.from_iterable(encoded), np.int64, int(lens.sum())), lens
        if self._split_lines and any("\n" in t for t in texts):
            lines: list[str] = []
            per_doc = np.empty(len(texts), np.int64)
            for j, t in enumerate(texts):
                parts = t.split("\n")
                lines += parts
                per_doc[j] = len(parts)
            # each line is followed by "\n", except a document's last line which gets EOS
            terminators = np.full(len(lines), self.newline_id, np.int64)
            terminators[np.cumsum(per_doc) - 1] = self.eos_id
        else:
            lines, per_doc = texts, np.ones(len(texts), np.int64)
            terminators = np.full(len(texts), self.eos_id, np.int64)
        pieces = self.sp.encode(lines, num_threads=1)
        line_lens = np.fromiter(map(len, pieces), np.int64, len(pieces)) + 1
        ids = np.empty(int(line_lens.sum()), np.int64)
        ends = np.cumsum(line_lens)
        mask = np.ones(len(ids), bool)
        mask[ends - 1] = False
        ids[mask] = np.fromiter(itertools.chain.from_iterable(pieces), np.int64, len(ids) - len(lines))
        ids[ends - 1] = terminators
        starts = np.concatenate([[0], np.cumsum(per_doc)[:-1]])
        doc_lens = np.add.reduceat(line_lens, starts) if len(texts) else np.zeros(0, np.int64)
        return ids, doc_lens

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (EOS and other control ids decode to nothing)."""
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer in ``path``, by file name: a Hugging Face ``*.json`` (cratelm.hf.tokenizer,
    needs the ``tokenizers`` package) or a sentencepiece model; both have the same interface."""
    if str(path).endswith(".json"):
        from cratelm.hf.tokenizer import HFTokenizer

        return HFTokenizer(path)
    return Tokenizer(path)


def sample_lines(docs: Iterable[str], cap: int, seed: int = 0) -> tuple[list[str], int]:
    """(a seeded uniform sample of at most ``cap`` non-empty lines in corpus order, lines seen).
    Reservoir sampling: one pass, memory for ``cap`` lines only, same sample for the same seed."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    n = 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line:
                continue
            if n < cap:
                reservoir.append((n, line))
            else:
                j = rng.randrange(n + 1)
                if j < cap:
                    reservoir[j] = (n, line)
            n += 1
    reservoir.sort()
    return [line for _, line in reservoir], n


def train_tokenizer(inputs: list[Any] | None, out_prefix: str, vocab_size: int = 8192, model_type: str = "bpe", *,
                    corpus: str | None = None, text_key: str = "text", one_doc_per_line: bool = False,
                    on_bad_utf8: str = "skip", hub_split: str = "train", hub_config: str | None = None,
                    sample_bytes: int | None = 256 << 20, report: src_lib.SkipReport | None = None,
                    **options: Any) -> Tokenizer:
    """Train a lossless sentencepiece model on a seeded sample of about ``sample_bytes`` (None:
    all) of files / directories / globs / ``hf:NAME`` / Dataset objects (``inputs``) and/or an
    embedded ``corpus`` (see cratelm/data/sources.py); write ``out_prefix.model`` and
    ``out_prefix.vocab``; return the `Tokenizer`. ``options`` go to `train_tokenizer_on_texts`;
    skipped inputs are counted in ``report``."""
    report = report if report is not None else src_lib.SkipReport()
    opts = ReadOptions(text_key, one_doc_per_line, on_bad_utf8)
    sources = src_lib.resolve_inputs(inputs, corpus, hub_split=hub_split, hub_config=hub_config)
    tasks = sample_tasks(plan_tasks(sources, opts, report), sample_bytes, options.get("seed", 0))
    docs = iter_documents(tasks, sources, opts, report, sample_bytes)
    return train_tokenizer_on_texts(docs, out_prefix, vocab_size, model_type, report=report, **options)


def train_tokenizer_on_texts(texts: Iterable[str], out_prefix: str, vocab_size: int = 8192, model_type: str = "bpe",
                             *, character_coverage: float = 0.9995, special_tokens: list[str] | None = None,
                             input_sentence_size: int = 1_000_000, max_sentence_length: int = 16384,
                             split_digits: bool = True, seed: int = 0, num_threads: int = 2,
                             verbose: bool = False, name: str | None = None,
                             report: src_lib.SkipReport | None = None) -> Tokenizer:
    """Train a lossless sentencepiece model on documents ``texts``; write ``out_prefix.model``
    and ``out_prefix.vocab`` (the .model last, each renamed into place when complete).

    ``special_tokens`` become user-defined symbols (always one token, also inside text).
    ``input_sentence_size`` caps the training lines (a seeded sample) for big corpora.
    The same texts and options give the same model file, byte for byte. ``name``: the model's
    path in messages (its final place, when ``out_prefix`` is temporary); ``report``: the
    inputs skipped so far, named in the error when no text is left.
    """
    name = name or f"{out_prefix}.model"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: expected one of {MODEL_TYPES}")
    reserved = [t for t in special_tokens or [] if t in CONTROL_PIECES]
    if reserved:
        raise ValueError(f"--special-tokens {reserved[0]!r}: that is sentencepiece's own "
                         f"{CONTROL_PIECES[reserved[0]]} piece (already in every model); choose another name")
    symbols = LINE_SYMBOLS + [t for t in (special_tokens or []) if t not in LINE_SYMBOLS]
    if vocab_size < 256 + 3 + len(symbols):
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 pieces + 3 special "
                         f"+ {len(symbols)} user-defined symbols")
    lines, seen = sample_lines(texts, input_sentence_size, seed)
    if not lines:
        why = (f": {report.total} inputs skipped {report.counts} (first: {report.examples})"
               if report is not None and report.total else "")
        raise src_lib.BadInputError(f"no text to train the tokenizer {name} on{why}")
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    options = dict(LOSSLESS_OPTIONS, model_type=model_type, vocab_size=vocab_size, user_defined_symbols=symbols,
                   character_coverage=character_coverage, split_digits=split_digits,
                   max_sentence_length=max_sentence_length, input_sentence_size=0, shuffle_input_sentence=False,
                   num_threads=num_threads, minloglevel=0 if verbose else 2)
    if verbose:
        print(f"train_tokenizer: {len(lines)} of {seen} lines, {options}", file=sys.stderr)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()   # not model_prefix: the proto would record that (temporary) path
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece could not train {name} (vocab_size={vocab_size}, "
                         f"{len(lines)} lines, {model_type}): {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.eos_id() < 0:        # checked before anything is written
        raise ValueError(f"{name}: the trained model has no EOS piece")
    escape = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"})
    vocab = "".join(f"{sp.id_to_piece(i).translate(escape)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    with atomic_path(f"{out}.vocab") as tmp:      # the piece list, for people
        tmp.write_text(vocab, encoding="utf-8")
    with atomic_path(f"{out}.model") as tmp:      # .model last: its presence marks a finished training
        tmp.write_bytes(model.getvalue())
    return Tokenizer(f"{out}.model")

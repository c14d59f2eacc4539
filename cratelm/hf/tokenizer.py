"""Hugging Face tokenizers in cratelm, and cratelm's sentencepiece tokenizer for Hugging Face.

1. `HFTokenizer`: a ``tokenizer.json`` (the ``tokenizers`` library, e.g. GPT-2's byte-level
   BPE) with the interface of `cratelm.data.tokenizer.Tokenizer` (encode, encode_documents,
   decode, eos_id, vocab_size, sha256, path, lossless), so prepare-data, eval and generate
   take either; `cratelm.data.tokenizer.load_tokenizer` picks the class by file name.
   Special tokens written in a text are text (``encode_special_tokens``): a document that
   contains "<|endoftext|>" is encoded as its characters, and only the EOS that cratelm
   appends after each document is the EOS id. The EOS is the first of `EOS_NAMES` that the
   file defines as an added token.

2. `sentencepiece_to_tokenizers`: cratelm's lossless sentencepiece model as a ``tokenizers``
   model giving the same ids. The pieces' "▁" (sentencepiece's space) become real spaces in
   the vocabulary, so no normalizer is needed and a literal "▁" in a text is not a piece:
   it falls back to its three bytes, exactly as `Tokenizer.encode` spells it. BPE: one merge
   per way to split a piece into two pieces, ranked by the piece's id (its score order);
   unigram: the same pieces and scores. "\\n", "\\t" and other user-defined symbols are added
   tokens (split first, as sentencepiece does); control pieces (<s>, </s>) are special
   tokens that a text cannot produce (``split_special_tokens``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cratelm.utils import file_sha256

META_SYMBOL = "\u2581"   # sentencepiece's visible space (as in cratelm/data/tokenizer.py)
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
# a text that a lossless tokenizer gives back exactly (whitespace runs, CRLF, NUL, emoji, ZWSP, U+2581)
PROBE = "  a\tb\r\n\n\x00 é 😀\u200b \u2581x  \n"


class HFTokenizer:
    """A ``tokenizer.json``: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``eos_id``,
    ``vocab_size``, ``sha256``, ``path``, ``lossless``. Pickles as its path."""

    filename = "tokenizer.json"

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as TkTokenizer

        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer {self.path}: no such file")
        try:
            self.tk = TkTokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
            raise ValueError(f"tokenizer {self.path}: not a Hugging Face tokenizer.json ({e})") from None
        self.tk.encode_special_tokens = True          # a special token written in a text is text
        self.sha256 = file_sha256(self.path)
        self.vocab_size = int(self.tk.get_vocab_size(with_added_tokens=True))
        vocab = self.tk.get_vocab(with_added_tokens=True)
        added = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}
        eos = next((n for n in EOS_NAMES if n in added and n in vocab), None)
        if eos is None:
            raise ValueError(f"tokenizer {self.path}: no end-of-text token; cratelm needs one of {EOS_NAMES} "
                             f"as a special added token (it has {sorted(added)})")
        self.eos_token, self.eos_id = eos, int(vocab[eos])
        self.lossless = self.decode(self.encode(PROBE)) == PROBE

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids as one int64 array, tokens per document), each document followed by EOS."""
        encoded = [e.ids + [self.eos_id] for e in self.tk.encode_batch(texts, add_special_tokens=False)]
        lens = np.fromiter(map(len, encoded), np.int64, len(encoded))
        ids = np.fromiter((i for e in encoded for i in e), np.int64, int(lens.sum()))
        return ids, lens

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens such as EOS decode to nothing)."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


# ------------------------------------------------------------------ sentencepiece -> tokenizers
_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_to_tokenizers(path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` that encodes and decodes as cratelm's `Tokenizer(path)`."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer as TkTokenizer, decoders, models

    proto = pb.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise ValueError(f"{path}: only cratelm's lossless sentencepiece models convert exactly "
                         f"(normalizer {norm.name!r}, add_dummy_prefix={norm.add_dummy_prefix})")
    pieces = [(p.piece.replace(META_SYMBOL, " ") if p.type == _NORMAL else p.piece, p.score, p.type)
              for p in proto.pieces]
    unk_id = next(i for i, (_, _, t) in enumerate(pieces) if t == _UNKNOWN)
    if proto.trainer_spec.model_type == 2:                                      # bpe
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        normal = {p for p, _, t in pieces if t == _NORMAL}
        merges = [(p[:k], p[k:]) for p, _, t in pieces if t == _NORMAL for k in range(1, len(p))
                  if p[:k] in normal and p[k:] in normal]
        merges.sort(key=lambda m: (vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))   # stable: the piece's rank
        model = models.BPE(vocab, merges, unk_token=pieces[unk_id][0], byte_fallback=True, fuse_unk=False)
    else:   # unigram: tokenizers' Viterbi breaks ties between equal-score splits unlike sentencepiece
        raise ValueError(f"{path}: only BPE sentencepiece models convert to tokenizer.json exactly "
                         f"(model type {proto.trainer_spec.model_type}; unigram Viterbi ties differ)")
    tk = TkTokenizer(model)
    tk.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tk.add_tokens([AddedToken(p, normalized=False, special=False) for p, _, t in pieces if t == _USER])
    tk.add_special_tokens([AddedToken(p, normalized=False, special=True)
                           for p, _, t in pieces if t in (_CONTROL, _UNKNOWN)])
    tk.encode_special_tokens = True
    return tk


def write_hf_tokenizer(tok, out_dir: str | os.PathLike, model_max_length: int) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``special_tokens_map.json``) of a
    cratelm tokenizer (sentencepiece or tokenizer.json) so that ``AutoTokenizer`` loads it."""
    out = Path(out_dir)
    if isinstance(tok, HFTokenizer):
        (out / "tokenizer.json").write_bytes(Path(tok.path).read_bytes())
        eos, unk = tok.eos_token, None
    else:
        tk = sentencepiece_to_tokenizers(tok.path)
        tk.save(str(out / "tokenizer.json"))
        eos, unk = tok.sp.id_to_piece(tok.eos_id), tok.sp.id_to_piece(tok.sp.unk_id())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
              "pad_token": eos, "unk_token": unk, "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "split_special_tokens": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


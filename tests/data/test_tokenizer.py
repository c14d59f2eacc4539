"""The tokenizer is lossless, deterministic, and its fast paths equal the plain ones."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cratelm.data import Tokenizer, train_tokenizer
from cratelm.data.sources import python_stdlib_files
from cratelm.data.tokenizer import sample_lines, train_tokenizer_on_texts

TORTURE = (
    "def f(x):\r\n\treturn x  \r\n"                      # CRLF, tab, trailing spaces
    "\n\n\n"                                               # blank lines
    "   leading spaces\tand\ttabs\t\n"
    "NUL:\x00: bell:\x07: form feed:\x0c: lone CR:\r:\n"
    "emoji 😀👩‍👩‍👧 flags 🇫🇷 zero\u200bwidth\u200c\u200d joiner, nbsp\u00a0, bom \ufeff\n"
    "Ünïcödé 中文字符 ελληνικά русский العربية 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 e\u0301 (combining) \u2028 \u2029 \x85\n"
    "digits 1234567890 and \\ backslashes \\n not newlines \"quotes\" 'single'\n"
    + " " * 40 + "\n" + "\t" * 7 + "end without newline   "
)

CORPUS = [
    "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"Entry point.\"\"\"\n    for a in argv:\n"
    "        print(a)  # echo\n    return 0\n",
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x = x\n\t\tself.y = y\n",
    "Le café coûte 3 € — naïve façade, Ünïcödé. 数据 😀\n",
    "The quick brown fox jumps over the lazy dog. " * 20 + "\n",
] * 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return train_tokenizer_on_texts(CORPUS + [TORTURE], str(tmp_path_factory.mktemp("tok") / "t"), vocab_size=400)


def test_torture_round_trip(tok):
    assert tok.lossless
    for text in (TORTURE, TORTURE * 3, "", "\n", "\r\n", " ", "\t\n ", "x\n" * 1000, "\x00\x00"):
        assert tok.decode(tok.encode(text)) == text


def test_stdlib_files_round_trip(tmp_path):
    """150 standard-library files decode back exactly (tokenizer trained on a few others)."""
    _, files = python_stdlib_files()
    texts = []
    for p in files[:: max(1, len(files) // 150)][:150]:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    tok = train_tokenizer_on_texts(texts[:10], str(tmp_path / "std"), vocab_size=600)
    assert len(texts) > 100
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_line_split_encoding_equals_whole_text(tok):
    """The fast path (encode line by line) gives exactly sentencepiece's ids for the whole text."""
    for text in CORPUS[:4] + [TORTURE]:
        assert tok.encode(text) == tok.sp.encode(text)


def test_encode_documents_equals_encode_plus_eos(tok):
    docs = CORPUS[:4] + [TORTURE, "a", "\n\n"]
    ids, lens = tok.encode_documents(docs)
    expected = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert ids.tolist() == expected
    assert lens.tolist() == [len(tok.encode(d)) + 1 for d in docs]
    assert (ids == tok.eos_id).sum() == len(docs)


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer_on_texts(CORPUS, str(tmp_path / "a"), vocab_size=350, seed=3)
    b = train_tokenizer_on_texts(CORPUS, str(tmp_path / "b"), vocab_size=350, seed=3)
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.vocab").read_bytes() == (tmp_path / "b.vocab").read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_unigram_special_tokens_and_cap(tmp_path):
    tok = train_tokenizer_on_texts(CORPUS * 4, str(tmp_path / "u"), vocab_size=330, model_type="unigram",
                                   special_tokens=["<|sep|>"], input_sentence_size=50, character_coverage=1.0)
    sep = tok.sp.piece_to_id("<|sep|>")
    assert sep != tok.sp.unk_id()
    text = "a<|sep|>b\n" + TORTURE
    assert sep in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text) == tok.sp.encode(text)           # line-by-line fast path, unigram too


def test_train_from_files_and_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "d").mkdir()
    for i, t in enumerate(CORPUS[:4]):
        (tmp_path / "d" / f"{i}.txt").write_text(t, encoding="utf-8")
    a = train_tokenizer([str(tmp_path / "d")], str(tmp_path / "files"), vocab_size=340)
    b = train_tokenizer([datasets.Dataset.from_dict({"text": CORPUS[:4]})], str(tmp_path / "ds"), vocab_size=340)
    c = train_tokenizer([str(tmp_path / "d" / "*.txt")], str(tmp_path / "glob"), vocab_size=340)
    assert a.sha256 == b.sha256 == c.sha256     # same texts, same model


def test_sample_lines_is_seeded_and_ordered():
    docs = [f"line {i}\n" for i in range(1000)]
    a, seen = sample_lines(docs, 100, seed=1)
    b, _ = sample_lines(docs, 100, seed=1)
    c, _ = sample_lines(docs, 100, seed=2)
    assert seen == 1000 and a == b and a != c and len(a) == 100
    assert a == sorted(a, key=lambda s: int(s.split()[1]))


def test_errors_and_pickle(tmp_path, tok):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer_on_texts(CORPUS, str(tmp_path / "x"), vocab_size=100)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer_on_texts(CORPUS, str(tmp_path / "x"), model_type="wordpiece")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(tmp_path / "bad.model")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.sha256 == tok.sha256 and clone.encode(TORTURE) == tok.encode(TORTURE)
    assert np.all(np.array(tok.encode(TORTURE)) < tok.vocab_size)


def test_sentencepiece_space_symbol_round_trips(tok):
    """U+2581 is sentencepiece's own stand-in for a space: a literal one must come back as itself."""
    texts = ["a\u2581b", "line1\nline2\u2581", "\u2581\u2581 \u2581", "x\u2581\ty\n\u2581"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    ids, lens = tok.encode_documents(texts + ["plain"])
    assert ids.tolist() == sum((tok.encode(t) + [tok.eos_id] for t in texts + ["plain"]), [])
    assert lens.tolist() == [len(tok.encode(t)) + 1 for t in texts + ["plain"]]

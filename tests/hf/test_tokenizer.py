"""Hugging Face tokenizers in cratelm (a tokenizer.json in prepare-data, eval, generate), and
cratelm's sentencepiece tokenizer in Hugging Face (the export's tokenizer.json)."""

import json

import pytest

from cratelm.checkpoints import save_model
from cratelm.cli import main
from cratelm.data import IndexedTokens
from cratelm.data.prepare import prepare_corpus
from cratelm.data.tokenizer import file_sha256, load_tokenizer, train_tokenizer_on_texts
from cratelm.hf.export import save_hf
from cratelm.hf.tokenizer import HFTokenizer

from .conftest import stdlib_texts, tiny_model

TORTURE = ("  leading spaces\tand\ttabs\r\nCRLF\rCR\n\n\nblank lines\x00NUL é ü ß 日本語 😀👍🏽 "
           "zero\u200bwidth \ufeffBOM \u00a0nbsp \u3000ideographic \u2581 U+2581 \u2581\u2581 "
           "<|endoftext|> </s> <s> <unk> <0x41> trailing   \n\t\t    \n")


@pytest.fixture(scope="module")
def bytelevel_json(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer.json trained here with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(stdlib_texts(20), trainer)
    path = tmp_path_factory.mktemp("bytelevel") / "tokenizer.json"
    tk.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus_docs():
    return stdlib_texts(25) + [TORTURE, TORTURE * 3, "x", "<|endoftext|>"]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_bytelevel_tokenizer_json_prepares_a_corpus_that_decodes_back_byte_exact(bytelevel_json, corpus_docs,
                                                                                 tmp_path):
    tok = load_tokenizer(bytelevel_json)
    assert isinstance(tok, HFTokenizer) and tok.lossless and tok.eos_token == "<|endoftext|>"
    # a special token written in a text is text: only cratelm's own EOS ends a document
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")
    src = write_jsonl(tmp_path / "docs.jsonl", corpus_docs)
    summary = prepare_corpus([str(src)], tmp_path / "corpus", tokenizer=str(bytelevel_json), val=5,
                             num_proc=2, progress=False)
    meta = json.loads((tmp_path / "corpus" / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer.json" and summary["tokenizer"].endswith("tokenizer.json")
    assert meta["tokenizer_sha256"] == file_sha256(bytelevel_json) == tok.sha256
    assert (tmp_path / "corpus" / "tokenizer.json").read_bytes() == bytelevel_json.read_bytes()
    assert meta["vocab_size"] == tok.vocab_size == 320 and meta["eos_id"] == tok.eos_id
    assert meta["num_bytes"] == sum(len(d.encode()) for d in corpus_docs)
    decoded = []
    for split in ("train", "val"):
        shard = IndexedTokens(tmp_path / "corpus", split)
        for i in range(len(shard)):
            ids = shard.document(i)
            assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
            decoded.append(tok.decode(ids[:-1]).encode())
    assert sorted(decoded) == sorted(d.encode() for d in corpus_docs)


@pytest.fixture(scope="module")
def json_model(bytelevel_json, tmp_path_factory):
    """A tiny model that records the byte-level tokenizer.json."""
    model = tiny_model("crate-gpt", vocab_size=320)
    return save_model(model, model.cfg, tmp_path_factory.mktemp("json-model") / "model",
                      tokenizer=str(bytelevel_json))


def test_eval_and_generate_take_a_tokenizer_json_and_refuse_another_tokenizers_shard(
        json_model, bytelevel_json, corpus_docs, tmp_path, capsys):
    assert (json_model / "tokenizer.json").read_bytes() == bytelevel_json.read_bytes()
    text = tmp_path / "text.txt"
    plain = TORTURE.replace("\r", "")                   # (how eval reads CR is evaluate.py's business)
    text.write_bytes(plain.encode())
    assert main(["eval", "--checkpoint", str(json_model)]) == 2              # neither --data nor --tasks
    assert "--data FILES" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(json_model), "--data", str(text)]) == 0
    n = len(load_tokenizer(bytelevel_json).encode(plain))            # + EOS, first token unscored
    assert f"| {text} | {n} |" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(json_model), "--prompt", "def f(", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def f(")
    # the same documents through a sentencepiece tokenizer: eval refuses the shard, naming both
    src = write_jsonl(tmp_path / "docs.jsonl", corpus_docs[:10])
    other = prepare_corpus([str(src)], tmp_path / "sp", vocab_size=512, val=2, progress=False)
    assert main(["eval", "--checkpoint", str(json_model), "--data", str(tmp_path / "sp" / "val.bin")]) == 2
    err = capsys.readouterr().err
    assert other["tokenizer_sha256"] in err and file_sha256(bytelevel_json) in err


def test_exported_sentencepiece_tokenizer_encodes_and_decodes_as_cratelm(sp_model):
    from transformers import AutoTokenizer

    tok, _, _, hf_dir = sp_model
    hf = AutoTokenizer.from_pretrained(hf_dir)                       # no remote code: tokenizer.json
    assert (hf_dir / "tokenizer.model").read_bytes() == open(tok.path, "rb").read()   # for import-hf
    assert hf.eos_token_id == tok.eos_id and hf.vocab_size == tok.vocab_size
    # the stdlib sample (files the tokenizer was trained on and files it was not) and the torture text
    texts = stdlib_texts(80)[::4] + [TORTURE, "\u2581", " ", "\n", ""]
    for text in texts:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:80]
        assert hf.decode(ids) == text
        assert hf.decode(ids + [tok.eos_id], skip_special_tokens=True) == tok.decode(ids + [tok.eos_id]) == text


def test_unigram_sentencepiece_is_shipped_as_is(tmp_path, capsys):
    tok = train_tokenizer_on_texts(stdlib_texts(10), str(tmp_path / "uni"), vocab_size=400, model_type="unigram")
    out = save_hf(tiny_model("gpt2", vocab_size=400), tmp_path / "hf", tokenizer=tok.path)
    assert "only BPE sentencepiece models convert" in capsys.readouterr().err
    assert (out / "tokenizer.model").read_bytes() == open(tok.path, "rb").read()
    assert not (out / "tokenizer.json").exists()

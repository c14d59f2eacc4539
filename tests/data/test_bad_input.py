"""Bad input found by a tester (issue 12 item 7): each is a named error or a counted skip, the
good documents are kept, and the command line prints no traceback."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from cratelm.data import Tokenizer
from cratelm.data.prepare import prepare_corpus
from cratelm.data.sources import BadInputError
from cratelm.data.tokenizer import train_tokenizer_on_texts

GOOD = [f"good document {i}: some words, Ünïcödé ✓\n\tand a tab" for i in range(30)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    return train_tokenizer_on_texts(GOOD, str(tmp_path_factory.mktemp("tok") / "tok"), vocab_size=300).path


def cli(*args: object, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cratelm", *map(str, args)], capture_output=True, text=True,
                          timeout=120, **kw)


def jsonl(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def train_docs(out: pathlib.Path, tok: Tokenizer) -> list[str]:
    from cratelm.data import IndexedTokens

    shard = IndexedTokens(out, "train")
    return [tok.decode(shard.document(i)[:-1].tolist()) for i in range(shard.num_documents)]


def test_lone_surrogate_is_skipped_with_its_line_or_replaced(tmp_path, tok_path):
    src = jsonl(tmp_path / "in" / "a.jsonl", [json.dumps({"text": g}) for g in GOOD[:3]]
                + ['{"text": "bad \\ud800 here"}', json.dumps({"text": GOOD[3]})])
    s = prepare_corpus([str(src)], tmp_path / "o", tok_path, val=0, progress=False)
    assert s["documents"] == 4 and s["skipped"]["examples"]["lone surrogate (not encodable as UTF-8)"] == [f"{src}:4"]
    assert train_docs(tmp_path / "o", Tokenizer(tok_path)) == GOOD[:4]
    s = prepare_corpus([str(src)], tmp_path / "r", tok_path, val=0, on_bad_utf8="replace", progress=False)
    assert s["documents"] == 5 and s["skipped"]["replaced_utf8"] == 1
    assert train_docs(tmp_path / "r", Tokenizer(tok_path))[3] == "bad \ufffd here"
    # training a tokenizer on it: no C++ cast error either
    s = prepare_corpus([str(src)], tmp_path / "t", vocab_size=320, val=0, progress=False)
    assert s["documents"] == 4 and s["tokenizer_trained"]


def test_all_inputs_bad_while_training_names_files_and_reasons(tmp_path):
    d = tmp_path / "in"
    jsonl(d / "a.jsonl", ["not json", '{"other": 1}'])
    (d / "b.txt").write_bytes(b"\xff\xfe latin")
    r = cli("prepare-data", d, "--out", tmp_path / "out", "--vocab-size", "280", "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no text to train the tokenizer" in r.stderr and str(tmp_path / "out" / "tokenizer.model") in r.stderr
    assert ".partial" not in r.stderr and f"{d / 'a.jsonl'}:1" in r.stderr and "not valid UTF-8" in r.stderr
    assert not (tmp_path / "out").exists()                    # a failed run leaves no empty --out


def test_fifo_in_an_input_directory_is_skipped_not_waited_for(tmp_path, tok_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text(GOOD[0], encoding="utf-8")
    os.mkfifo(d / "pipe.txt")
    s = prepare_corpus([str(d)], tmp_path / "o", tok_path, val=0, progress=False)
    assert s["documents"] == 1
    assert s["skipped"]["examples"]["not a regular file (FIFO, socket or device)"] == [str(d / "pipe.txt")]


def test_out_inside_an_input_directory_is_not_read_back(tmp_path, tok_path):
    d = tmp_path / "in"
    jsonl(d / "a.jsonl", [json.dumps({"text": g}) for g in GOOD[:5]])
    for _ in range(2):                                        # the rerun sees the first run's outputs
        s = prepare_corpus([str(d)], d / "out", tok_path, val=0, progress=False)
        assert s["documents"] == 5 and s["skipped"]["total"] == 0
    s = prepare_corpus([str(d / "*")], d / "out", tok_path, val=0, progress=False)     # a glob too
    assert s["documents"] == 5 and s["skipped"]["total"] == 0


def test_a_control_piece_as_special_token_is_refused_before_training(tmp_path):
    d = tmp_path / "in"
    jsonl(d / "a.jsonl", [json.dumps({"text": g}) for g in GOOD])
    r = cli("prepare-data", d, "--out", tmp_path / "out", "--special-tokens", "</s>", "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "'</s>': that is sentencepiece's own EOS piece" in r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="'<s>'.*BOS"):
        train_tokenizer_on_texts(GOOD, str(tmp_path / "t"), vocab_size=300, special_tokens=["<s>"])
    assert not list(tmp_path.glob("t.*"))                     # no model left behind


def test_output_into_a_closed_pipe_prints_no_traceback(tmp_path, tok_path):
    d = tmp_path / "in"
    jsonl(d / "a.jsonl", [json.dumps({"text": g}) for g in GOOD])
    cmd = [sys.executable, "-m", "cratelm", "prepare-data", str(d), "--out", str(tmp_path / "o"),
           "--tokenizer", tok_path, "--no-progress", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                                       # `| head` that has read enough
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 1) and "Traceback" not in err and "BrokenPipe" not in err
    assert (tmp_path / "o" / "meta.json").exists()


def test_one_document_with_a_val_split_fails_before_any_work(tmp_path):
    (tmp_path / "one.txt").write_text("\n".join(GOOD), encoding="utf-8")
    with pytest.raises(ValueError, match=r"the input is one document \(.*one.txt\): it cannot be split"):
        prepare_corpus([str(tmp_path / "one.txt")], tmp_path / "o", vocab_size=280, progress=False)
    assert not (tmp_path / "o").exists()                      # checked before the tokenizer was trained
    with pytest.raises(BadInputError, match="input not found"):
        prepare_corpus([str(tmp_path / "none.txt")], tmp_path / "o")

"""prepare_corpus: round trips, the documented format, splits, bad input, kills and reruns."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cratelm.data import IndexedTokens, ShardFormatError, Tokenizer
from cratelm.data.indexed import choose_dtype
from cratelm.data.prepare import TokenizerMismatchError, prepare_corpus
from cratelm.data.sources import BadInputError
from cratelm.data.tokenizer import train_tokenizer_on_texts

REPO = pathlib.Path(__file__).resolve().parents[2]
PART = "part-00000-of-00001"

DOCS = [
    f"doc {i}: Ünïcödé ✓ 😀 中文\n\tindented with a tab\ntrailing spaces   \n\n\nblank lines above\n"
    f"{'    ' * (i % 4)}code = {i} ** 2  # comment\r\n" + "words " * (i % 17) + f"\nend {i}"
    for i in range(40)
]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer_on_texts(DOCS, str(d / "tok"), vocab_size=400).path


def write_docs(folder: pathlib.Path, docs: list[str]) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_bytes(d.encode("utf-8"))
    return folder


def read_shard_numpy(bin_path: pathlib.Path):
    """The reader of docs/data-format.md, written from the document, numpy only: split NAME of
    the corpus beside ``bin_path`` (``OUT/NAME.bin``), its parts' files put back in order."""
    out, name = bin_path.parent, bin_path.stem
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == 2
    tokens, offsets, dtype = [], [np.zeros(1, np.int64)], None
    for part in meta["parts"]:
        info = json.loads((out / part / "part.json").read_text())["splits"].get(name)
        if info is None:
            continue
        idx = (out / part / info["index"]).read_bytes()
        assert idx[:8] == b"CRLMIDX\x00"
        version, code = np.frombuffer(idx, "<u4", 2, 8)
        (n_docs,) = np.frombuffer(idx, "<u8", 1, 16)
        assert version == 1 and len(idx) == 32 + 8 * (int(n_docs) + 1)
        dtype = {2: "<u2", 4: "<u4"}[int(code)]
        part_tokens = np.concatenate([np.fromfile(out / part / f["file"], dtype=dtype) for f in info["files"]])
        local = np.frombuffer(idx, "<i8", int(n_docs) + 1, 32)
        assert local[0] == 0 and len(part_tokens) == local[-1]
        offsets.append(local[1:] + sum(map(len, tokens)))
        tokens.append(part_tokens)
    if not tokens:                                   # no part drew a document for this split
        return meta, np.zeros(0, np.uint16), offsets[0], dtype
    return meta, np.concatenate(tokens), np.concatenate(offsets), dtype


def decoded_docs(out: pathlib.Path, split: str, tok: Tokenizer) -> list[str]:
    meta, tokens, offsets, _ = read_shard_numpy(out / f"{split}.bin")
    docs = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        assert tokens[b - 1] == meta["eos_id"]
        docs.append(tok.decode(tokens[a: b - 1].tolist()))
    return docs


def test_round_trip_format_and_counts(tmp_path, tok_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # inputs named "in/...": the split draws do not depend on tmp_path
    out = tmp_path / "out"
    write_docs(tmp_path / "in", DOCS)
    s = prepare_corpus(["in"], out, tok_path, val=0.1, test=3, progress=False)
    tok = Tokenizer(out / "tokenizer.model")
    assert tok.sha256 == Tokenizer(tok_path).sha256
    got = {name: decoded_docs(out, name, tok) for name in ("train", "val", "test")}
    assert sorted(sum(got.values(), [])) == sorted(DOCS)          # every document back, exactly
    assert len(got["test"]) == 3 and 1 <= len(got["val"]) <= 10        # val: each document with p = 0.1
    meta = json.loads((out / "meta.json").read_text())
    total_tokens = total_docs = 0
    for name in ("train", "val", "test"):
        m, tokens, offsets, dtype = read_shard_numpy(out / f"{name}.bin")
        assert dtype == "<u2" and m["dtype"] == "uint16"
        sp = meta["splits"][name]
        assert sp["num_tokens"] == len(tokens) and sp["num_documents"] == len(offsets) - 1
        assert int((tokens == meta["eos_id"]).sum()) == sp["num_documents"]      # one EOS per document
        assert set((offsets[1:] - 1).tolist()) == set(np.flatnonzero(tokens == meta["eos_id"]).tolist())
        assert sp["num_bytes"] == sum(len(d.encode()) for d in got[name])
        total_tokens += len(tokens)
        total_docs += len(offsets) - 1
        ds = IndexedTokens(out / f"{name}.bin")
        assert ds.num_tokens == len(tokens) and np.array_equal(ds.tokens, tokens)
        assert np.array_equal(ds.doc_offsets, offsets) and ds.num_bytes == sp["num_bytes"]
    assert (meta["num_tokens"], meta["num_documents"]) == (total_tokens, total_docs) == (s["tokens"], 40)
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer"] == "tokenizer.model"
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["inputs"] == ["in"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in (out / "part-00000-of-00001").iterdir()) == [
        "part.json", "test.00000.bin", "test.idx", "train.00000.bin", "train.idx", "val.00000.bin", "val.idx"]


def test_script_writes_what_numpy_reads(tmp_path, tok_path):
    """data_prep/tokenize_corpus.py on JSON lines, read back with the documented format only."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS), encoding="utf-8")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "data_prep/tokenize_corpus.py"), str(src), "--text-key", "body",
                        "--tokenizer", tok_path, "--out", str(out), "--val", "5", "--dtype", "uint32",
                        "--num-proc", "2", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "40 documents" in r.stdout and "tokens/s" in r.stdout
    tok = Tokenizer(tok_path)
    assert read_shard_numpy(out / "val.bin")[3] == "<u4"
    assert sorted(decoded_docs(out, "train", tok) + decoded_docs(out, "val", tok)) == sorted(DOCS)


def test_splits_deterministic_disjoint_and_num_proc_independent(tmp_path, tok_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # inputs named "in/...": the split draws do not depend on tmp_path
    write_docs(tmp_path / "in", DOCS)
    src = ["in"]
    kw = dict(val=0.2, test=0.1, progress=False)
    prepare_corpus(src, tmp_path / "a", tok_path, seed=1, num_proc=1, **kw)
    prepare_corpus(src, tmp_path / "b", tok_path, seed=1, num_proc=2, **kw)
    prepare_corpus(src, tmp_path / "c", tok_path, seed=2, **kw)
    for f in ("train.00000.bin", "train.idx", "val.00000.bin", "val.idx", "test.00000.bin", "test.idx", "part.json"):
        assert (tmp_path / "a" / PART / f).read_bytes() == (tmp_path / "b" / PART / f).read_bytes(), f
    assert (tmp_path / "a" / "meta.json").read_bytes() == (tmp_path / "b" / "meta.json").read_bytes()
    tok = Tokenizer(tok_path)
    a = {n: decoded_docs(tmp_path / "a", n, tok) for n in ("train", "val", "test")}
    c = {n: decoded_docs(tmp_path / "c", n, tok) for n in ("train", "val", "test")}
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"])
    assert not set(a["val"]) & set(a["test"])
    assert a["val"] != c["val"]
    assert a["train"] == [d for d in DOCS if d in set(a["train"])]   # corpus order kept


def test_the_documented_reader_reads_every_split_and_an_empty_one(tmp_path, tok_path):
    """The numpy reader printed in docs/data-format.md, run as written: the same documents as
    IndexedTokens, and an empty result for a split no part holds."""
    text = (REPO / "docs/data-format.md").read_text(encoding="utf-8")
    code = text.split("## Reading a split with numpy alone", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/data-format.md", "exec"), scope)
    out = tmp_path / "out"
    prepare_corpus([str(write_docs(tmp_path / "in", DOCS))], out, tok_path, val=2, progress=False)
    for name in ("train", "val"):
        meta, tokens, offsets, docs = scope["read_split"](out, name)
        ds = IndexedTokens(out, name)
        assert np.array_equal(tokens, ds.tokens[:]) and np.array_equal(offsets, ds.doc_offsets)
        assert len(docs) == ds.num_documents and all(d[-1] == meta["eos_id"] for d in docs)
    meta, tokens, offsets, docs = scope["read_split"](out, "test")
    assert len(tokens) == 0 and offsets.tolist() == [0] and docs == []


def test_split_sizes_by_fraction_and_count(tmp_path, tok_path, monkeypatch):
    """A fraction draws each document with that probability (from its own hash: the same on every
    machine); a count holds out exactly that many documents, the rest stays in input order."""
    monkeypatch.chdir(tmp_path)          # input "d.jsonl": the draws do not depend on tmp_path
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(2000)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    s = prepare_corpus(["d.jsonl"], tmp_path / "f", tok_path, val=0.05, test=0.1, progress=False)
    assert abs(s["splits"]["val"]["num_documents"] - 100) < 35 and abs(s["splits"]["test"]["num_documents"] - 200) < 45
    s = prepare_corpus(["d.jsonl"], tmp_path / "c", tok_path, val="7", test=5, progress=False)
    assert [s["splits"][n]["num_documents"] for n in ("train", "val", "test")] == [1988, 7, 5]
    tok = Tokenizer(tok_path)
    val, test = decoded_docs(tmp_path / "c", "val", tok), decoded_docs(tmp_path / "c", "test", tok)
    assert val == sorted(val, key=lambda d: int(d.split()[1])) and not set(val) & set(test)
    with pytest.raises(ValueError, match="leave no training documents"):
        prepare_corpus(["d.jsonl"], tmp_path / "x", tok_path, val=0.5, test=0.5)
    with pytest.raises(ValueError, match="fraction"):
        prepare_corpus(["d.jsonl"], tmp_path / "x", tok_path, val=1.5)


def test_formats_dataset_and_hub(tmp_path, tok_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"text": DOCS[0]}, {"text": DOCS[1]}]))
    pq.write_table(pa.table({"text": DOCS[2:4]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_bytes(b"line one\r\nline two\n\n\nline three")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming:
                        datasets.Dataset.from_dict({"text": [f"{name}/{config}/{split}"]}).to_iterable_dataset())
    ds = datasets.Dataset.from_dict({"text": DOCS[4:6]})
    out = tmp_path / "out"
    s = prepare_corpus([str(tmp_path / "a.json"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt"), ds,
                        "hf:org/name"], out, tok_path, one_doc_per_line=True, hub_config="cfg", val=0,
                       progress=False)
    assert decoded_docs(out, "train", Tokenizer(tok_path)) == DOCS[:4] + [
        "line one", "line two", "line three"] + DOCS[4:6] + ["org/name/cfg/train"]
    assert s["documents"] == 10 and "val" not in json.loads((out / "meta.json").read_text())["splits"]


def test_bad_inputs_are_reported_not_fatal(tmp_path, tok_path):
    d = write_docs(tmp_path / "in", DOCS[:5])
    (d / "latin1.txt").write_bytes("café olé".encode("latin-1"))
    (d / "binary.dat").write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    (d / "empty.txt").write_bytes(b"")
    (d / "broken-link.txt").symlink_to(tmp_path / "nowhere")
    (d / "x.jsonl").write_text('{"text": "good one"}\nnot json\n{"other": 1}\n{"text": 5}\n\n{"text": ""}\n'
                               '{"text": "raw \u2028 line separator"}\r\n', encoding="utf-8")
    out = tmp_path / "out"
    s = prepare_corpus([str(d)], out, tok_path, val=1, progress=False)
    sk = s["skipped"]
    assert s["documents"] == 7 and sk["total"] == 8
    assert "raw \u2028 line separator" in decoded_docs(out, "train", Tokenizer(tok_path)) + \
        decoded_docs(out, "val", Tokenizer(tok_path))
    assert sk["counts"]["not valid UTF-8"] == 1 and sk["examples"]["not valid UTF-8"] == [str(d / "latin1.txt")]
    assert sk["counts"]["binary (NUL byte)"] == 1 and sk["counts"]["empty file"] == 1
    assert [k for k in sk["counts"] if k.startswith("unreadable")] and sk["counts"]["empty document"] == 1
    assert sk["examples"]["not JSON"][0].startswith(f"{d / 'x.jsonl'}:2 ")
    assert sk["examples"]["JSON record lacks key 'text'"] == [f"{d / 'x.jsonl'}:3"]
    assert sk["examples"]["JSON 'text' is not a string"] == [f"{d / 'x.jsonl'}:4"]
    assert json.loads((out / "meta.json").read_text())["skipped"] == sk

    s = prepare_corpus([str(d / "latin1.txt"), str(d / "000.txt")], tmp_path / "rep", tok_path, val=0,
                       on_bad_utf8="replace", progress=False)
    assert s["documents"] == 2 and s["skipped"]["replaced_utf8"] == 1
    assert "caf\ufffd ol\ufffd" in decoded_docs(tmp_path / "rep", "train", Tokenizer(tok_path))

    with pytest.raises(BadInputError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        prepare_corpus([str(d)], tmp_path / "fail", tok_path, on_bad_utf8="fail", progress=False)
    assert not (tmp_path / "fail").exists()            # nothing left behind, not even an empty --out

    with pytest.raises(BadInputError, match=r"input not found: .*missing\.txt.*nothing\*\.txt"):
        prepare_corpus([str(d / "missing.txt"), str(tmp_path / "nothing*.txt")], tmp_path / "m", tok_path)
    assert not (tmp_path / "m").exists()
    with pytest.raises(BadInputError, match="no usable input: 1 inputs skipped {'empty file': 1}"):
        prepare_corpus([str(d / "empty.txt")], tmp_path / "e", tok_path, progress=False)
    assert not (tmp_path / "e" / "meta.json").exists()


def test_dtype_limits():
    assert choose_dtype(65536) == "uint16" and choose_dtype(65537) == "uint32"
    with pytest.raises(ValueError, match="vocab_size=70000 does not fit dtype uint16"):
        choose_dtype(70000, "uint16")


def test_tokenizer_mismatch_refused_and_rerun(tmp_path, tok_path):
    src = [str(write_docs(tmp_path / "in", DOCS))]
    out = tmp_path / "out"
    prepare_corpus(src, out, tok_path, progress=False)
    before = (out / PART / "train.00000.bin").read_bytes()
    other = train_tokenizer_on_texts(DOCS[:10], str(tmp_path / "other"), vocab_size=330)
    with pytest.raises(TokenizerMismatchError) as e:
        prepare_corpus(src, out, other.path, progress=False)
    assert Tokenizer(tok_path).sha256 in str(e.value) and other.sha256 in str(e.value)
    assert (out / PART / "train.00000.bin").read_bytes() == before and (out / "meta.json").exists()
    # the same tokenizer (here: the corpus' own copy) may rewrite it, with other splits
    prepare_corpus(src, out, str(out / "tokenizer.model"), val=2, test=2, progress=False)
    assert IndexedTokens(out, "test").num_documents == 2


def test_failure_midway_leaves_no_complete_looking_corpus(tmp_path, tok_path, monkeypatch):
    import cratelm.data.prepare as prep

    src = [str(write_docs(tmp_path / "in", DOCS))]
    out = tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(prep, "_install_part", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(src, out, tok_path, progress=False)
    assert not out.exists()                                      # it made --out: it removes it
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus(src, out, tok_path, progress=False)
    assert sorted(p.name for p in out.iterdir()) == []
    with pytest.raises(ShardFormatError, match="not a complete prepared corpus"):
        IndexedTokens(out / "train.bin")
    monkeypatch.undo()
    prepare_corpus(src, out, tok_path, val=0.1, progress=False)  # a rerun works
    assert IndexedTokens(out).num_documents + IndexedTokens(out, "val").num_documents == 40


@pytest.mark.parametrize("existing", [False, True])
def test_killed_run_leaves_previous_state_and_rerun_works(tmp_path, tok_path, existing):
    """SIGKILL a preparation mid-tokenization: into an empty directory it leaves no meta.json
    and no final shard; over a complete corpus it leaves that corpus intact. A rerun succeeds."""
    src = write_docs(tmp_path / "in", DOCS)
    out = tmp_path / "out"
    if existing:
        prepare_corpus([str(src)], out, tok_path, val=5, progress=False)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    script = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {str(REPO)!r})
        from cratelm.data import prepare, tasks, tokenizer
        orig = tokenizer.Tokenizer.encode_documents
        calls = []
        def slow(self, texts):
            calls.append(1)
            if len(calls) == 3:        # two batches are written: tell the test to kill us now
                open({str(tmp_path / "started")!r}, "w").close()
            time.sleep(0.2)
            return orig(self, texts)
        tokenizer.Tokenizer.encode_documents = slow
        tasks.CHUNK_BYTES = 1                # one task per file
        prepare.prepare_corpus([{str(src)!r}], {str(out)!r}, {tok_path!r}, progress=False, num_proc=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "started").exists():
            assert time.time() < deadline and proc.poll() is None, "the preparation never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = out / f".partial-{socket.gethostname()}-{proc.pid}"
    assert [p.name for p in partial.iterdir()] == [PART]         # the unfinished part, no part.json
    left = {p.name for p in (partial / PART).iterdir()}
    assert {"train.00000.bin", "train.idx", "val.idx"} <= left <= {"train.00000.bin", "train.idx", "val.idx",
                                                                   "val.00000.bin"}
    if existing:
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and partial not in p.parents} == before
        assert IndexedTokens(out, "val").num_documents == 5
    else:
        assert list(out.iterdir()) == [partial]               # only the temporary directory
    prepare_corpus([str(src)], out, tok_path, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", PART, "tokenizer.model", "tokenizer.vocab"]


def test_python_stdlib_subset_is_deterministic(tmp_path):
    kw = dict(corpus="python-stdlib", max_documents=25, vocab_size=600, val=2, progress=False)
    a = prepare_corpus(None, tmp_path / "a", **kw)
    prepare_corpus(None, tmp_path / "b", num_proc=2, **kw)
    assert a["documents"] == 25 and a["tokenizer_trained"]
    for f in ("tokenizer.model", f"{PART}/train.00000.bin", f"{PART}/train.idx", f"{PART}/val.idx", "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["inputs"][0]["corpus"] == "python-stdlib"
    tok = Tokenizer(tmp_path / "a" / "tokenizer.model")
    val = decoded_docs(tmp_path / "a", "val", tok)
    assert len(val) == 2 and all(d.strip() for d in val)


def test_stdlib_splits_do_not_depend_on_where_python_is_installed(tmp_path, tok_path, monkeypatch):
    """The embedded corpus's documents are named by their path under the standard library, so
    the same files under two install prefixes give the same fraction split, byte for byte."""
    from cratelm.data import sources
    roots = [tmp_path / "usr" / "lib" / "python3", tmp_path / "opt" / "py" / "lib"]
    for root in roots:
        for i, d in enumerate(DOCS):
            (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
            (root / f"pkg{i % 3}" / f"m{i:02d}.py").write_text(d, encoding="utf-8")
    for k, root in enumerate(roots):
        files = sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix())
        monkeypatch.setattr(sources, "python_stdlib_files", lambda r=root, f=files: (r, f))
        prepare_corpus(None, tmp_path / f"out{k}", tok_path, corpus="python-stdlib", val=0.3, test=0.2, progress=False)
    for f in ("train.00000.bin", "train.idx", "val.00000.bin", "val.idx", "test.00000.bin", "test.idx"):
        assert (tmp_path / "out0" / PART / f).read_bytes() == (tmp_path / "out1" / PART / f).read_bytes(), f
    tok = Tokenizer(tok_path)
    assert len(decoded_docs(tmp_path / "out0", "val", tok)) >= 5      # 40 documents, p = 0.3, fixed draws


def test_scripts_stdlib_and_train_tokenizer(tmp_path):
    """The thin scripts run end to end (the stdlib one on a subset: --max-documents)."""
    out = tmp_path / "stdlib"
    r = subprocess.run([sys.executable, str(REPO / "data_prep/prepare_stdlib.py"), "--out", str(out),
                        "--max-documents", "20", "--val", "1", "--vocab-size", "600", "--no-progress", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["documents"] == 20 and summary["splits"]["val"]["num_documents"] == 1
    docs = write_docs(tmp_path / "in", DOCS)
    r = subprocess.run([sys.executable, str(REPO / "data_prep/train_tokenizer.py"), str(docs),
                        "--out", str(tmp_path / "tok" / "t"), "--vocab-size", "350", "--special-tokens", "<|x|>"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Tokenizer(tmp_path / "tok" / "t.model").sp.piece_to_id("<|x|>") > 0
    r = subprocess.run([sys.executable, str(REPO / "data_prep/tokenize_corpus.py"), str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "input not found" in r.stderr and "Traceback" not in r.stderr


def test_hub_dataset_that_cannot_load(tmp_path, tok_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BadInputError, match="hf:org/x: cannot load hub dataset 'org/x'.*no network"):
        prepare_corpus(["hf:org/x"], tmp_path / "o", tok_path)
    assert not (tmp_path / "o").exists()

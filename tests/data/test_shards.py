"""Many machines (issue 12 item 2): a corpus prepared in parts equals one prepared in one go,
token for token and in the sampler's stream; verify-data checks every part; the sbatch array
example runs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cratelm.data import BatchSampler, IndexedTokens, TokenWindows, tasks
from cratelm.data.prepare import prepare_corpus
from cratelm.data.tokenizer import train_tokenizer_on_texts
from cratelm.data.verify import verify_corpus

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = [f"document {i}: " + "word " * (i % 23) + f"Ünïcödé {i * i}\n\tend" for i in range(600)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[list[str], str]:
    d = tmp_path_factory.mktemp("in")
    for k, (a, b) in enumerate([(0, 250), (250, 260), (260, 600)]):       # files of unequal sizes
        (d / f"{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[a:b]), encoding="utf-8")
    (d / "3.txt").write_text(DOCS[0], encoding="utf-8")                     # one-document-per-file kind
    tok = train_tokenizer_on_texts(DOCS, str(d / "tok"), vocab_size=300).path
    return [str(d / f"{k}.jsonl") for k in range(3)] + [str(d / "3.txt")], tok


def test_parts_equal_one_go_token_for_token_and_in_the_sampler(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(tasks, "CHUNK_BYTES", 3000)                       # ~20 tasks
    srcs, tok = inputs
    kw = dict(val=0.1, test=0.05, progress=False, max_file_bytes=4000)       # files of 2000 tokens
    one = prepare_corpus(srcs, tmp_path / "one", tok, num_proc=2, **kw)
    assert one["complete"] and len(one["splits"]["train"]["files"]) > 3
    for i in (2, 0, 1):                                                      # any order, any machine
        s = prepare_corpus(srcs, tmp_path / "three", tok, num_shards=3, shard_index=i, num_proc=1, **kw)
        assert s["complete"] == (i == 1) and (tmp_path / "three" / "meta.json").exists() == (i == 1)
    for name in ("train", "val", "test"):
        a, b = IndexedTokens(tmp_path / "one", name), IndexedTokens(tmp_path / "three", name)
        assert a.num_documents == b.num_documents > 0
        assert np.array_equal(a.tokens[:], b.tokens[:]) and np.array_equal(a.doc_offsets, b.doc_offsets)
        assert np.array_equal(a.document(-1), b.document(-1)) and a.num_bytes == b.num_bytes
    m1, m3 = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "three"))
    assert m1["splits"] == m3["splits"] and len(m3["parts"]) == 3
    wa, wb = TokenWindows([tmp_path / "one"], 64), TokenWindows([tmp_path / "three"], 64)
    assert wa.fingerprint() == wb.fingerprint()
    sa, sb = BatchSampler(wa, 4, 2, seed=3), BatchSampler(wb, 4, 2, seed=3)
    for _ in range(12):
        assert all(np.array_equal(x, y) for x, y in zip(sa.next_micro_batch(), sb.next_micro_batch()))
    assert verify_corpus(tmp_path / "three") == [] and verify_corpus(tmp_path / "one") == []


def test_verify_finds_missing_and_corrupted_parts(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(tasks, "CHUNK_BYTES", 3000)
    srcs, tok = inputs
    for i in range(2):
        prepare_corpus(srcs, tmp_path / "c", tok, num_shards=2, shard_index=i, progress=False, max_file_bytes=4000)
    out = tmp_path / "c"
    part = out / "part-00001-of-00002"
    victim = part / "train.00001.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    victim.write_bytes(bytes(data))
    assert verify_corpus(out) == [f"{victim}: sha256 differs from part.json (corrupted or rewritten)"]
    assert verify_corpus(out, hashes=False) == []
    victim.write_bytes(bytes(data[:-2]))
    assert any(f"{victim}: {len(data) - 2} bytes, expected {len(data)}" in p for p in verify_corpus(out))
    with pytest.raises(ValueError, match=f"{victim}: size"):
        IndexedTokens(out)
    shutil.rmtree(part)
    (out / "meta.json").unlink()
    problems = verify_corpus(out)
    assert f"{part}: missing (part 1 of 2 not finished)" in problems
    assert any("meta.json: missing" in p for p in problems)
    with pytest.raises(ValueError, match="meta.json not found"):
        IndexedTokens(out)
    r = subprocess.run([sys.executable, "-m", "cratelm", "verify-data", str(out)], capture_output=True, text=True)
    assert r.returncode == 1 and "part 1 of 2 not finished" in r.stdout and "Traceback" not in r.stderr


def test_sbatch_array_example_runs_each_task(tmp_path, inputs):
    """launch/prepare_array.sbatch as SLURM runs it: task I of an array of 3."""
    srcs, tok = inputs
    env = {**os.environ, "INPUTS": " ".join(srcs), "TOKENIZER": tok, "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable, "EXTRA_ARGS": "--val 0.1", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_CPUS_PER_TASK": "1"}
    for i in range(3):
        r = subprocess.run(["bash", str(REPO / "launch/prepare_array.sbatch")], capture_output=True, text=True,
                           timeout=120, env={**env, "SLURM_ARRAY_TASK_ID": str(i)})
        assert r.returncode == 0, r.stderr
        assert f"(part {i} of 3)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "cratelm", "verify-data", str(tmp_path / "out")], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "complete and consistent" in r.stdout
    # a failed task rerun alone (`sbatch --array=1`): an array of one, NUM_SHARDS says how many parts
    shutil.rmtree(tmp_path / "out" / "part-00001-of-00003")
    r = subprocess.run(["bash", str(REPO / "launch/prepare_array.sbatch")], capture_output=True, text=True, timeout=120,
                       env={**env, "NUM_SHARDS": "3", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_ID": "1"})
    assert r.returncode == 0 and "(part 1 of 3)" in r.stdout and verify_corpus(tmp_path / "out") == []
    assert IndexedTokens(tmp_path / "out").num_documents + IndexedTokens(tmp_path / "out", "val").num_documents == 601

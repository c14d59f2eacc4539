"""Scale, simulated on the CPU (issue 12 item 6): a 2^33-token corpus of sparse files opens,
samples, and resumes at step 10^7 in bounded time and memory; and preparing a >= 1 GiB jsonl
stays under 1.5 GiB of resident memory with 2 workers (item 1)."""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENS = 1 << 33
FILE_TOKENS = 1 << 30                                      # 2 GiB uint16 files, as prepare-data writes them
MARKERS = {(1 << 32) - 1: 40_001, 1 << 32: 40_002, (1 << 32) + 12_345: 40_003, 3 * (1 << 31) + 1: 40_004,
           TOKENS - 1030: 40_005}


def sparse_corpus(out: pathlib.Path) -> None:
    """A version 2 corpus (one part, 8 sparse files, a synthetic index of 2 documents) whose
    tokens are 0 except ``MARKERS``."""
    part = out / "part-00000-of-00001"
    part.mkdir(parents=True)
    files = []
    for k in range(TOKENS // FILE_TOKENS):
        path = part / f"train.{k:05d}.bin"
        with open(path, "wb") as f:
            f.truncate(2 * FILE_TOKENS)
        files.append({"file": path.name, "num_tokens": FILE_TOKENS, "sha256": "not computed"})
    if os.stat(part / "train.00000.bin").st_blocks > 8:
        pytest.skip("this file system does not keep sparse files sparse")
    for pos, value in MARKERS.items():
        with open(part / f"train.{pos // FILE_TOKENS:05d}.bin", "r+b") as f:
            f.seek(2 * (pos % FILE_TOKENS))
            f.write(value.to_bytes(2, "little"))
    header = b"CRLMIDX\x00" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (2).to_bytes(8, "little") \
        + bytes(8)
    offsets = b"".join(v.to_bytes(8, "little") for v in (0, 1 << 32, TOKENS))
    (part / "train.idx").write_bytes(header + offsets)
    split = {"num_tokens": TOKENS, "num_documents": 2, "num_bytes": 0}
    (part / "part.json").write_text(json.dumps({"splits": {"train": {**split, "files": files, "index": "train.idx"}}}))
    (out / "meta.json").write_text(json.dumps({
        "format": "cratelm-tokens", "format_version": 2, "dtype": "uint16", "vocab_size": 65536, "eos_id": 0,
        "tokenizer_sha256": "synthetic", "parts": [part.name], "splits": {"train": split}}))


SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from cratelm.data import BatchSampler, TokenWindows
out, markers, T = sys.argv[1], {int(k): v for k, v in json.loads(sys.argv[2]).items()}, 1024
windows = TokenWindows([out], T, seed=1)
sampler = BatchSampler(windows, micro_batch=8, grad_accum=2, dp_rank=1, dp_size=4, seed=1)
batches = [sampler.next_arrays() for _ in range(100)]
state = dict(sampler.state_dict(), consumed_samples=10**7 * sampler.global_batch)     # step 10^7
resumed = BatchSampler(TokenWindows([out], T, seed=1), 8, 2, 1, 4, seed=1)
resumed.load_state_dict(state)
idx = resumed.micro_batch_indices()
x, y = resumed.next_arrays()
found = {}
for pos in markers:
    wx, wy = windows[pos // T]
    found[pos] = [int(wx[pos % T]), int(wy[pos % T - 1]) if pos % T else None, int(windows.corpora[0].tokens[pos])]
seconds = time.perf_counter() - t0
rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] * 1024
print(json.dumps({"seconds": seconds, "peak_rss": rss, "windows": len(windows), "shape": list(x.shape),
                  "first": batches[0][0][:, 0].tolist(), "idx": idx.tolist(), "found": found,
                  "resumed_epoch": 10**7 * 64 // len(windows)}))
"""


def test_2_to_the_33_token_corpus_opens_samples_and_resumes_fast(tmp_path):
    sparse_corpus(tmp_path / "big")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "big"), json.dumps(MARKERS)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["windows"] == (TOKENS - 1) // 1024 and got["shape"] == [8, 1024]
    for pos, value in MARKERS.items():                         # read back where they were written
        wx, wy, direct = got["found"][str(pos)]
        assert wx == value == direct and (wy is None or wy == value)
    assert len(set(got["idx"])) == 8 and all(0 <= i < got["windows"] for i in got["idx"])
    assert got["resumed_epoch"] == 76                           # the resume point is 76 epochs in
    print(f"2^33 tokens: {got['seconds']:.2f} s, peak RSS {got['peak_rss'] / 2**20:.0f} MiB")
    assert got["seconds"] < 10 and got["peak_rss"] < 200 * 2**20


@pytest.mark.slow
def test_preparing_a_1_gib_jsonl_stays_under_1_5_gib_resident(tmp_path):
    """1 GiB of JSON lines read, decoded and parsed line by line (the old reader held 3-5x the
    file); the text field of each line is a 2 KiB document, the rest of the line a 62 KiB field
    that is parsed but not tokenized (sentencepiece at ~3 MB/s per core would take minutes of CI
    for 1 GiB of text; docs/performance.md has the RSS of all-text inputs at 100 MB and 1 GB).
    Resident memory is summed over the main process and its 2 workers, sampled every 50 ms."""
    from cratelm.data.tokenizer import train_tokenizer_on_texts

    words = ["alpha", "beta", "gamma", "über", "naïve", "✓", "def", "return", "x = 1", "the"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(330))[:2000] for i in range(64)]
    tok = train_tokenizer_on_texts(texts, str(tmp_path / "tok"), vocab_size=300).path
    block = b"".join(json.dumps({"text": t, "meta": "z" * (62 << 10)}).encode() + b"\n" for t in texts)
    src = tmp_path / "big.jsonl"
    with open(src, "wb") as f:
        for _ in range((1 << 30) // len(block) + 1):
            f.write(block)
    assert src.stat().st_size >= 1 << 30
    monitor = runpy.run_path(str(REPO / "cratelm/bench/data.py"))["RSS_SCRIPT"]     # RSS of the process tree
    r = subprocess.run([sys.executable, "-c", monitor, str(src), str(tmp_path / "out"), tok, "2"], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    print(f"1 GiB jsonl: {got['seconds']:.1f} s, peak RSS of main + 2 workers {got['peak'] / 2**20:.0f} MiB")
    assert got["documents"] == 64 * ((1 << 30) // len(block) + 1)
    assert 0 < got["peak"] < 1.5 * 2**30

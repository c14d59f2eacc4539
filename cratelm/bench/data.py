"""Data preparation and sampling benchmarks: prints measured figures (docs/performance.md).

    python -m cratelm.bench.data                      # throughput (also python -m cratelm.data.bench)
    python -m cratelm.bench.data --rss 100e6 1e9      # peak resident memory of prepare-data by input size
    python -m cratelm.bench.data --sampler 1e6 1e9    # sampler start-up time and memory by window count
    python -m cratelm.bench.data --quick              # the CI smoke run (tiny sizes)

Throughput: two corpora, read from files by `prepare_corpus` end to end (read, parse, tokenize,
split, write) with 1 and 2 worker processes, against the naive loop over the same files (read
a line / a file, ``json.loads`` it, ``sp.encode`` the document, append the ids and EOS to a
Python list): *short* = 100k one-line JSON documents of 40-100 bytes, *long* = the Python
standard library's files (~10 MB). The methods run
round-robin, ``--repeat`` rounds: each figure is a method's best time; "round ratio" is the
median over rounds of loop time / method time in the same round (meaningful on a shared
machine); "CPU s" the CPU time of the process and its workers, the work whatever the load.
The token streams are checked equal to the loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from cratelm.data import IndexedTokens
from cratelm.data import sources as src_lib
from cratelm.data.prepare import prepare_corpus
from cratelm.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the of and to in is that for it as with was on be by this are from or an at which not have "
         "data model token value return self def import class über naïve café ✓ 42 1999").split()


def short_corpus(path: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` one-line documents of 40-100 UTF-8 bytes, as JSON lines; returns them."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        target, words = rng.randint(40, 100), []
        while len(" ".join(words).encode()) < target:
            words.append(rng.choice(WORDS))
        docs.append(" ".join(words).encode()[:target].decode("utf-8", "ignore").strip() or "x")
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return docs


def long_corpus(folder: Path, max_bytes: int) -> list[str]:
    """Python standard library files (sorted, the first ``max_bytes``) copied to ``folder``."""
    folder.mkdir(parents=True)
    docs, total = [], 0
    for k, path in enumerate(src_lib.python_stdlib_files()[1]):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text or "\x00" in text[:8192]:
            continue
        (folder / f"{k:05d}.py").write_bytes(data)
        docs.append(text)
        total += len(data)
        if total >= max_bytes:
            break
    return docs


def throughput(tmp: Path, tok: Tokenizer, shape: str, docs: list[str], inputs: list[str], repeat: int,
               workers: tuple[int, ...]) -> dict:
    """Time the naive loop and `prepare_corpus` with each worker count on one corpus; print a table."""
    nbytes = sum(len(d.encode()) for d in docs)

    def naive_docs():
        for path in inputs:
            if path.endswith(".jsonl"):
                with open(path, "rb") as f:
                    yield from (json.loads(line)["text"] for line in f)
            else:
                yield from (p.read_bytes().decode("utf-8") for p in sorted(Path(path).iterdir()))

    def loop() -> np.ndarray:
        ids: list[int] = []
        for d in naive_docs():
            ids.extend(tok.sp.encode(d))
            ids.append(tok.eos_id)
        return np.asarray(ids)

    def prepare(n: int) -> np.ndarray:
        out = tmp / f"{shape}-{n}"
        prepare_corpus(inputs, out, tok.path, num_proc=n, val=0, progress=False)
        tokens = IndexedTokens(out).tokens[:]
        shutil.rmtree(out)
        return tokens

    methods = {"naive loop (read, sp.encode per doc)": loop}
    methods.update({f"prepare_corpus, {n} worker{'s' * (n > 1)}": (lambda n=n: prepare(n)) for n in workers})
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    ref = None
    for _ in range(repeat):
        for name, fn in methods.items():
            t, c = time.perf_counter(), _cpu_seconds()
            got = fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(_cpu_seconds() - c)
            if ref is None:
                ref = got
            assert np.array_equal(got, ref), f"{name}: token ids differ from the naive loop's"
    loop_t = np.array(times["naive loop (read, sp.encode per doc)"])
    print(f"\n{shape} documents: {len(docs):,} documents, {nbytes / 1e6:.1f} MB, {len(ref):,} tokens")
    print(f"{'method':38s} {'seconds':>8s} {'MB/s':>7s} {'docs/s':>10s} {'vs loop':>8s} {'round ratio':>12s} "
          f"{'CPU s':>6s}")
    results = {"documents": len(docs), "bytes": nbytes, "tokens": int(len(ref))}
    for name, ts in times.items():
        best = min(ts)
        ratio = float(np.median(loop_t / np.array(ts)))
        best_cpu = min(cpu[name])
        results[name] = {"best_seconds": best, "mb_per_s": nbytes / 1e6 / best, "docs_per_s": len(docs) / best,
                         "vs_loop": float(loop_t.min() / best), "round_ratio": ratio, "cpu_seconds": best_cpu}
        print(f"{name:38s} {best:8.2f} {nbytes / 1e6 / best:7.2f} {len(docs) / best:10,.0f} "
              f"{loop_t.min() / best:7.2f}x {ratio:11.2f}x {best_cpu:6.2f}")
    return results


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers)."""
    import resource

    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


RSS_SCRIPT = """
import json, os, sys, threading, time
from cratelm.data.prepare import prepare_corpus
peak = [0]
def rss(pid):
    try:
        return next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
    except (OSError, StopIteration):
        return 0
def tree(pid):
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(k) for k in open(f"/proc/{pid}/task/{tid}/children").read().split()]
        except OSError:
            pass
    return [pid] + [p for k in kids for p in tree(k)]
def watch():
    while True:
        peak[0] = max(peak[0], sum(rss(p) for p in tree(os.getpid())))
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
s = prepare_corpus([sys.argv[1]], sys.argv[2], sys.argv[3], num_proc=int(sys.argv[4]), progress=False)
print(json.dumps({"peak": peak[0], "seconds": s["seconds"], "tokens": s["tokens"], "documents": s["documents"]}))
"""


def rss_by_size(tmp: Path, tok: Tokenizer, sizes: list[float], num_proc: int = 2) -> dict:
    """Peak resident memory (main process + workers) of prepare-data on generated all-text JSON
    lines (documents of 50-4000 bytes) of each size."""
    rng = random.Random(1)
    block = "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 800)))}) + "\n"
                    for _ in range(2000)).encode()
    print(f"\nprepare-data peak RSS (main + {num_proc} workers), all-text JSON lines:")
    print(f"{'input':>10s} {'seconds':>8s} {'MB/s':>7s} {'peak RSS':>10s}")
    results = {}
    for size in sizes:
        src = tmp / f"rss-{int(size)}.jsonl"
        with open(src, "wb") as f:
            for _ in range(int(size) // len(block) + 1):
                f.write(block)
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp / "rss-out"), tok.path, str(num_proc)],
                           capture_output=True, text=True, check=True)
        got = json.loads(r.stdout)
        mb = src.stat().st_size / 1e6
        results[int(size)] = {"input_mb": mb, **got}
        print(f"{mb:8.0f}MB {got['seconds']:8.1f} {mb / got['seconds']:7.2f} {got['peak'] / 2**20:8.0f}MiB")
        src.unlink()
        shutil.rmtree(tmp / "rss-out")
    return results


SAMPLER_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from cratelm.data import BatchSampler, TokenWindows
w = TokenWindows([sys.argv[1]], int(sys.argv[2]), weights=None, seed=0)
s = BatchSampler(w, micro_batch=8, grad_accum=4, dp_rank=3, dp_size=8, seed=0)
x, _ = s.next_arrays()
t1 = time.perf_counter()
s.load_state_dict(dict(s.state_dict(), consumed_samples=10**7 * s.global_batch))
for _ in range(100):
    s.next_arrays()
t2 = time.perf_counter()
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"windows": len(w), "startup": t1 - t0, "per_batch": (t2 - t1) / 100, "peak": hwm}))
"""


def sampler_by_windows(tmp: Path, counts: list[float], seq_len: int = 8) -> dict:
    """Start-up (import, open, first micro-batch) time and peak RSS of the sampler on a sparse
    corpus of ``count`` windows (uint16 files of 2 GiB, a synthetic index of one document)."""
    print(f"\nsampler (seq_len {seq_len}, micro 8, accum 4, dp 8): start-up = python imports + open + first batch")
    print(f"{'windows':>14s} {'start-up s':>11s} {'ms/batch':>9s} {'peak RSS':>9s} {'a permutation would be':>24s}")
    results = {}
    for count in counts:
        n = int(count) * seq_len + 1
        out = tmp / f"sampler-{int(count)}"
        _sparse_corpus(out, n)
        r = subprocess.run([sys.executable, "-c", SAMPLER_SCRIPT, str(out), str(seq_len)], capture_output=True,
                           text=True, check=True)
        got = json.loads(r.stdout)
        results[int(count)] = got
        print(f"{got['windows']:14,d} {got['startup']:11.2f} {1e3 * got['per_batch']:9.2f} "
              f"{got['peak'] / 2**20:7.0f}MiB {8 * got['windows'] / 2**20:20,.0f} MiB")
        shutil.rmtree(out)
    return results


def _sparse_corpus(out: Path, num_tokens: int, file_tokens: int = 1 << 30) -> None:
    part = out / "part-00000-of-00001"
    part.mkdir(parents=True)
    files = []
    for k, a in enumerate(range(0, num_tokens, file_tokens)):
        n = min(file_tokens, num_tokens - a)
        with open(part / f"train.{k:05d}.bin", "wb") as f:
            f.truncate(2 * n)
        files.append({"file": f"train.{k:05d}.bin", "num_tokens": n})
    header = b"CRLMIDX\x00" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + (1).to_bytes(8, "little") \
        + bytes(8)
    (part / "train.idx").write_bytes(header + bytes(8) + num_tokens.to_bytes(8, "little"))
    split = {"num_tokens": num_tokens, "num_documents": 1, "num_bytes": 0}
    (part / "part.json").write_text(json.dumps({"splits": {"train": {**split, "files": files, "index": "train.idx"}}}))
    (out / "meta.json").write_text(json.dumps({"format_version": 2, "dtype": "uint16", "eos_id": 0,
                                               "parts": [part.name], "tokenizer_sha256": "synthetic",
                                               "splits": {"train": split}}))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: train one on the stdlib)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the throughput methods")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--short-docs", type=int, default=100_000, help="documents of the short corpus")
    p.add_argument("--long-bytes", type=float, default=10e6, help="bytes of the long corpus")
    p.add_argument("--rss", type=float, nargs="*", default=[], metavar="BYTES", help="input sizes for peak RSS")
    p.add_argument("--sampler", type=float, nargs="*", default=[], metavar="WINDOWS", help="window counts")
    p.add_argument("--no-throughput", dest="throughput", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke run)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.short_docs, args.long_bytes, args.sampler = 1, 500, 5e4, args.sampler or [1e6]
    tmp = Path(tempfile.mkdtemp(prefix="cratelm-bench-data-"))
    results: dict = {"cpus": os.cpu_count(), "load_at_start": os.getloadavg()[0]}
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start")
    try:
        if args.throughput or args.rss:
            if args.tokenizer:
                tok = Tokenizer(args.tokenizer)
            else:
                t = time.perf_counter()
                tok = train_tokenizer(None, str(tmp / "tok"), 8192 if not args.quick else 600, corpus=src_lib.STDLIB,
                                      sample_bytes=int(args.long_bytes * 3))
                print(f"trained {tok.path} (vocab {tok.vocab_size}) in {time.perf_counter() - t:.1f} s")
        if args.throughput:
            short = short_corpus(tmp / "short.jsonl", args.short_docs)
            results["short"] = throughput(tmp, tok, "short", short, [str(tmp / "short.jsonl")], args.repeat,
                                          tuple(args.workers))
            long = long_corpus(tmp / "long", int(args.long_bytes))
            results["long"] = throughput(tmp, tok, "long", long, [str(tmp / "long")], args.repeat, tuple(args.workers))
        if args.rss:
            results["rss"] = rss_by_size(tmp, tok, args.rss)
        if args.sampler:
            results["sampler"] = sampler_by_windows(tmp, args.sampler)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

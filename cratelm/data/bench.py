"""Tokenization throughput on the Python standard library corpus.

    python -m cratelm.data.bench                     # trains an 8192-piece tokenizer first (~5 s)
    python -m cratelm.data.bench --tokenizer data/stdlib/tokenizer.model --repeat 5 --datasets

Prints, for the whole stdlib held in memory: a plain loop (``sp.encode(doc)`` per document,
ids appended to a Python list) and `tokenize_to_shard` (the engine of `prepare_corpus`) with
1 and 2 workers, as MB/s, tokens/s and the ratio to the loop; then `prepare_corpus` end to end
(reading files, tokenizing, splitting, writing) with the share of time spent writing shards.
The methods run round-robin for ``--repeat`` rounds: each figure is the best round, and the
median per-round ratio to the loop is printed too (other processes may share the cores), and
the CPU seconds this process used (worker processes of datasets.map are not counted).
``--datasets`` adds ``datasets.Dataset.map(num_proc=N)`` for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cratelm.data import sources as src_lib
from cratelm.data.indexed import ShardWriter
from cratelm.data.prepare import prepare_corpus, tokenize_to_shard
from cratelm.data.tokenizer import Tokenizer, train_tokenizer


_TOKENIZERS: dict[str, Tokenizer] = {}


def _datasets_encode(batch: dict, path: str) -> dict:
    """A ``datasets.map`` function: one row of uint16 ids per batch (tokenizer loaded once per process)."""
    tok = _TOKENIZERS.get(path) or _TOKENIZERS.setdefault(path, Tokenizer(path))
    ids, lens = tok.encode_documents(batch["text"])
    return {"ids": [ids.astype(np.uint16)], "lens": [lens]}


def stdlib_documents() -> list[str]:
    """The documents of ``--corpus python-stdlib`` (skips as prepare_corpus does)."""
    sources = src_lib.resolve_inputs(None, src_lib.STDLIB)
    return list(src_lib.iter_documents(sources, report=src_lib.SkipReport()))


def run_benchmark(tokenizer: str | None = None, repeat: int = 3, workers: tuple[int, ...] = (1, 2),
                  with_datasets: bool = False) -> dict:
    """Measure and print the figures; return them as a dict.

    The methods run round-robin, ``repeat`` rounds: each figure is a method's best time, and
    "round ratio" is the median over rounds of loop time / method time in the same round, which
    stays meaningful when other processes load the machine unevenly over time."""
    tmp = Path(tempfile.mkdtemp(prefix="cratelm-bench-"))
    try:
        return _measure(tmp, tokenizer, repeat, workers, with_datasets)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(tmp: Path, tokenizer: str | None, repeat: int, workers: tuple[int, ...], with_datasets: bool) -> dict:
    """The body of `run_benchmark`, working in ``tmp``."""
    if tokenizer is None:
        t = time.perf_counter()
        tok = train_tokenizer(None, str(tmp / "stdlib"), 8192, corpus=src_lib.STDLIB)
        print(f"trained {tok.path} (vocab {tok.vocab_size}) in {time.perf_counter() - t:.1f} s")
    else:
        tok = Tokenizer(tokenizer)
    docs = stdlib_documents()
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"corpus: python-stdlib, {len(docs)} documents, {nbytes / 1e6:.1f} MB; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f} at start; {repeat} rounds")

    def loop() -> list[int]:
        ids: list[int] = []
        for d in docs:
            ids.extend(tok.sp.encode(d))
            ids.append(tok.eos_id)
        return ids

    def engine(n: int) -> np.ndarray:
        w = ShardWriter(tmp / f"w{n}.bin", "uint16")
        tokenize_to_shard(iter(docs), tok, w, num_proc=n)
        w.close()
        return np.fromfile(tmp / f"w{n}.bin", np.uint16)

    def dmap(n: int) -> np.ndarray:
        out = ds.map(_datasets_encode, fn_kwargs={"path": tok.path}, batched=True, batch_size=64,
                     num_proc=n if n > 1 else None, remove_columns=["text"], load_from_cache_file=False)
        return np.concatenate(out.with_format("numpy")["ids"])

    def full(n: int) -> dict:
        return prepare_corpus(None, tmp / f"corpus{n}", tok.path, corpus=src_lib.STDLIB, num_proc=n, progress=False)

    methods = {"plain loop (sp.encode per doc)": loop}
    methods.update({f"tokenize_to_shard, {n} worker{'s' * (n > 1)}": (lambda n=n: engine(n)) for n in workers})
    if with_datasets:
        import datasets
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_dict({"text": docs})
        methods.update({f"datasets.map, num_proc={n}": (lambda n=n: dmap(n)) for n in workers})
    methods.update({f"prepare_corpus, {n} worker{'s' * (n > 1)}": (lambda n=n: full(n)) for n in workers})
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    summaries: dict[str, dict] = {}
    ref = None
    for _ in range(repeat):
        for name, fn in methods.items():
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            if isinstance(out, dict):                   # a prepare_corpus summary: keep the best run's
                if times[name][-1] == min(times[name]):
                    summaries[name] = out
            elif ref is None:
                ref = np.asarray(out, np.uint16)
            else:
                assert np.array_equal(np.asarray(out, np.uint16), ref), f"{name}: ids differ from the plain loop"
    loop_times = np.array(times["plain loop (sp.encode per doc)"])
    print(f"{'method':34s} {'seconds':>8s} {'MB/s':>7s} {'Mtok/s':>7s} {'vs loop':>8s} {'round ratio':>12s} "
          f"{'CPU s':>6s}")
    results: dict = {"documents": len(docs), "bytes": nbytes, "tokens": len(ref), "seconds": times}
    for name, ts in times.items():
        best = min(ts)
        ratio = float(np.median(loop_times / np.array(ts)))
        best_cpu = cpu[name][ts.index(best)]
        results[name] = {"best_seconds": best, "vs_loop": min(loop_times) / best, "round_ratio": ratio,
                         "cpu_seconds": best_cpu}
        note = ""
        if name in summaries:
            s = summaries[name]
            share = s["write_seconds"] / s["tokenize_seconds"]
            results[name]["write_share"] = share
            note = (f"  (end to end incl. reading files; read+tokenize {s['tokenize_seconds']:.2f} s, "
                    f"writing shards {s['write_seconds']:.3f} s = {100 * share:.1f}% of it)")
        print(f"{name:34s} {best:8.2f} {nbytes / 1e6 / best:7.2f} {len(ref) / 1e6 / best:7.2f} "
              f"{min(loop_times) / best:7.2f}x {ratio:11.2f}x {best_cpu:6.2f}{note}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: train one on the stdlib)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the best time of each method is printed")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--datasets", action="store_true", help="also time datasets.map(num_proc=N)")
    args = p.parse_args(argv)
    run_benchmark(args.tokenizer, args.repeat, tuple(args.workers), args.datasets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

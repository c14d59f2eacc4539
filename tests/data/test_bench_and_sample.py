"""The data benchmark runs (smoke, tiny sizes), and a tokenizer is trained on a bounded,
seeded sample of the corpus (issue 12 item 3)."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys

from cratelm.data import reading, tasks
from cratelm.data.tasks import ReadOptions, Task, plan_tasks, sample_tasks
from cratelm.data.sources import SkipReport, Source
from cratelm.data.tokenizer import train_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_data_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "cratelm.data.bench", "--quick", "--json", str(out)],   # = cratelm.bench.data
                       capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    for shape in ("short", "long"):
        rows = [v for k, v in got[shape].items() if isinstance(v, dict)]
        assert len(rows) == 3 and all(v["mb_per_s"] > 0 and v["docs_per_s"] > 0 for v in rows)
    assert got["sampler"]["1000000"]["windows"] == 1_000_000 and "docs/s" in r.stdout


def test_sample_tasks_is_bounded_seeded_and_in_order():
    tasks = [Task(((0, k * 100, k * 100 + 100),), 100) for k in range(50)]
    a, b, c = (sample_tasks(tasks, 1000, seed) for seed in (1, 1, 2))
    assert a == b != c and len(a) == 10 and a == sorted(a, key=lambda t: t.pieces[0][1])
    assert sample_tasks(tasks, None, 0) == tasks and sample_tasks(tasks, 10**9, 0) == tasks


def test_tokenizer_reads_only_its_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "CHUNK_BYTES", 4096)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) for i in range(2000)]
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    sources, opts = [Source("jsonl", str(src))], ReadOptions()
    planned = plan_tasks(sources, opts, SkipReport())
    read = []
    original = reading.read_task

    def spy(task, *a, **k):
        read.append(task)
        return original(task, *a, **k)

    monkeypatch.setattr(reading, "read_task", spy)
    t1 = train_tokenizer([str(src)], str(tmp_path / "a"), 300, sample_bytes=20_000, seed=3)
    assert 20_000 <= sum(t.nbytes for t in read) < 20_000 + 4096 < src.stat().st_size
    assert set(read) < set(planned)
    t2 = train_tokenizer([str(src)], str(tmp_path / "b"), 300, sample_bytes=20_000, seed=3)
    assert t1.sha256 == t2.sha256                        # seeded: the same sample, the same model
    t3 = train_tokenizer([str(src)], str(tmp_path / "c"), 300, sample_bytes=20_000, seed=4)
    assert t3.sha256 != t1.sha256

"""Tokenizing tasks (cratelm/data/tasks.py, read by cratelm/data/reading.py) over worker processes, in input order.

Each worker reads its task itself (files are opened in the worker: no text is pickled), encodes
the documents in one batch call (`Tokenizer.encode_documents`: one sentencepiece call per
batch, not per document, so short documents cost little Python per token), and sends back the
ids in the corpus dtype with, per document, its length, UTF-8 bytes and split draw. At most
``2 x num_proc`` tasks are in flight, so memory does not grow with the corpus; ``num_proc=1``
runs the same code in this process, so the output is the same bytes for every ``num_proc``.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from cratelm.data.indexed import DTYPES
from cratelm.data.reading import TaskDocs, read_task
from cratelm.data.tasks import ReadOptions, Task
from cratelm.data.sampling import mix_array, derive_key
from cratelm.data.sources import Source
from cratelm.data.tokenizer import load_tokenizer

_STATE: dict = {}


@dataclass
class Encoded:
    """A task's documents: ids (the corpus dtype), tokens / UTF-8 bytes / split draw per document."""

    ids: np.ndarray
    lens: np.ndarray
    nbytes: np.ndarray
    draw: np.ndarray          # float64 in [0, 1): the document's split (cratelm/data/prepare.py)
    found: TaskDocs


def split_draws(seed: int, name_hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Uniform numbers in [0, 1), one per document, fixed by (seed, source name hash, position):
    ``derive_key(seed, h, pos)`` vectorized, its top 53 bits."""
    k = np.uint64(derive_key(seed))
    k = mix_array(k ^ mix_array(np.asarray(name_hashes, np.uint64)))
    k = mix_array(k ^ mix_array(np.asarray(positions, np.int64).astype(np.uint64)))
    return (k >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _init(sources: list[Source], opts: ReadOptions, tokenizer: str, dtype: str, seed: int) -> None:
    _STATE.update(sources=sources, opts=opts, tok=load_tokenizer(tokenizer), dtype=DTYPES[dtype], seed=seed)


def encode_task(task: Task) -> Encoded:
    """Read and encode one task (in a worker, after `_init`)."""
    found = TaskDocs()
    docs = read_task(task, _STATE["sources"], _STATE["opts"], found)
    empty = np.zeros(0, np.int64)
    ids, lens = _STATE["tok"].encode_documents(docs.texts) if docs.texts else (empty, empty)
    draws = split_draws(_STATE["seed"], np.array(docs.hashes, np.uint64), np.array(docs.positions, np.int64))
    return Encoded(ids.astype(_STATE["dtype"]), lens, np.array(docs.nbytes, np.int64), draws, found)


def encode_tasks(tasks: Iterable[Task], sources: list[Source], opts: ReadOptions, tokenizer: str, dtype: str,
                 seed: int, num_proc: int = 1) -> Iterator[tuple[Task, Encoded]]:
    """(task, its `Encoded`) for each task, in order, encoded by ``num_proc`` processes."""
    plain = [replace(s, dataset=None) for s in sources]      # datasets are read here, not pickled
    args = (plain, opts, tokenizer, dtype, seed)
    if num_proc <= 1:
        _init(*args)
        for task in tasks:
            yield task, encode_task(task)
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method), initializer=_init,
                             initargs=args) as pool:
        pending: deque[tuple[Task, Future]] = deque()
        try:
            for task in tasks:
                pending.append((task, pool.submit(encode_task, task)))
                while len(pending) > 2 * num_proc:
                    t, f = pending.popleft()
                    yield t, f.result()
            while pending:
                t, f = pending.popleft()
                yield t, f.result()
        finally:
            for _, f in pending:
                f.cancel()

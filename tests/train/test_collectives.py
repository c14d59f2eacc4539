"""Collectives on the device the process group's backend needs (cratelm.dist.all_reduce).

NCCL takes CUDA tensors only. Without a GPU the requirement is simulated: the backend
reports "nccl", `cratelm.dist._move` marks the copies it makes for "cuda:0", and a fake
all_reduce refuses any tensor not so marked and sums as two ranks with the same values
would. Eval's sums, the trainer's loss/NaN/stop flags, the validation loss (the metrics)
and the optimizer's non-finite check must all arrive there, and come back with the
reduced values.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import cratelm.dist as cdist


@pytest.fixture
def nccl(monkeypatch):
    """A 2-rank 'NCCL' group; returns the (dtype, shape, op) of every all_reduce it served."""
    gpu = torch.device("cuda", 0)
    on_gpu: list[torch.Tensor] = []
    calls: list[tuple] = []

    def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = t.clone()
        if device == gpu:
            on_gpu.append(out)
        return out

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None):
        assert any(t is g for g in on_gpu), f"a {t.dtype} tensor on {t.device} reached NCCL"
        calls.append((t.dtype, tuple(t.shape), str(op).rsplit(".", 1)[-1]))
        if op == dist.ReduceOp.SUM:
            t.mul_(2)                           # the other rank holds the same values

    monkeypatch.setattr(cdist, "initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cdist, "_move", move)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return calls


def test_all_reduce_moves_to_the_backend_device_and_back(nccl):
    t = torch.tensor([1.5, -2.0], dtype=torch.float64)
    assert cdist.all_reduce(t) is t and t.tolist() == [3.0, -4.0]        # in place, on the CPU again
    assert cdist.all_reduce(torch.tensor([3.0]), op="max").tolist() == [3.0]
    assert nccl == [(torch.float64, (2,), "SUM"), (torch.float32, (1,), "MAX")]
    with pytest.raises(ValueError, match="op='avg'"):
        cdist.all_reduce(t, op="avg")


def test_gloo_keeps_cpu_tensors_where_they_are(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert cdist.comm_device(torch.zeros(1)) == torch.device("cpu")


def test_eval_sums_reach_nccl_on_the_gpu(nccl, corpus, monkeypatch):
    from cratelm.config import ModelConfig
    from cratelm.evaluate import evaluate
    from cratelm.model import CrateLM

    model = CrateLM(ModelConfig(n_layer=1, d_model=32, n_head=4, vocab_size=64, context=16), seed=0).eval()
    data = [str(corpus / "val.bin")]
    with monkeypatch.context() as m:
        m.setattr(cdist, "initialized", lambda: False)
        alone = evaluate(model, data, {}, progress=False, stride=8)           # the reference: no group
    assert not nccl
    two = evaluate(model, data, {}, progress=False, stride=8)
    assert nccl == [(torch.float64, (2,), "SUM")]
    assert two[0].tokens == 2 * alone[0].tokens and two[0].loss == pytest.approx(alone[0].loss, rel=1e-12)


class FakeDS:
    """What Engine.train_step / eval_loss use of a DeepSpeed engine, with scripted losses."""

    def __init__(self, losses: list[float], optimizer) -> None:
        self.losses, self.optimizer, self.skip_at_step = iter(losses), optimizer, []

    def gradient_accumulation_steps(self) -> int:
        return 2

    def __call__(self, x, y):
        return torch.tensor(next(self.losses))

    train_batch = eval_batch = lambda self, *a, **k: torch.tensor(next(self.losses))

    def backward(self, loss) -> None:
        pass

    def step(self) -> None:
        self.skip_at_step.append(self.optimizer.skip_next)

    def get_global_grad_norm(self) -> float:
        return 0.5

    def eval(self) -> None:
        pass

    train = eval


def engine(losses: list[float], pipeline: bool = False):
    from cratelm.train.engine import Engine

    opt = SimpleNamespace(skip_next=False, skipped=False)
    return Engine(ds=FakeDS(losses, opt), optimizer=opt, pipeline=pipeline, dp_rank=0, dp_size=2, stage=0,
                  num_stages=1, device=torch.device("cpu"), world_size=2)


class Batches:
    """A BatchSampler's interface: micro-batches one at a time, or as an iterator (pipeline)."""

    def next_micro_batch(self):
        return torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)

    def __iter__(self):
        while True:
            yield self.next_micro_batch()


BATCHES = Batches()


def test_the_trainers_flags_reach_nccl_on_the_gpu(nccl):
    r = engine([1.0, 3.0]).train_step(BATCHES, stop=lambda: True)
    assert (r.loss, r.nonfinite, r.stop, r.skipped, r.grad_norm) == (2.0, False, True, False, 0.5)
    e = engine([math.nan, 1.0])
    r = e.train_step(BATCHES, stop=lambda: False, skip_nonfinite=True)
    assert math.isnan(r.loss) and r.nonfinite and not r.stop
    assert e.ds.skip_at_step == [False, True] and not e.optimizer.skip_next    # the last micro-step dropped
    r = engine([2.5], pipeline=True).train_step(BATCHES, stop=lambda: False)
    assert (r.loss, r.nonfinite, r.stop) == (2.5, False, False)
    assert nccl == [(torch.float32, (3,), "SUM")] * 2 + [(torch.float32, (2,), "MAX")]


class Windows:
    """A TokenWindows' interface: stacked (x, y) of the given window indices."""

    def get_batch(self, indices):
        import numpy as np

        return np.zeros((len(indices), 4), np.int64), np.zeros((len(indices), 4), np.int64)


def test_the_validation_loss_reaches_nccl_on_the_gpu(nccl):
    import numpy as np

    mine = np.arange(4)                          # this rank's 4 of 8 windows, 2 per micro-batch
    assert engine([1.0, 3.0]).eval_loss(Windows(), mine, 2, 8) == 2.0                  # (2 + 6) x 2 ranks / 8
    assert engine([3.0], pipeline=True).eval_loss(Windows(), mine, 2, 8) == 3.0        # 3 x 4 x 2 ranks / 8
    assert nccl == [(torch.float64, (1,), "SUM")] * 2


def test_the_optimizers_nonfinite_check_reaches_nccl_on_the_gpu(nccl):
    from cratelm.config import JobConfig
    from cratelm.train.optimizer import make_optimizer

    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = make_optimizer([{"params": [p]}], JobConfig(), "cpu", check_grads=True)
    p.grad = torch.full((2, 2), math.inf)
    opt.step()
    assert opt.skipped and torch.equal(p.detach(), torch.ones(2, 2))
    assert nccl == [(torch.float32, (1,), "MAX")]

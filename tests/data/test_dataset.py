"""TokenWindows and BatchSampler: windows, blending, shuffling, exact resume across dp sizes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cratelm.data import BatchSampler, IndexedTokens, TokenWindows
from cratelm.data.indexed import ShardWriter, write_json_atomic


def make_corpus(folder, num_tokens: int, start: int = 0, sha: str = "sha-a", doc_len: int = 7) -> str:
    """A corpus whose token i is start + i (so a window tells where it came from)."""
    folder.mkdir(parents=True)
    tokens = np.arange(start, start + num_tokens, dtype=np.int64)
    lengths = [doc_len] * (num_tokens // doc_len) + ([num_tokens % doc_len] if num_tokens % doc_len else [])
    w = ShardWriter(folder / "train.bin", "uint32")
    w.write(tokens, np.array(lengths))
    w.close()
    write_json_atomic(folder / "meta.json", {
        "dtype": "uint32", "vocab_size": 1 << 20, "eos_id": 0, "tokenizer": "tokenizer.model",
        "tokenizer_sha256": sha, "num_tokens": num_tokens, "num_documents": len(lengths),
        "splits": {"train": {"num_tokens": num_tokens, "num_documents": len(lengths), "num_bytes": 0}}})
    return str(folder / "train.bin")


@pytest.fixture
def corpus(tmp_path) -> str:
    return make_corpus(tmp_path / "c", 1000)


def test_windows_are_shifted_by_one(corpus):
    w = TokenWindows([corpus], seq_len=16)
    assert len(w) == (1000 - 1) // 16
    for i in (0, 1, len(w) - 1):
        x, y = w[i]
        assert x.dtype == np.int64 and x.shape == y.shape == (16,)
        assert np.array_equal(x, np.arange(i * 16, i * 16 + 16)) and np.array_equal(y, x + 1)
    xb, yb = w.get_batch([3, 0])
    assert np.array_equal(xb[0], w[3][0]) and np.array_equal(yb[1], w[0][1])
    with pytest.raises(IndexError):
        w[len(w)]
    ds = pickle.loads(pickle.dumps(IndexedTokens(corpus)))        # pickles as its path
    assert ds.num_tokens == 1000 and ds.document(-1).tolist() == list(range(994, 1000))


def test_concatenation_and_blending(tmp_path):
    a = make_corpus(tmp_path / "a", 801, start=0)           # 100 windows of 8
    b = make_corpus(tmp_path / "b", 201, start=10_000)      # 25 windows
    cat = TokenWindows([a, b], seq_len=8)
    assert len(cat) == 125 and cat[100][0][0] == 10_000
    assert TokenWindows([a, b], seq_len=8, weights=[]).fingerprint() == cat.fingerprint()   # [] = by size
    blend = TokenWindows([a, b], seq_len=8, weights=[1, 3], seed=5)
    assert len(blend) == 125
    from_b = np.array([blend[i][0][0] >= 10_000 for i in range(len(blend))])
    assert from_b.sum() == round(125 * 0.75)
    # the shuffled stream mixes them: each epoch holds exactly 94 samples of b, and 32-sample
    # stretches hold 24 of b give or take sampling noise (binomial sd ~2.4)
    stream = BatchSampler(blend, 125, seed=1).global_indices(0, 250)
    stream_b = np.array([blend[int(i)][0][0] >= 10_000 for i in stream])
    assert stream_b[:125].sum() == stream_b[125:].sum() == 94
    assert all(abs(stream_b[i: i + 32].sum() - 24) <= 8 for i in range(0, 218, 32))
    starts_b = [int(blend[i][0][0]) for i in np.flatnonzero(from_b)]
    assert set(starts_b) == {10_000 + 8 * j for j in range(25)}         # b repeated: every window used
    again = TokenWindows([a, b], seq_len=8, weights=[1, 3], seed=5)
    assert all(np.array_equal(again[i][0], blend[i][0]) for i in range(len(blend)))
    assert blend.fingerprint() != cat.fingerprint() != TokenWindows([a, b], 8, [1, 3], seed=6).fingerprint()
    only_a = TokenWindows([a, b], seq_len=8, weights=[1, 0])
    assert all(only_a[i][0][0] < 10_000 for i in range(len(only_a)))


def test_window_errors(tmp_path, corpus):
    other = make_corpus(tmp_path / "o", 100, sha="sha-b")
    with pytest.raises(ValueError, match="sha-b.*sha-a|sha-a.*sha-b"):
        TokenWindows([corpus, other], 8)
    with pytest.raises(ValueError, match="too few for one window"):
        TokenWindows([corpus], seq_len=1000)
    with pytest.raises(ValueError, match="2 weights for 1 corpora"):
        TokenWindows([corpus], 8, weights=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        TokenWindows([corpus], 8, weights=[-1])


def run_steps(sampler: BatchSampler, steps: int) -> list[list[torch.Tensor]]:
    """Per optimizer step, the micro-batches' x tensors."""
    return [[sampler.next_micro_batch()[0] for _ in range(sampler.grad_accum)] for _ in range(steps)]


def test_sampler_order_and_epochs(corpus):
    w = TokenWindows([corpus], seq_len=16)                    # 62 windows
    s = BatchSampler(w, micro_batch=4, grad_accum=2, dp_rank=0, dp_size=1, seed=3)
    seen = [int(x[0]) // 16 for step in run_steps(s, 16) for mb in step for x in mb]      # 128 samples
    assert sorted(seen[:62]) == list(range(62)) and sorted(seen[62:124]) == list(range(62))
    assert seen[:62] != seen[62:124]                          # a new permutation each epoch
    x, y = BatchSampler(w, 4, seed=3).next_micro_batch()
    assert x.dtype == torch.int64 and x.shape == (4, 16) and torch.equal(y[:, :-1], x[:, 1:])
    assert [int(v[0]) // 16 for v in x] == seen[:4]


def test_resume_gives_identical_batches(corpus):
    w = TokenWindows([corpus], seq_len=16)
    ref = run_steps(BatchSampler(w, 3, 2, seed=7), 30)         # crosses several epochs
    first = BatchSampler(w, 3, 2, seed=7)
    run_steps(first, 11)
    state = first.state_dict()
    assert state["consumed_samples"] == 11 * 6
    resumed = BatchSampler(TokenWindows([corpus], seq_len=16), 3, 2, seed=7)
    resumed.load_state_dict(state)
    for a, b in zip(run_steps(resumed, 19), ref[11:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("accum", [1, 2])
def test_same_samples_for_one_and_two_ranks_and_resume_across(corpus, accum):
    """G = 8: 1 rank x micro 8 (or 4 x accum 2) vs 2 ranks x micro 4 (or 2 x accum 2)."""
    w = TokenWindows([corpus], seq_len=16)
    one = run_steps(BatchSampler(w, 8 // accum, accum, 0, 1, seed=1), 20)
    ranks = [BatchSampler(w, 4 // accum, accum, r, 2, seed=1) for r in range(2)]
    two = [run_steps(s, 20) for s in ranks]
    for step in range(20):
        for a in range(accum):
            assert torch.equal(torch.cat([two[0][step][a], two[1][step][a]]), one[step][a])
    # a 1-rank run checkpointed at step 7 resumes on 2 ranks (and back) with the same samples
    single = BatchSampler(w, 8 // accum, accum, 0, 1, seed=1)
    run_steps(single, 7)
    resumed = [BatchSampler(w, 4 // accum, accum, r, 2, seed=1) for r in range(2)]
    for s in resumed:
        s.load_state_dict(single.state_dict())
    got = [run_steps(s, 5) for s in resumed]
    for step in range(5):
        for a in range(accum):
            assert torch.equal(torch.cat([got[0][step][a], got[1][step][a]]), one[7 + step][a])
    back = BatchSampler(w, 8 // accum, accum, 0, 1, seed=1)
    back.load_state_dict(resumed[0].state_dict())
    assert torch.equal(run_steps(back, 1)[0][0], one[12][0])


def test_incompatible_state_is_refused(tmp_path, corpus):
    w = TokenWindows([corpus], seq_len=16)
    s = BatchSampler(w, 2, 2, seed=1)
    run_steps(s, 3)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed 1"):
        BatchSampler(w, 2, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="other windows"):
        BatchSampler(TokenWindows([corpus], seq_len=8), 2, 2, seed=1).load_state_dict(state)
    other = make_corpus(tmp_path / "o", 999)
    with pytest.raises(ValueError, match="other windows"):
        BatchSampler(TokenWindows([other], seq_len=16), 2, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple of micro_batch x dp_size = 8"):
        BatchSampler(w, 4, 1, 0, 2, seed=1).load_state_dict({**state, "consumed_samples": 12})
    with pytest.raises(ValueError, match="dp_rank=2"):
        BatchSampler(w, 2, 1, dp_rank=2, dp_size=2)

"""Training samples: fixed-length windows over token shards, blended and shuffled, and the
sampler that hands each data-parallel rank its micro-batches, resumable exactly.

Notation: T = seq_len, N = number of windows, G = global batch (samples per optimizer step)
= micro_batch x grad_accum x dp_size.

Windows. Corpus c with n tokens has n_c = (n - 1) // T windows; window j is
tokens[j*T : j*T + T + 1] (x = the first T, y = the last T: targets shifted by one).
Windows run across document boundaries (each document ends with EOS), as in GPT-2.

Blending. Without weights the corpora are concatenated, N = sum n_c. With weights w_c, N
stays sum n_c and corpus c gets m_c = round(w_c N) of the N samples (largest remainders):
blended samples [M_c, M_c + m_c) (M_c = m_0 + ... + m_{c-1}) are corpus c's, and its k-th is
window k when m_c = n_c, else window P_c(k mod n_c) with P_c a seeded permutation of the
corpus (`FeistelPermutation` keyed by (seed, c)): a corpus sampled more (less) than its size
repeats (drops) windows, a fixed selection for a given seed. The blended samples are not
interleaved here: the epoch shuffle below mixes them uniformly.

Sample order. Global sample g is blended sample perm_e(g mod N) with e = g // N and perm_e a
Feistel permutation of [0, N) keyed by (seed, e): a new order every epoch, infinite, computed
index by index (no O(N) array on any rank; the same on every rank). Optimizer step s takes
global samples [sG, (s+1)G); micro-step a on rank r takes sG + a(micro_batch dp_size)
+ r micro_batch + [0, micro_batch). The sampler's whole state is ``consumed_samples`` (global
samples of completed micro-steps), so a resumed run, with any dp_size that keeps the micro-step
aligned (e.g. the same G), sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from cratelm.data.corpus import IndexedTokens
from cratelm.data.sampling import FeistelPermutation, derive_key

if TYPE_CHECKING:
    import torch


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens (stride ``seq_len``) over one or several blended corpora.
    ``windows[i] -> (x, y)``: int64 arrays of shape (T,)."""

    def __init__(self, paths: list[str] | str, seq_len: int, weights: list[float] | None = None,
                 seed: int = 0) -> None:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise ValueError("TokenWindows: no corpora given")
        if seq_len < 1:
            raise ValueError(f"TokenWindows: seq_len={seq_len} must be >= 1")
        self.paths = [str(p) for p in paths]
        self.seq_len = seq_len
        self.seed = seed
        self.corpora = [IndexedTokens(p) for p in paths]
        first = self.corpora[0]
        for c in self.corpora[1:]:
            if c.meta.get("tokenizer_sha256") != first.meta.get("tokenizer_sha256"):
                raise ValueError(f"cannot blend {c.bin_path} (tokenizer sha256 {c.meta.get('tokenizer_sha256')}) "
                                 f"with {first.bin_path} (tokenizer sha256 {first.meta.get('tokenizer_sha256')})")
        self.sizes = np.array([(c.num_tokens - 1) // seq_len if c.num_tokens else 0 for c in self.corpora], np.int64)
        for c, n in zip(self.corpora, self.sizes):
            if n == 0:
                raise ValueError(f"{c.bin_path}: {c.num_tokens} tokens, too few for one window of "
                                 f"seq_len + 1 = {seq_len + 1}")
        self.num_windows = int(self.sizes.sum())
        self.weights = None if weights is None or len(weights) == 0 else self._normalized(weights)  # [] = sizes
        self.samples = self.sizes if self.weights is None else self._blend_counts(self.weights)
        self._starts = np.concatenate([[0], np.cumsum(self.samples)])
        self._select = [None if m == n else FeistelPermutation(int(n), derive_key(seed, c, 0xB1E4D))
                        for c, (m, n) in enumerate(zip(self.samples, self.sizes))]

    def _normalized(self, weights: list[float]) -> np.ndarray:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(self.corpora),):
            raise ValueError(f"TokenWindows: {len(w)} weights for {len(self.corpora)} corpora")
        if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"TokenWindows: weights={list(weights)} must be finite, >= 0, and not all 0")
        return w / w.sum()

    def _blend_counts(self, weights: np.ndarray) -> np.ndarray:
        """m_c = round(w_c N) samples per corpus, by largest remainders (they sum to N)."""
        raw = weights * self.num_windows
        counts = np.floor(raw).astype(np.int64)
        short = self.num_windows - int(counts.sum())
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
        return counts

    def __len__(self) -> int:
        return self.num_windows

    def locate_many(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, window within it) of blended samples ``indices`` (int64 arrays)."""
        i = np.asarray(indices, dtype=np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.num_windows):
            raise IndexError(f"window index out of range ({self.num_windows} windows)")
        corpus = np.searchsorted(self._starts, i, side="right") - 1
        window = i - self._starts[corpus]
        for c, sel in enumerate(self._select):
            if sel is not None and (mask := corpus == c).any():
                window[mask] = sel(window[mask] % self.sizes[c])
        return corpus, window

    def locate(self, i: int) -> tuple[int, int]:
        """(corpus, window within it) of sample ``i``."""
        c, j = self.locate_many([int(i)])
        return int(c[0]), int(j[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        c, j = self.locate(int(i))
        T = self.seq_len
        chunk = np.asarray(self.corpora[c].tokens[j * T: j * T + T + 1], dtype=np.int64)
        return chunk[:-1], chunk[1:]

    def get_batch(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Stacked windows: (x, y) int64 arrays of shape (len(indices), T)."""
        T = self.seq_len
        corpus, window = self.locate_many(indices)
        rows = np.empty((len(corpus), T + 1), np.int64)
        for r, (c, j) in enumerate(zip(corpus.tolist(), window.tolist())):
            rows[r] = self.corpora[c].tokens[j * T: j * T + T + 1]
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def fingerprint(self) -> str:
        """A digest of what defines the windows (corpora contents by their counts and tokenizer,
        seq_len, weights, seed), not of their paths: a moved corpus still resumes."""
        desc = {"seq_len": self.seq_len, "seed": self.seed, "order": "feistel-1",   # the sample order's version
                "weights": None if self.weights is None else [round(float(w), 12) for w in self.weights],
                "corpora": [[c.meta.get("tokenizer_sha256"), c.num_tokens, c.num_documents] for c in self.corpora]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TokenWindows({self.paths}, seq_len={self.seq_len}, {self.num_windows} windows)"


class BatchSampler:
    """This rank's micro-batches of a seeded, epoch-wise shuffled, infinite sample stream
    (O(1) memory: see the module docstring).

    ``next_micro_batch() -> (x, y)``: torch.LongTensor (micro_batch, T). ``state_dict()`` /
    ``load_state_dict()`` carry ``consumed_samples`` (global samples of completed micro-steps).
    """

    def __init__(self, windows: TokenWindows, micro_batch: int, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0) -> None:
        for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("dp_size", dp_size)):
            if v < 1:
                raise ValueError(f"BatchSampler: {name}={v} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"BatchSampler: dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"BatchSampler: seed={seed} must be >= 0")
        self.windows = windows
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.global_batch = micro_batch * grad_accum * dp_size
        self.micro_step_samples = micro_batch * dp_size
        self.consumed_samples = 0
        self._epoch = -1
        self._perm: FeistelPermutation | None = None

    def _permutation(self, epoch: int) -> FeistelPermutation:
        if epoch != self._epoch:
            self._perm = FeistelPermutation(len(self.windows), derive_key(self.seed, epoch))
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Window indices of global samples [start, start + count)."""
        n = len(self.windows)
        out = np.empty(count, np.int64)
        done = 0
        while done < count:
            epoch, pos = divmod(start + done, n)
            take = min(count - done, n - pos)
            out[done: done + take] = self._permutation(epoch)(np.arange(pos, pos + take, dtype=np.int64))
            done += take
        return out

    def micro_batch_indices(self) -> np.ndarray:
        """Window indices of this rank's next micro-batch (does not advance)."""
        return self.global_indices(self.consumed_samples + self.dp_rank * self.micro_batch, self.micro_batch)

    def next_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's next micro-batch (x, y) as int64 numpy arrays (micro_batch, T); advances
        the state by one micro-step of all ranks (micro_batch x dp_size global samples)."""
        x, y = self.windows.get_batch(self.micro_batch_indices())
        self.consumed_samples += self.micro_step_samples
        return x, y

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`next_arrays` as int64 tensors."""
        import torch

        x, y = self.next_arrays()
        return torch.from_numpy(x), torch.from_numpy(y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_micro_batch()

    def state_dict(self) -> dict:
        """JSON-ready state for a checkpoint."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "global_batch": self.global_batch,
                "num_windows": len(self.windows), "windows_fingerprint": self.windows.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. Refuses a different seed or different windows, and a position
        that is not a whole micro-step of this sampler (micro_batch x dp_size samples). A changed
        global batch is accepted: the sample stream continues, regrouped into steps."""
        if state.get("seed") != self.seed:
            raise ValueError(f"sampler state has seed {state.get('seed')}, this sampler {self.seed}")
        mine = (len(self.windows), self.windows.fingerprint())
        if (state.get("num_windows"), state.get("windows_fingerprint")) != mine:
            raise ValueError(f"sampler state is for other windows ({state.get('num_windows')} windows, fingerprint "
                             f"{state.get('windows_fingerprint')}); these are {len(self.windows)} windows, "
                             f"fingerprint {self.windows.fingerprint()} (corpora, seq_len, weights, seed or the "
                             f"sampler's order changed)")
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.micro_step_samples:
            raise ValueError(f"sampler state consumed_samples={consumed} is not a multiple of micro_batch x dp_size "
                             f"= {self.micro_step_samples}: cannot resume mid-micro-step")
        self.consumed_samples = consumed

"""Seeded bijections of [0, n) computed index by index: O(1) memory whatever n is.

`FeistelPermutation(n, key)` maps i -> perm(i) with a balanced Feistel network over the
smallest power-of-4 domain 4^h >= n (4 rounds of a splitmix64 round function), and
cycle-walking to stay inside [0, n): an output >= n is fed through the network again until
it lands below n (the domain is < 4n, so the expected number of walks is below 4). A Feistel
network is a bijection of its domain for any round function, and cycle-walking restricts a
bijection of a superset to a bijection of [0, n) (Black & Rogaway, "Ciphers with arbitrary
finite domains", 2002). Everything is vectorized over numpy uint64 arrays (wrapping arithmetic).
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 4


def mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (mod 2^64): a well-mixed 64-bit hash."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_array(x: np.ndarray) -> np.ndarray:
    """`mix64` on a uint64 array (numpy's uint64 arithmetic wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """One 64-bit key from integers (seed, epoch, corpus, ...), order-sensitive."""
    k = 0x9E3779B97F4A7C15
    for p in parts:
        k = mix64(k ^ mix64(int(p) & _MASK64))
    return k


class FeistelPermutation:
    """A seeded permutation of [0, n): ``perm(indices) -> indices`` (int64 arrays), and its
    inverse. Memory: a few integers, whatever n."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"FeistelPermutation: n={n} must be >= 1")
        self.n = int(n)
        self.half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        self._keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def _network(self, x: np.ndarray, inverse: bool = False) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self._mask
        keys = self._keys[::-1] if inverse else self._keys
        for k in keys:
            if inverse:
                left, right = right ^ (mix_array(left ^ k) & self._mask), left
            else:
                left, right = right, left ^ (mix_array(right ^ k) & self._mask)
        return (left << h) | right

    def _walk(self, idx: np.ndarray | list[int] | int, inverse: bool) -> np.ndarray:
        x = np.asarray(idx, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"FeistelPermutation: index out of [0, {self.n})")
        y = self._network(x.astype(np.uint64), inverse)
        out = y >= np.uint64(self.n)
        while out.any():
            y[out] = self._network(y[out], inverse)
            out = y >= np.uint64(self.n)
        return y.astype(np.int64)

    def __call__(self, idx: np.ndarray | list[int] | int) -> np.ndarray:
        """perm(idx), elementwise."""
        return self._walk(idx, inverse=False)

    def inverse(self, idx: np.ndarray | list[int] | int) -> np.ndarray:
        """perm^-1(idx), elementwise."""
        return self._walk(idx, inverse=True)

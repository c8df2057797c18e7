"""grain's index shuffle for a whole epoch at once, in numpy.

`grain.MapDataset.shuffle` places example ``j`` of an epoch at ``index_shuffle(j)``: a
Simon block cipher over at least 16 bits, applied again until the result falls inside the
data set (cycle walking). One call costs 25-30 us for a split of a few thousand examples,
which cycles through a 65,536-value block about 45 times per index: a third of the host's
time per training batch of the digits. `epoch_order` computes the same permutation for
every index of an epoch in one vectorised pass, bit for bit (tests/data/test_shuffle.py
compares it with grain's own).
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS = 4  # what grain's ShuffleMapDataset asks for
_MIN_BLOCK_BITS = 16
_MASK32 = 0xFFFFFFFF


def round_keys(seed: int, rounds: int = ROUNDS) -> list[int]:
    """The round keys grain derives from ``seed``: C++'s ``std::seed_seq{seed}.generate``."""
    n, s, v = rounds, 1, [seed & _MASK32]
    b = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)

    def mix(x: int) -> int:
        return x ^ (x >> 27)

    for k in range(m):
        r1 = (1664525 * mix(b[k % n] ^ b[(k + p) % n] ^ b[(k - 1) % n])) & _MASK32
        r2 = (r1 + (s if k == 0 else (k % n + v[k - 1] if k <= s else k % n))) & _MASK32
        b[(k + p) % n] = (b[(k + p) % n] + r1) & _MASK32
        b[(k + q) % n] = (b[(k + q) % n] + r2) & _MASK32
        b[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * mix((b[k % n] + b[(k + p) % n] + b[(k - 1) % n]) & _MASK32)) & _MASK32
        r4 = (r3 - k % n) & _MASK32
        b[(k + p) % n] ^= r3
        b[(k + q) % n] ^= r4
        b[k % n] = r4
    return b


def block_bits(max_index: int) -> int:
    """grain's cipher block: enough bits for ``max_index``, even, at least 16."""
    bits = math.ceil(math.log2(max_index))
    return max(bits + bits % 2, _MIN_BLOCK_BITS)


def _encrypt(values: np.ndarray, keys: list[int], word: int) -> np.ndarray:
    mask = np.uint64((1 << word) - 1)
    w = np.uint64(word)

    def rotl(x: np.ndarray, r: int) -> np.ndarray:
        r_ = np.uint64(r)
        return ((x << r_) | (x >> (w - r_))) & mask

    def f(x: np.ndarray) -> np.ndarray:
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    left, right = (values >> w) & mask, values & mask
    for i in range(0, len(keys), 2):
        left = left ^ f(right) ^ (np.uint64(keys[i]) & mask)
        right = right ^ f(left) ^ (np.uint64(keys[i + 1]) & mask)
    return (left << w) | right


def epoch_order(length: int, seed: int) -> np.ndarray:
    """``[index_shuffle(j, length - 1, seed, 4) for j in range(length)]`` (int64): the
    shuffled position of each example ``j``, as grain's ``shuffle`` computes it."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    if length == 1:
        return np.zeros(1, np.int64)
    max_index = length - 1
    keys = round_keys(seed)
    bits = block_bits(max_index)
    if bits <= _MIN_BLOCK_BITS:  # a small split walks ~65,536 / length steps: tabulate
        table = _encrypt(np.arange(1 << bits, dtype=np.uint64), keys, bits // 2)
        block = np.uint64((1 << bits) - 1)  # as the cipher reads an index of 2**bits: 0

        def encrypt(values: np.ndarray) -> np.ndarray:
            return table[values & block]
    else:  # the block holds at most 4x the split: a few steps each

        def encrypt(values: np.ndarray) -> np.ndarray:
            return _encrypt(values, keys, bits // 2)

    out = np.arange(length, dtype=np.uint64)
    pending = np.arange(length)
    while pending.size:  # cycle walking: encrypt again until inside [0, max_index]
        out[pending] = encrypt(out[pending])
        pending = pending[out[pending] > max_index]
    return out.astype(np.int64)

"""The first bounded integers of many numpy Philox generators at once.

grain gives example `i` of a random transformation a `np.random.Generator(Philox(seed))`
whose counter is reset to `[0, 0, 0, i]`, and `transforms.Augment` draws its crop and flip
from it with one `rng.integers(0, highs)`. Resetting a generator costs ~10 us an example;
`first_integers` computes the same numbers for a whole batch of counters in numpy: one
Philox4x64-10 block per example (numpy increments the counter before it encrypts), its
first 32-bit words in numpy's order, and Lemire's multiply-shift as numpy bounds them. The
rare draw that numpy would reject and redraw (a chance of about (2**32 % high) / 2**32) is
left to numpy itself. tests/data/test_philox.py compares it with numpy's generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)  # Random123
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)
_LOW32 = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
ROUNDS = 10  # numpy's Philox is Philox4x64-10


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64 bits of the 128-bit products `a * b`."""
    a_lo, a_hi = a & _LOW32, a >> _32
    b_lo, b_hi = b & _LOW32, b >> _32
    cross_1, cross_2 = a_lo * b_hi, a_hi * b_lo
    middle = ((a_lo * b_lo) >> _32) + (cross_1 & _LOW32) + (cross_2 & _LOW32)
    high = a_hi * b_hi + (cross_1 >> _32) + (cross_2 >> _32) + (middle >> _32)
    return high, a * b


def block(counters: np.ndarray, key: Sequence[int]) -> np.ndarray:
    """Philox4x64-10 of `counters` ([n, 4] uint64) under `key` (2 words): [n, 4] uint64."""
    c0, c1, c2, c3 = (counters[:, i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    with np.errstate(over="ignore"):
        for r in range(ROUNDS):
            if r:
                k0, k1 = k0 + _W0, k1 + _W1
            hi0, lo0 = _mulhilo(_M0, c0)
            hi1, lo1 = _mulhilo(_M1, c2)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=1)


def first_integers(seed: int, indices: np.ndarray, highs: Sequence[int]) -> np.ndarray:
    """`[Generator(Philox(seed)) reset to counter [0, 0, 0, i]].integers(0, highs)` for each
    `i` in `indices`: [n, len(highs)] int64. At most 4 highs, each in [1, 2**32)."""
    if not 1 <= len(highs) <= 4 or not all(1 <= h < 2**32 for h in highs):
        raise ValueError(f"highs must be 1 to 4 integers in [1, 2**32), got {highs}")
    indices = np.asarray(indices, np.uint64)
    key = np.random.Philox(seed).state["state"]["key"]
    counters = np.zeros((len(indices), 4), np.uint64)
    counters[:, 0] = 1  # numpy increments the counter [0, 0, 0, i] before its first block
    counters[:, 3] = indices
    words64 = block(counters, key)
    # next_uint32: the low half of a 64-bit word, then its high half, then the next word.
    words32 = np.stack([words64 & _LOW32, words64 >> _32], axis=2).reshape(len(indices), 8)
    out = np.empty((len(indices), len(highs)), np.int64)
    redraw = np.zeros(len(indices), bool)
    word = 0
    for column, high in enumerate(highs):
        if high == 1:  # numpy returns 0 without drawing
            out[:, column] = 0
            continue
        product = words32[:, word] * np.uint64(high)
        out[:, column] = (product >> _32).astype(np.int64)
        # Lemire's rejection: numpy would draw again where the low half falls below this.
        redraw |= (product & _LOW32) < np.uint64((2**32 - high) % high)
        word += 1
    if redraw.any():
        rng = np.random.Generator(np.random.Philox(seed))
        for i in np.flatnonzero(redraw):
            out[i] = reset(rng, int(indices[i])).integers(0, highs)
    return out


def reset(rng: np.random.Generator, index: int) -> np.random.Generator:
    """`rng` with its Philox counter set to `[0, 0, 0, index]` and its buffers emptied, as
    grain's RngPool hands it to example `index`."""
    state = rng.bit_generator.state
    state["state"]["counter"] = np.array([0, 0, 0, index], dtype=np.uint64)
    state["buffer"] = np.zeros(4, np.uint64)
    state["buffer_pos"] = 4
    state["has_uint32"] = 0
    state["uinteger"] = 0
    rng.bit_generator.state = state
    return rng

"""`shuffle.epoch_order` is grain's index shuffle, computed for a whole epoch at once."""

import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

from flaxcnn.data import shuffle


def grains(index: int, length: int, seed: int) -> int:
    return index_shuffle_module.index_shuffle(index, max_index=length - 1, seed=seed, rounds=4)


@pytest.mark.parametrize(
    "length",
    # small splits (a 16-bit block, walked ~65536/length times), a power of two and one
    # past it, the 16-bit block's edge (an index of exactly 2**16), and a wider block
    [2, 3, 150, 1293, 1024, 1025, 65_536, 65_537, 70_001],
)
@pytest.mark.parametrize("seed", [0, 1, 3_964_924_996, 2**32 - 1])
def test_every_position_is_the_one_grain_gives(length, seed):
    order = shuffle.epoch_order(length, seed)
    assert order.dtype == np.int64 and order.shape == (length,)
    rng = np.random.default_rng(length + seed)
    indices = range(length) if length <= 2_000 else [0, length - 1, *rng.integers(0, length, 200)]
    assert [int(order[j]) for j in indices] == [grains(int(j), length, seed) for j in indices]


def test_a_split_that_fits_the_block_is_permuted():
    for length in (2, 150, 1293, 1024):
        assert sorted(shuffle.epoch_order(length, 5)) == list(range(length))
    assert shuffle.epoch_order(1, 5).tolist() == [0]


def test_round_keys_are_those_of_cpp_seed_seq():
    """As `std::seed_seq{seed}.generate` gives them (g++ 12, 2026-12-07; the algorithm is
    fixed by the C++ standard)."""
    assert shuffle.round_keys(0) == [2963817213, 69796629, 1973464570, 532167439]
    assert shuffle.round_keys(3_964_924_996) == [3983293410, 2956353922, 456163129, 374551106]

"""`philox.first_integers` draws what numpy's generator, reset as grain resets it, draws."""

import numpy as np
import pytest

from flaxcnn.data import philox


@pytest.mark.parametrize("seed", [0, 3_964_924_996])
@pytest.mark.parametrize(
    "highs",
    # the crop and flip at 32 px (padding 4) and 8 px (1); a range of 1, drawn without a
    # word; and one so wide that numpy rejects and redraws about half of its draws
    [(9, 9, 2), (3, 3, 2), (9, 1, 5), (2**31 + 11, 7)],
)
def test_the_draws_of_every_index_are_numpys(seed, highs):
    indices = np.concatenate([np.arange(600), np.random.default_rng(seed).integers(0, 2**40, 400)])
    rng = np.random.Generator(np.random.Philox(seed))
    want = np.array([philox.reset(rng, int(i)).integers(0, highs) for i in indices])
    got = philox.first_integers(seed, indices, highs)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_the_block_is_numpys_philox4x64_10():
    """numpy's Philox at counter c gives the block of c + 1 (it counts before it encrypts)."""
    draw = np.random.default_rng(1).integers(0, 2**64 - 1, (20, 6), dtype=np.uint64)
    draw[:, 2] >>= np.uint64(1)  # no carry out of the counter's first word
    for row in draw:
        key, counter = row[:2], row[2:]
        want = np.random.Philox(key=key, counter=counter).random_raw(4)
        counter[0] += np.uint64(1)
        np.testing.assert_array_equal(philox.block(counter[None], key)[0], want)


def test_bad_highs_are_refused():
    with pytest.raises(ValueError, match="highs"):
        philox.first_integers(0, np.arange(3), (0, 2))

"""eval_batches: each example of a split exactly once, padded to fixed batches with a mask."""

import numpy as np
import pytest

from flaxcnn import data


def batches(ds, **overrides):
    settings = dict(
        global_batch_size=16, image_size=8, channels=1, process_index=0, process_count=1
    )
    return list(data.eval_batches(ds, **{**settings, **overrides}))


def test_covers_the_test_split_once_with_a_padded_last_batch(indexed_dataset, example_ids):
    ds = indexed_dataset(num_train=50, num_test=37)
    result = batches(ds)
    assert len(result) == 3
    for batch in result:
        assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
    masks = np.concatenate([b["mask"] for b in result])
    ids = np.concatenate([example_ids(b) for b in result])[masks]
    assert masks.sum() == 37 and not masks[37:].any()
    assert sorted(ids.tolist()) == list(range(50, 87))


def test_two_processes_cover_every_example_once_in_as_many_batches(indexed_dataset, example_ids):
    ds = indexed_dataset(num_train=50, num_test=37)
    shards = [batches(ds, process_index=p, process_count=2) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3
    ids = [example_ids(b)[b["mask"]].tolist() for shard in shards for b in shard]
    flat = [i for batch_ids in ids for i in batch_ids]
    assert sorted(flat) == list(range(50, 87))
    assert all(b["image"].shape[0] == 8 for shard in shards for b in shard)


def test_train_split_and_reiteration(digits):
    evaluation = data.eval_batches(
        digits,
        split="train",
        global_batch_size=100,
        image_size=32,
        channels=3,
        process_index=0,
        process_count=1,
    )
    assert len(evaluation) == 15
    first = [b["label"] for b in evaluation]
    second = [b["label"] for b in evaluation]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))
    assert sum(int(b["mask"].sum()) for b in evaluation) == 1437


def test_unknown_split(digits):
    with pytest.raises(ValueError, match="unknown split"):
        data.eval_batches(
            digits,
            split="validation",
            global_batch_size=8,
            image_size=8,
            channels=1,
            process_index=0,
            process_count=1,
        )

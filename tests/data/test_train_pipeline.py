"""TrainPipeline: seeded per-epoch shuffles, exactly-once epochs, process shards, resuming."""

import itertools
import json

import numpy as np
import pytest

from flaxcnn import data


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def pipeline(ds, **overrides):
    settings = dict(
        global_batch_size=32,
        image_size=8,
        channels=1,
        seed=0,
        augment=False,
        process_index=0,
        process_count=1,
    )
    return data.TrainPipeline(ds, **{**settings, **overrides})


def test_batch_shapes_and_dtypes(digits):
    pipe = pipeline(digits, global_batch_size=128, image_size=32, channels=3, augment=True)
    assert pipe.steps_per_epoch == 1437 // 128 and pipe.local_batch_size == 128
    batch = next(iter(pipe))
    assert batch["image"].shape == (128, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label"}


def test_same_seed_same_batches_other_seed_other_batches(digits):
    first = take(iter(pipeline(digits, seed=3, augment=True)), 3)
    again = take(iter(pipeline(digits, seed=3, augment=True)), 3)
    other = take(iter(pipeline(digits, seed=4, augment=True)), 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_every_example_once_per_epoch_with_a_new_order_and_remainder(indexed_dataset, example_ids):
    ds = indexed_dataset(num_train=100, num_test=10)
    pipe = pipeline(ds, global_batch_size=16)
    assert pipe.steps_per_epoch == 6  # 96 per epoch, 4 left over
    batches = take(iter(pipe), 3 * pipe.steps_per_epoch)
    epochs = [
        np.concatenate([example_ids(b) for b in batches[e * 6 : (e + 1) * 6]]) for e in range(3)
    ]
    for ids in epochs:
        assert len(ids) == 96 and len(set(ids.tolist())) == 96
        assert set(ids.tolist()) <= set(range(100))
    orders = {tuple(ids) for ids in epochs}
    dropped = {frozenset(set(range(100)) - set(ids.tolist())) for ids in epochs}
    assert len(orders) == 3 and len(dropped) == 3


def test_two_processes_split_each_global_batch_without_overlap(indexed_dataset, example_ids):
    ds = indexed_dataset(num_train=100, num_test=10)
    steps = 14  # More than two epochs.
    whole = take(iter(pipeline(ds, global_batch_size=16)), steps)
    halves = [
        take(iter(pipeline(ds, global_batch_size=16, process_index=p, process_count=2)), steps)
        for p in (0, 1)
    ]
    for step in range(steps):
        first, second = (example_ids(h[step]) for h in halves)
        assert len(first) == len(second) == 8
        assert not set(first.tolist()) & set(second.tolist())
        assert sorted([*first, *second]) == sorted(example_ids(whole[step]).tolist())


def test_augmented_global_batches_do_not_depend_on_the_process_count(digits):
    whole = take(iter(pipeline(digits, global_batch_size=64, image_size=16, augment=True)), 2)
    parts = [
        take(
            iter(
                pipeline(
                    digits,
                    global_batch_size=64,
                    image_size=16,
                    augment=True,
                    process_index=p,
                    process_count=4,
                )
            ),
            2,
        )
        for p in range(4)
    ]
    for step in range(2):
        # Process p holds global positions p, p + 4, ... of the batch.
        stitched = np.empty_like(whole[step]["image"])
        for p in range(4):
            stitched[p::4] = parts[p][step]["image"]
        np.testing.assert_array_equal(stitched, whole[step]["image"])


@pytest.mark.parametrize("worker_count", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_mid_epoch_gives_exactly_the_following_batches(digits, worker_count):
    """The batches before a saved state and after its restore are those of an uninterrupted
    iterator without worker processes (the state is only the index of the next batch).
    With 2 workers, which grain interleaves: tests/training/test_run_directory.py."""
    settings = dict(global_batch_size=64, augment=True)
    steps = 5 + pipeline(digits, **settings).steps_per_epoch  # runs into the next epoch
    expected = take(iter(pipeline(digits, **settings)), steps)
    pipe = pipeline(digits, **settings, worker_count=worker_count)
    iterator = iter(pipe)
    got = take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))
    iterator.close()
    resumed = iter(pipe)
    resumed.set_state(state)
    assert resumed.get_state()["step"] == 5
    got += take(resumed, steps - 5)
    assert resumed.get_state()["step"] == steps
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    resumed.close()


def test_state_from_another_pipeline_is_refused(digits):
    state = iter(pipeline(digits, seed=1)).get_state()
    with pytest.raises(ValueError, match="seed"):
        iter(pipeline(digits, seed=2)).set_state(state)


def test_a_fresh_iterator_starts_at_step_zero(digits):
    pipe = pipeline(digits)
    iterator = iter(pipe)
    take(iterator, 3)
    assert iterator.get_state()["step"] == 3 and iter(pipe).get_state()["step"] == 0


def test_sizes_that_cannot_work_are_refused_in_one_line(digits):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline(digits, global_batch_size=2048)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline(digits, global_batch_size=32, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        pipeline(digits, process_index=2, process_count=2)


def test_process_layout_defaults_to_jax(digits):
    pipe = data.TrainPipeline(digits, global_batch_size=32, image_size=8, channels=1, seed=0)
    assert (pipe.process_index, pipe.process_count) == (0, 1)


def test_epochs_run_on_forever(indexed_dataset):
    ds = indexed_dataset(num_train=40, num_test=10)
    iterator = iter(pipeline(ds, global_batch_size=8))
    assert len(list(itertools.islice(iterator, 50))) == 50  # 10 epochs of 5 steps

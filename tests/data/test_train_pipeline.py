"""TrainPipeline: seeded per-epoch shuffles, exactly-once epochs, process shards, resuming."""

import itertools
import json
from collections.abc import Sequence

import numpy as np
import pytest

from flaxcnn import data
from flaxcnn.data.transforms import crop_padding


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def pipeline(ds, **overrides):
    settings = dict(
        global_batch_size=32,
        image_size=8,
        channels=1,
        seed=0,
        augment="none",
        process_index=0,
        process_count=1,
    )
    return data.TrainPipeline(ds, **{**settings, **overrides})


def test_batch_shapes_and_dtypes(digits):
    pipe = pipeline(digits, global_batch_size=128, image_size=32, channels=3, augment="default")
    assert pipe.steps_per_epoch == 1437 // 128 and pipe.local_batch_size == 128
    batch = next(iter(pipe))
    assert batch["image"].shape == (128, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (128,) and batch["label"].dtype == np.int32
    assert set(batch) == {"image", "label"}


def test_same_seed_same_batches_other_seed_other_batches(digits):
    first = take(iter(pipeline(digits, seed=3, augment="default")), 3)
    again = take(iter(pipeline(digits, seed=3, augment="default")), 3)
    other = take(iter(pipeline(digits, seed=4, augment="default")), 3)
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
    whole = take(iter(pipeline(digits, global_batch_size=64, image_size=16, augment="default")), 2)
    parts = [
        take(
            iter(
                pipeline(
                    digits,
                    global_batch_size=64,
                    image_size=16,
                    augment="default",
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
    settings = dict(global_batch_size=64, augment="default")
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


class Images(Sequence):
    """Example ``i`` is ``images[i]`` with label ``i``: the batches say which image is which."""

    def __init__(self, images: np.ndarray):
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {"image": self._images[index], "label": index}


def image_dataset(images: np.ndarray, hflip: bool = True) -> data.Dataset:
    """Images at their stored size, mean 0 and std 1: a batch is the images / 255."""
    count = len(images)
    info = data.DatasetInfo(
        name="images", num_classes=count, class_names=tuple(map(str, range(count))),
        image_shape=images.shape[1:], num_train=count, num_test=count, mean=(0.0,), std=(1.0,),
        hflip=hflip,
    )  # fmt: skip
    return data.Dataset(info=info, train=Images(images), test=Images(images))


def test_augment_none_gives_the_images_as_they_are():
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16, 1), np.uint8)
    pipe = pipeline(image_dataset(images), global_batch_size=8, image_size=16, augment="none")
    for batch in take(iter(pipe), 2 * pipe.steps_per_epoch):
        got = np.rint(batch["image"] * 255).astype(np.uint8)
        np.testing.assert_array_equal(got, images[batch["label"]])


def test_crop_shifts_but_never_flips_a_data_set_that_could_be_flipped():
    """The image is bright on its left half only; a shift of at most 2 px (at 16 px) keeps
    its rightmost columns dark unless it is mirrored."""
    image = np.zeros((16, 16, 1), np.uint8)
    image[:, :8] = 200
    ds = image_dataset(np.repeat(image[None], 32, axis=0))
    settings = dict(global_batch_size=32, image_size=16, seed=1)
    assert crop_padding(16) == 2

    def mirrored_and_shifted(augment: str) -> tuple[int, int]:
        batches = take(iter(pipeline(ds, augment=augment, **settings)), 4)
        out = np.concatenate([np.rint(b["image"] * 255) for b in batches])
        mirrored = int((out[:, :, -2:] > 0).any(axis=(1, 2, 3)).sum())
        shifted = int((out != image).any(axis=(1, 2, 3)).sum())
        return mirrored, shifted

    mirrored, shifted = mirrored_and_shifted("crop")
    assert mirrored == 0 and shifted > 64
    assert mirrored_and_shifted("crop+flip")[0] > 32  # about half of the 128


def test_default_augmentation_is_the_data_sets_own_and_older_states_still_restore(digits):
    """Iterator states saved before --augment hold a bool: True was the data set's own."""
    photos = image_dataset(np.zeros((32, 8, 8, 1), np.uint8), hflip=True)
    assert pipeline(photos, augment="default").augment == "crop+flip"
    assert pipeline(digits, augment="default").augment == "crop"  # no mirrored digits
    with pytest.raises(ValueError, match="unknown augmentation 'flip'; choose from default"):
        pipeline(digits, augment="flip")
    iterator = iter(pipeline(digits, augment="default"))
    state = {**iterator.get_state(), "augment": True, "step": 3}
    iterator.set_state(state)
    assert iterator.get_state()["step"] == 3
    with pytest.raises(ValueError, match="augment"):
        iterator.set_state({**state, "augment": False})


# --------------------------------------------------------------- whole batches in memory


def grain_graph(pipe: data.TrainPipeline):
    """The pipeline's stream as grain's per-example graph, which whole batches replace."""
    from flaxcnn.data.memory import preprocess_in_memory

    split = preprocess_in_memory(pipe.dataset.train, pipe.image_size, pipe.channels)
    return pipe._normalized(pipe._grain_batches(split, in_memory=True))


@pytest.mark.parametrize("augment", ["none", "crop", "crop+flip"])
@pytest.mark.parametrize("process_index, process_count, channels", [(0, 1, 1), (1, 2, 3)])
def test_whole_batches_are_grains_batches_bit_for_bit(
    digits, augment, process_index, process_count, channels
):
    """An in-memory split is batched whole (order, crops and flips drawn as grain draws
    them), and gives the batches of grain's graph for three epochs, epoch edges included."""
    pipe = pipeline(
        digits, global_batch_size=64, image_size=16, augment=augment, seed=3,
        process_index=process_index, process_count=process_count, channels=channels,
    )  # fmt: skip
    assert pipe.whole_batches
    reference = grain_graph(pipe)
    for step in range(3 * pipe.steps_per_epoch):
        got, want = pipe._batches[step], reference[step]
        for key in ("image", "label"):
            assert got[key].dtype == want[key].dtype, (step, key)
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"batch {step}")


def test_whole_batches_give_way_to_grain_where_they_would_differ(digits, monkeypatch):
    """Another grain might derive its seeds otherwise: the pipeline compares the two on its
    first batches and keeps grain's graph if they differ."""
    from flaxcnn.data import fast_batches

    monkeypatch.setattr(fast_batches, "AUGMENT_DEPTH", fast_batches.AUGMENT_DEPTH + 1)
    pipe = pipeline(digits, global_batch_size=64, image_size=16, augment="crop")
    assert not pipe.whole_batches
    reference = grain_graph(pipe)
    np.testing.assert_array_equal(pipe._batches[1]["image"], reference[1]["image"])
    monkeypatch.undo()
    assert pipeline(digits, global_batch_size=64, image_size=16, augment="crop").whole_batches

"""grain pipelines: endless shuffled training batches and padded, masked evaluation batches.

Both are grain ``MapDataset`` graphs, so element ``i`` is a pure function of the seed and
``i``. Training: the data set is reshuffled each epoch (grain folds the epoch into the
seed), the last ``num_train % global_batch_size`` examples of each shuffled epoch are
dropped (a different remainder each epoch), and every process takes every
``process_count``-th example from position ``process_index``, so the union of the
processes' batch ``t`` is exactly global batch ``t``. Augmentation draws from an RNG keyed
by the example's global position, so the global batches are the same for any number of
processes or workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from flaxcnn.data.dataset import Dataset
from flaxcnn.data.fast_batches import InMemoryBatches, agrees_with
from flaxcnn.data.memory import fits_in_memory, preprocess_in_memory
from flaxcnn.data.prefetch import read_ahead
from flaxcnn.data.transforms import (
    DEFAULT_AUGMENT,
    Augment,
    Normalize,
    Preprocess,
    crop_padding,
    normalization,
    resolve_augment,
)


def _process_layout(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # Only when asked to find out; the data layer itself needs no accelerator.

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in range for process_count {count}")
    return index, count


def _check_shape_args(global_batch_size: int, image_size: int, channels: int) -> None:
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the {process_count} "
            "processes"
        )
    return global_batch_size // process_count


class TrainPipeline:
    """Endless training batches for one process: ``iter(pipeline)`` starts at step 0.

    Each batch is ``{"image": float32 [local_batch, S, S, C] (normalised), "label": int32
    [local_batch]}``; batch ``step`` belongs to epoch ``step // steps_per_epoch``.

    A training split whose resized images fit in ``memory.MEMORY_LIMIT_BYTES`` (digits,
    MNIST, CIFAR) is decoded and resized once, here, and then batched whole
    (``fast_batches``: the same batches for a tenth of the host's time, ``whole_batches``);
    larger ones are decoded as they stream, through grain's graph.
    ``worker_count`` > 0 does that work and the augmentation in as many grain worker
    processes (worth it for large images, given spare cores); 0 reads ahead in background
    threads of this process. ``augment`` is one of ``transforms.AUGMENTATIONS`` or
    ``"default"``, the data set's own (``self.augment`` holds the resolved one).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        global_batch_size: int,
        image_size: int,
        channels: int,
        seed: int,
        augment: str = DEFAULT_AUGMENT,
        process_index: int | None = None,
        process_count: int | None = None,
        worker_count: int = 0,
    ):
        _check_shape_args(global_batch_size, image_size, channels)
        if worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {worker_count}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.augment = resolve_augment(augment, dataset.info.hflip)
        self.worker_count = worker_count
        self.process_index, self.process_count = _process_layout(process_index, process_count)
        self.local_batch_size = _local_batch_size(global_batch_size, self.process_count)
        self.steps_per_epoch = dataset.info.num_train // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{dataset.info.name} has {dataset.info.num_train} training examples, fewer "
                f"than one global batch of {global_batch_size}"
            )
        self._batches = self._build()

    def _build(self) -> grain.MapDataset:
        self.whole_batches = False  # an in-memory split's batches made whole (fast_batches)
        train = self.dataset.train
        if not fits_in_memory(len(train), self.image_size, self.channels):
            return self._normalized(self._grain_batches(train, in_memory=False))
        split = preprocess_in_memory(train, self.image_size, self.channels, self.worker_count)
        batches = self._normalized(self._grain_batches(split, in_memory=True))
        fast = self._normalized(
            InMemoryBatches(
                split, seed=self.seed, steps_per_epoch=self.steps_per_epoch,
                global_batch_size=self.global_batch_size, process_index=self.process_index,
                process_count=self.process_count, padding=crop_padding(self.image_size),
                hflip=self.augment == "crop+flip", augment=self.augment != "none",
            )
        )  # fmt: skip
        # The first batch of the first two epochs: the order, the crops and their seeds.
        self.whole_batches = agrees_with(fast, batches, (0, self.steps_per_epoch))
        return fast if self.whole_batches else batches

    def _normalized(self, batches: grain.MapDataset) -> grain.MapDataset:
        normalize = Normalize(*normalization(self.dataset.info, self.channels))
        return batches.map(normalize).repeat()

    def _grain_batches(self, train: Sequence, *, in_memory: bool) -> grain.MapDataset:
        """The stream as a grain graph, one example at a time (see the module docstring)."""
        examples = grain.MapDataset.source(train).seed(self.seed).shuffle()
        # One epoch = the first steps_per_epoch * global_batch_size of its shuffle; grain
        # maps indices past the end to later epochs, reshuffled.
        examples = examples[: self.steps_per_epoch * self.global_batch_size]
        if not in_memory:
            examples = examples.map(Preprocess(self.image_size, self.channels))
        if self.augment != "none":
            hflip = self.augment == "crop+flip"
            examples = examples.random_map(Augment(crop_padding(self.image_size), hflip))
        local = examples[self.process_index :: self.process_count]
        return local.batch(self.local_batch_size, drop_remainder=True)

    def signature(self) -> dict[str, Any]:
        """What a saved iterator state is only valid for."""
        return {
            "dataset": self.dataset.info.name,
            "num_train": self.dataset.info.num_train,
            "global_batch_size": self.global_batch_size,
            "image_size": self.image_size,
            "channels": self.channels,
            "seed": self.seed,
            "augment": self.augment,
        }

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self)

    def read_from(self, step: int) -> grain.IterDataset:
        """The batches from index ``step`` on, read ahead (in threads or worker processes)."""
        return read_ahead(self._batches[step:], self.worker_count)


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """An iterator over training batches whose position can be saved and restored.

    The state is the index of the next batch, plus the settings it is valid for. Batch
    ``i`` is a pure function of the seed and ``i``, so restoring a position starts reading
    at that index: no reader has to save its own position, which grain's interleaving
    multi-worker reader (``worker_count`` >= 2) cannot do. It holds for any number of
    processes or workers: the global batches do not depend on them.
    """

    def __init__(self, pipeline: TrainPipeline):
        self._pipeline = pipeline
        self._step = 0
        self._reader: Iterator[dict[str, np.ndarray]] | None = None  # started on first use

    def __next__(self) -> dict[str, np.ndarray]:
        if self._reader is None:
            self._reader = iter(self._pipeline.read_from(self._step))
        batch = next(self._reader)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """The index of the next batch."""
        return self._step

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable state for checkpoints."""
        return {"step": self._step, **self._pipeline.signature()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue with the batch that followed when ``state`` was taken."""
        expected = self._pipeline.signature()
        if isinstance(state.get("augment"), bool):
            # Saved before --augment, as a bool: True was the data set's own augmentation.
            legacy = DEFAULT_AUGMENT if state["augment"] else "none"
            hflip = self._pipeline.dataset.info.hflip
            state = {**state, "augment": resolve_augment(legacy, hflip)}
        changed = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if changed:
            raise ValueError(f"iterator state is for another pipeline (saved, now): {changed}")
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"iterator state has an invalid step: {step!r}")
        self.close()  # what was read ahead from the old position is not used
        self._step = step

    def close(self) -> None:
        """Stop reading ahead (and worker processes) now rather than at garbage collection."""
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()
        self._reader = None


class PaddedSplit(Sequence):
    """A split padded with blank examples to a whole number of global batches, with a mask."""

    def __init__(self, source: Sequence, padded_length: int, blank_shape: tuple[int, int, int]):
        self._source = source
        self._length = padded_length
        self._blank = {
            "image": np.zeros(blank_shape, np.uint8),
            "label": 0,
            "mask": False,
        }

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if index < len(self._source):
            return {**self._source[index], "mask": True}
        if index < self._length:
            return self._blank
        raise IndexError(index)


class EvalBatches:
    """Every example of a split exactly once across processes, in fixed-shape masked batches.

    Re-iterable (one pass per ``iter``); ``len()`` is the number of batches, the same on
    every process.
    """

    def __init__(self, batches: grain.MapDataset):
        self._batches = batches

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(read_ahead(self._batches, worker_count=0))


def eval_batches(
    dataset: Dataset,
    *,
    split: str = "test",
    global_batch_size: int,
    image_size: int,
    channels: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalBatches:
    """Batches ``{"image", "label", "mask"}`` covering ``split`` once; padding has mask False."""
    _check_shape_args(global_batch_size, image_size, channels)
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    source = dataset.split(split)
    padded_length = math.ceil(len(source) / global_batch_size) * global_batch_size
    blank_shape = (image_size, image_size, channels)
    examples = grain.MapDataset.source(PaddedSplit(source, padded_length, blank_shape))
    examples = examples.map(Preprocess(image_size, channels))
    local = examples[process_index::process_count]
    batches = local.batch(local_batch_size, drop_remainder=True)
    return EvalBatches(batches.map(Normalize(*normalization(dataset.info, channels))))

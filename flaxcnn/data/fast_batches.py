"""Training batches of an in-memory split, a whole batch at a time, equal to grain's.

`TrainPipeline` describes its training stream as a grain graph, element by element:
shuffle, the epoch's first `steps_per_epoch * global_batch_size` examples, a random crop
(and flip) per example, every `process_count`-th example, batches. For a split held in
memory (the digits, MNIST, CIFAR) that graph costs the host about 75 us an example, 10 ms
for a batch of 128 (grain's shuffle alone 25-30 us an index on a split of a few thousand),
on the two cores that also run the train step. `InMemoryBatches` serves the same batches,
bit for bit, as one gather, one crop and one flip over the whole batch (0.8 ms): the
epoch's order from `shuffle.epoch_order`, each example's crop offsets from the random
stream grain would give it (`philox.first_integers`). The pipeline checks the two against
each other on its first batches before it uses this one (`agrees_with`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from flaxcnn.data import philox, shuffle
from flaxcnn.data.memory import InMemorySplit


def derived_seed(seed: int, depth: int) -> int:
    """The seed grain gives a random transformation `depth` nodes below `ds.seed(seed)`."""
    return int(np.random.SeedSequence([seed, depth]).generate_state(1, dtype=np.uint32)[0])


# Where the random transformations sit below `.seed()` in TrainPipeline's graph:
# shuffle directly on it; the crop under the epoch's slice, which is under the shuffle.
SHUFFLE_DEPTH, AUGMENT_DEPTH = 1, 3


class InMemoryBatches(grain.MapDataset):
    """Local batch `t` of the training stream (any `t`: epoch `t // steps_per_epoch`).

    The same uint8 images and int64 labels as TrainPipeline's grain graph before its
    normalisation: example `j` of the process's batch `b` in epoch `e` is the epoch's
    example `b * global_batch + j * process_count + process_index` in shuffled order, and
    its crop draws from Philox counter `[0, 0, 0, that position + e * examples_per_epoch]`.
    """

    def __init__(
        self,
        split: InMemorySplit,
        *,
        seed: int,
        steps_per_epoch: int,
        global_batch_size: int,
        process_index: int,
        process_count: int,
        padding: int,
        hflip: bool,
        augment: bool,
    ):
        super().__init__()
        self._images, self._labels = split.images, split.labels
        self._shuffle_seed = derived_seed(seed, SHUFFLE_DEPTH)
        self._augment_seed = derived_seed(seed, AUGMENT_DEPTH)
        self._steps = steps_per_epoch
        self._global = global_batch_size
        self._process_index, self._process_count = process_index, process_count
        self._local = global_batch_size // process_count
        self._padding, self._hflip, self._augment = padding, hflip, augment
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order), the last used

    def __len__(self) -> int:
        return self._steps

    def __str__(self) -> str:
        return "InMemoryBatches"

    def __getstate__(self) -> dict[str, Any]:  # worker processes rebuild the cache
        return {**self.__dict__, "_order": None}

    def _epoch_order(self, epoch: int) -> np.ndarray:
        cached = self._order  # one read: reading-ahead threads may replace it meanwhile
        if cached is None or cached[0] != epoch:
            seed = (self._shuffle_seed + epoch) % 2**32
            cached = (epoch, shuffle.epoch_order(len(self._labels), seed))
            self._order = cached
        return cached[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, step = divmod(index, self._steps)
        positions = (
            step * self._global + np.arange(self._local) * self._process_count + self._process_index
        )
        examples = self._epoch_order(epoch)[positions]
        images, labels = self._images[examples], self._labels[examples]
        if self._augment:
            stream = positions + epoch * self._steps * self._global
            images = self._crop(images, stream)
        return {"image": images, "label": labels}

    def _offsets(self, stream: np.ndarray) -> np.ndarray:
        """[n, 3] (top, left, flip) as `transforms.Augment` draws them for these indices."""
        span = 2 * self._padding + 1
        return philox.first_integers(self._augment_seed, stream, (span, span, 2))

    def _crop(self, images: np.ndarray, stream: np.ndarray) -> np.ndarray:
        """`transforms.padded_crop` (and the flip before it) of every image at once;
        `images`, the batch's own gathered copy, is flipped in place."""
        offsets = self._offsets(stream)
        p = self._padding
        if self._hflip:
            flipped = offsets[:, 2] == 1
            images[flipped] = images[flipped, :, ::-1]
        n, height, width = images.shape[:3]
        padded = np.zeros((n, height + 2 * p, width + 2 * p, *images.shape[3:]), images.dtype)
        padded[:, p : p + height, p : p + width] = images
        # out[y, x] = image[y + top - p, x + left - p]: the window of the padded image at
        # (top, left); windows [n, top, left, channels, height, width] are views, no copy.
        windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
        chosen = windows[np.arange(n), offsets[:, 0], offsets[:, 1]]
        return np.ascontiguousarray(np.moveaxis(chosen, 1, -1))


def agrees_with(
    fast: grain.MapDataset, reference: grain.MapDataset, indices: Sequence[int]
) -> bool:
    """Whether both graphs give the same batches at `indices` (grain may derive its seeds
    or draw its numbers otherwise in another version: then the pipeline keeps grain's)."""
    for index in indices:
        a, b = fast[index], reference[index]
        if a.keys() != b.keys():
            return False
        if any(not np.array_equal(a[k], b[k]) or a[k].dtype != b[k].dtype for k in a):
            return False
    return True

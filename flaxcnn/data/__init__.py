"""Data for flaxcnn: TFDS data sets read without TensorFlow, and grain pipelines on the host.

Three kinds of data set, one interface::

    from flaxcnn import data
    ds = data.load("digits")            # embedded: scikit-learn's 8x8 digits, offline
    ds = data.load("cifar10")           # a TFDS name, read through tfds.data_source
    ds = data.load("folder:/my/images") # one subdirectory of PNG/JPEG images per class

``load(name, *, data_dir=None, skip_corrupt=False)`` prepares data where needed, once, as
array_record in ``data_dir`` (default :func:`default_data_dir`: ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``). A TFDS set that is not prepared and cannot be prepared here
(tfds needs TensorFlow and a network to prepare) raises :class:`DatasetNotPrepared`, whose
message says in one line how to prepare it; other problems raise ``ValueError`` with one
line. ``ds.info`` is a :class:`DatasetInfo` (classes, stored image shape, split sizes,
per-channel mean/std on the 0..1 scale, whether horizontal flips keep labels); ``ds.train``
and ``ds.test`` are random-access sources of ``{"image": uint8 HxWxC, "label": int}``, and
``ds.val`` too where the set has a validation split of its own (TFDS ``validation`` beside
``test``, a folder's ``val/``). :func:`hold_out` gives one to a set without: a fixed share
of its training split.

:class:`TrainPipeline` turns a data set into endless training batches for this process
(``float32 [global_batch // process_count, S, S, C]`` images, normalised, ``int32`` labels),
reshuffled each epoch, each example at most once per epoch, resumable through
``it.get_state()`` / ``it.set_state(state)``. :func:`eval_batches` covers a split exactly
once in padded batches with a boolean ``mask``. Everything runs on the host in numpy;
``python -m flaxcnn.data.bench`` measures the throughput.
"""

from flaxcnn.data.dataset import Dataset, DatasetInfo, DatasetNotPrepared, hold_out
from flaxcnn.data.loading import flips_keep_labels, load
from flaxcnn.data.pipeline import EvalBatches, TrainIterator, TrainPipeline, eval_batches
from flaxcnn.data.storage import default_data_dir

__all__ = [
    "Dataset",
    "DatasetInfo",
    "DatasetNotPrepared",
    "EvalBatches",
    "TrainIterator",
    "TrainPipeline",
    "default_data_dir",
    "eval_batches",
    "flips_keep_labels",
    "hold_out",
    "load",
]

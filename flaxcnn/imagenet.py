"""ImageNet-1k's classes and the input torchvision's pretrained weights expect.

`imagenet_classes.tsv` lists the 1000 classes in the order of the weights' logits: the
sorted WordNet ids (the label names of TFDS's `imagenet2012`, so a converted checkpoint can
be evaluated on it) with torchvision's short English names (what `flaxcnn.predict` shows).
"""

from __future__ import annotations

import functools
from importlib import resources

DATASET = "imagenet2012"  # the TFDS name whose labels are these classes, in this order
# torchvision's ImageNet weights: resize the shorter side to 256, centre-crop 224, then
# normalise each channel with these (on the 0..1 scale).
RESIZE = 256
CROP = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@functools.cache
def _table() -> tuple[tuple[str, str], ...]:
    text = resources.files("flaxcnn").joinpath("imagenet_classes.tsv").read_text()
    rows = tuple(tuple(line.split("\t")) for line in text.splitlines() if line)
    if len(rows) != 1000:
        raise RuntimeError(f"imagenet_classes.tsv has {len(rows)} classes, not 1000")
    return rows


def wordnet_ids() -> list[str]:
    """The 1000 WordNet ids (n01440764, ...), in logit order."""
    return [wnid for wnid, _ in _table()]


def class_names() -> list[str]:
    """The 1000 English names (tench, goldfish, ...), in logit order."""
    return [name for _, name in _table()]


def preprocessing() -> dict:
    """How images reach the network, as checkpoint metadata records it."""
    return {"resize": RESIZE, "crop": CROP, "mean": list(MEAN), "std": list(STD)}

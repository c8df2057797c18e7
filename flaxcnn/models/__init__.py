"""The classic CNNs as Flax linen modules, built by name.

    >>> from flaxcnn import models
    >>> net = models.create("vgg16_bn", num_classes=10)
    >>> models.names()[:3]
    ['alexnet', 'googlenet', 'lenet5']

Every model takes NHWC input and an explicit `train` flag; BatchNorm statistics live in the
`batch_stats` collection and dropout draws from the `dropout` rng.
"""

# Importing a family registers its variants.
from flaxcnn.models import alexnet, inception, lenet, netresdeep, resnet, simple, vgg  # noqa: F401
from flaxcnn.models.registry import (
    SMALL_INPUT_MAX,
    ModelSpec,
    create,
    get_spec,
    names,
    options,
    register,
    resolve_input,
)

__all__ = [
    "SMALL_INPUT_MAX",
    "ModelSpec",
    "create",
    "get_spec",
    "names",
    "options",
    "register",
    "resolve_input",
]

"""`--freeze-backbone`: train only the classifier on top of weights from `--init-from`.

The loaded network is used as a fixed feature extractor, as in a linear probe: every layer
keeps its weights, BatchNorm normalises with the source's running statistics and keeps
them (the network runs in inference mode, so dropout is off too), and only the last dense
layer of each classifier head (`ModelSpec.classifier`) learns. The optimizer masks the
frozen parameters (`optax.multi_transform` with `set_to_zero`: no update, no weight decay,
no momentum kept for them), and the step stops their gradients, so the backward pass
never runs through the backbone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from flaxcnn import models
from flaxcnn.cli import UsageError
from flaxcnn.training.build import Network

TRAIN, FROZEN = "train", "frozen"


def trainable(network: Network, params: Any, fresh: list[str]) -> Any:
    """Which parameters of `network` (`params`: their shapes, as `Setup.shapes` holds them) a
    --freeze-backbone run trains: a tree of Python bools shaped like them, True only in the
    classifier. UsageError, before anything is written, when a frozen layer would not come
    from the source (`fresh`, from `warm_start.fresh_names`) or the options make no sense
    frozen."""
    if network.options.get("aux_logits"):
        raise UsageError(
            "--freeze-backbone runs the network in inference mode, where GoogLeNet's "
            "auxiliary classifiers are not used: leave out aux_logits=true"
        )
    spec = models.get_spec(network.arch)
    try:
        heads = head_layers(params, spec.classifier, network.num_classes)
    except ValueError as e:
        raise UsageError(f"--freeze-backbone: {e}") from None
    mask = trainable_mask(params, heads)
    check_loaded(mask, fresh)
    return mask


def head_layers(params: Mapping[str, Any], classifier: tuple[str, ...], num_classes: int) -> list:
    """Paths (tuples of module names) of the layers a frozen-backbone run trains.

    For each top-level module named in `classifier` that the network has (GoogLeNet's
    auxiliary heads exist only with aux_logits): the module itself when it is a dense layer,
    else its last dense layer in creation order. Each must end in `num_classes` outputs.
    """
    heads = []
    for name in classifier:
        if name not in params:
            continue
        path, module = (name,), params[name]
        if "kernel" not in module:
            dense = [key for key, sub in module.items() if "kernel" in sub]
            if not dense:
                raise ValueError(f"classifier module {name!r} has no dense layer")
            path, module = (name, dense[-1]), module[dense[-1]]
        outputs = module["kernel"].shape[-1]
        if module["kernel"].ndim != 2 or outputs != num_classes:
            raise ValueError(
                f"{'/'.join(path)} is not a classifier layer: kernel {module['kernel'].shape}, "
                f"{num_classes} classes"
            )
        heads.append(path)
    if not heads:
        raise ValueError(f"no classifier among {classifier}")
    return heads


def trainable_mask(params: Any, heads: list) -> Any:
    """A tree of Python bools shaped like `params`: True for the leaves under a head."""

    def trainable(path, _):
        names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        return any(names[: len(h)] == tuple(h) for h in heads)

    return jax.tree_util.tree_map_with_path(trainable, params)


def mask_optimizer(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, zero updates (and no state) on the others."""
    labels = jax.tree.map(lambda m: TRAIN if m else FROZEN, mask)
    return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)


def check_loaded(mask: Any, replaced: list[str]) -> None:
    """UsageError when a layer that would stay frozen was not loaded from the source (it
    would keep its random initialisation): a stem of another size (the small-input stem)."""
    flat_mask = {
        jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    frozen_fresh = [name for name in replaced if name in flat_mask and not flat_mask[name]]
    if frozen_fresh:
        shown = ", ".join(_readable(n) for n in frozen_fresh[:3])
        more = f" and {len(frozen_fresh) - 3} more" if len(frozen_fresh) > 3 else ""
        raise UsageError(
            f"--freeze-backbone: {shown}{more} cannot come from --init-from (another shape) "
            "and would stay random; train at the source's input size (e.g. --image-size 224 "
            "for ImageNet weights, which keeps the ImageNet stem) or without --freeze-backbone"
        )


def _readable(keystr: str) -> str:
    """ "['params']['conv1']['kernel']"-style paths as conv1/kernel."""
    return "/".join(part.strip("'\"") for part in keystr.strip("[]").split("]["))

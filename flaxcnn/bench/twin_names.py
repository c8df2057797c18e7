"""Which networks `--reference torch` has a PyTorch twin for, without importing torch.

Kept apart from `torch_twins` so that an architecture, option or input without a twin is
refused before torch is imported (several seconds), as every other bad argument is."""

from __future__ import annotations

from flaxcnn import cli
from flaxcnn.models.resnet import CIFAR_DEPTHS
from flaxcnn.training.build import Network

TORCHVISION = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "alexnet", "googlenet",
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
)  # fmt: skip
CIFAR = {f"{kind}{d}": d for d in CIFAR_DEPTHS for kind in ("resnet", "plain")}
OPTIONS = {f"resnet{d}": {"small_stem"} for d in (18, 34, 50, 101, 152)}  # others: none


def supported() -> list[str]:
    return sorted([*TORCHVISION, *CIFAR, "lenet5"])


def check_supported(network: Network) -> None:
    """Refuse an architecture, option or input without a PyTorch twin (`cli.UsageError`)."""
    arch = network.arch
    if arch not in supported():
        raise cli.UsageError(
            f"--reference torch: no PyTorch twin of {arch}; twins exist for "
            f"{', '.join(supported())}"
        )
    unknown = sorted(k for k, v in network.options.items() if v and k not in OPTIONS.get(arch, ()))
    if unknown:
        raise cli.UsageError(f"--reference torch: the PyTorch {arch} has no {', '.join(unknown)}")
    if arch in TORCHVISION and network.in_channels != 3:
        raise cli.UsageError(f"--reference torch: torchvision's {arch} takes 3 channels")

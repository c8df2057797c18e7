"""The memory estimate refuses configurations that cannot fit, quickly and in one line."""

import dataclasses
import time

import pytest

from flaxcnn.cli import UsageError
from flaxcnn.models import summary
from flaxcnn.training import memory
from flaxcnn.training.build import Network

RESNET20 = Network(arch="resnet20", num_classes=10, image_size=32, in_channels=3)


def test_huge_images_are_refused_in_one_line_quickly():
    network = Network(
        arch="resnet18",
        num_classes=10,
        image_size=100000,
        in_channels=3,
        options={"small_stem": False},
    )
    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        memory.check_fits(network, 128, "sgd")
    assert time.perf_counter() - start < 30  # abstract evaluation: nothing allocated
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("resnet18 at 100000x100000 with 128 images per device")
    for part in ("GiB", "parameters", "optimizer", "gradients", "activations", "--image-size"):
        assert part in message


def test_small_network_fits_and_counts_its_parameters():
    needed = memory.check_fits(RESNET20, 128, "sgd")
    params = summary.count_params(RESNET20.create(), RESNET20.input_shape())
    assert needed.params == 4 * params
    assert needed.gradients == needed.params == needed.optimizer
    assert needed.activations > 0
    assert needed.total == needed.params + needed.optimizer + needed.gradients + needed.activations
    assert memory.estimate(RESNET20, 128, "sgd", params=params) == needed


def test_adamw_keeps_twice_the_slots_of_sgd():
    sgd = memory.estimate(RESNET20, 8, "sgd")
    adamw = memory.estimate(RESNET20, 8, "adamw")
    assert adamw.optimizer == 2 * sgd.optimizer
    assert adamw.params == sgd.params and adamw.activations == sgd.activations


def test_bfloat16_activations_are_half_float32():
    bf16 = memory.estimate(dataclasses.replace(RESNET20, dtype="bfloat16"), 8, "sgd")
    f32 = memory.estimate(RESNET20, 8, "sgd")
    assert 2 * bf16.activations == f32.activations
    assert bf16.params == f32.params


def test_activations_scale_with_the_batch_and_ignore_scanning():
    one = memory.estimate(RESNET20, 1, "sgd")
    assert memory.estimate(RESNET20, 16, "sgd").activations == 16 * one.activations
    scanned = dataclasses.replace(RESNET20, options={"scan_blocks": True})
    assert memory.estimate(scanned, 1, "sgd") == one


def test_available_bytes_is_positive():
    size, description = memory.available_bytes()
    assert size > 0
    assert description and "\n" not in description


def test_sizes_read_like_a_person_wrote_them():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(45 * 2**20) == "45.0 MiB"
    assert memory.format_bytes(int(23.4 * 2**30)) == "23.4 GiB"
    assert memory.format_bytes(12_000 * 2**30) == "1.2e+04 GiB"

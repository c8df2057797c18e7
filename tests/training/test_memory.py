"""The memory estimate refuses configurations that cannot fit, quickly and in one line,
holds close to measured peaks, and compares with the memory available now."""

import dataclasses
import time

import pytest

from flaxcnn import models
from flaxcnn.cli import UsageError
from flaxcnn.models import summary
from flaxcnn.training import memory
from flaxcnn.training.build import Network

MIB = 2**20
RESNET20 = Network(arch="resnet20", num_classes=10, image_size=32, in_channels=3)


def network(arch: str, size: int) -> Network:
    """As the trainer and the benchmark build it (a small stem at small sizes)."""
    spec = models.get_spec(arch)
    size, options = models.resolve_input(spec, spec.input_size, size)
    return Network(arch, 10, size, spec.in_channels, options=options)


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
    assert time.perf_counter() - start < 30  # abstract traces: nothing allocated
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("resnet18 at 100000x100000 with 128 images per device")
    for part in ("GiB", "parameters", "optimizer", "gradients", "activations", "--image-size"):
        assert part in message
    assert "available to this" in message


# Peaks measured with `python -m flaxcnn.bench.memory` (MiB; the README's table): the
# estimate stays within [0.8, 1.5] of them. The old estimate (2.3 GiB for VGG-11 at 224,
# 0.92 GiB for ResNet-18 at 128) fell far below.
MEASURED_PEAKS_MIB = [
    ("vgg11", 224, 16, 5323),
    ("resnet18", 128, 64, 1325),
    ("lenet5", 32, 1024, 338),
]


@pytest.mark.parametrize(("arch", "size", "batch", "peak"), MEASURED_PEAKS_MIB)
def test_the_estimate_is_near_the_measured_peak(arch, size, batch, peak):
    needed = memory.estimate(network(arch, size), batch, "sgd", platform="cpu", devices=1)
    assert 0.8 <= needed.total / (peak * MIB) <= 1.5


def test_small_network_counts_its_parameters_and_state():
    needed = memory.estimate(RESNET20, 128, "sgd", platform="cpu", devices=1)
    params = summary.count_params(RESNET20.create(), RESNET20.input_shape())
    assert needed.params == 4 * params
    assert needed.gradients == needed.params == needed.optimizer
    # The trainer's initial state and the step's output (pmap does not donate on the CPU).
    assert needed.copies == 2 * (needed.params + needed.optimizer)
    assert needed.activations > 0 and needed.overhead > 0
    parts = ("params", "optimizer", "gradients", "activations", "copies", "overhead")
    assert needed.total == sum(getattr(needed, part) for part in parts)
    again = memory.estimate(RESNET20, 128, "sgd", params=params, platform="cpu", devices=1)
    assert again == needed


def test_state_copies_follow_donation_and_devices():
    def copies(**kwargs):
        return memory.estimate(RESNET20, 8, "sgd", **kwargs).copies

    state = 8 * summary.count_params(RESNET20.create(), RESNET20.input_shape())
    assert copies(platform="cpu", devices=1) == 2 * state
    assert copies(platform="cpu", devices=1, strategy="shard_map") == state  # donated
    assert copies(platform="gpu") == state  # pmap donates off the CPU
    # Four CPU devices share the process's one initial state; each has its step output.
    assert copies(platform="cpu", devices=4) == state // 4 + state


def test_compiler_memory_counts_on_the_cpu_only():
    cpu = memory.estimate(RESNET20, 8, "sgd", platform="cpu", devices=1)
    shared = memory.estimate(RESNET20, 8, "sgd", platform="cpu", devices=4)
    gpu = memory.estimate(RESNET20, 8, "sgd", platform="gpu")
    assert cpu.overhead >= memory.CPU_OVERHEAD_BYTES
    assert shared.overhead == pytest.approx(cpu.overhead / 4, abs=1)
    assert gpu.overhead == 0


def test_adamw_keeps_twice_the_slots_of_sgd():
    sgd = memory.estimate(RESNET20, 8, "sgd")
    adamw = memory.estimate(RESNET20, 8, "adamw")
    assert adamw.optimizer == 2 * sgd.optimizer
    assert adamw.params == sgd.params and adamw.activations == sgd.activations


def test_bfloat16_activations_are_smaller_only_off_the_cpu():
    bf16 = dataclasses.replace(RESNET20, dtype="bfloat16")
    # XLA:CPU computes bfloat16 convolutions in float32: measured, no smaller there.
    cpu = [memory.estimate(n, 8, "sgd", platform="cpu").activations for n in (bf16, RESNET20)]
    assert cpu[0] == cpu[1]
    gpu = [memory.estimate(n, 8, "sgd", platform="gpu").activations for n in (bf16, RESNET20)]
    assert gpu[1] / 2 <= gpu[0] < gpu[1]  # BatchNorm's statistics stay float32


def test_activations_scale_with_the_batch_and_ignore_scanning():
    one = memory.estimate(RESNET20, 1, "sgd")
    assert memory.estimate(RESNET20, 16, "sgd").activations == 16 * one.activations
    scanned = dataclasses.replace(RESNET20, options={"scan_blocks": True})
    assert memory.estimate(scanned, 1, "sgd") == one


def test_activations_grow_with_the_image_area():
    small, large = (memory.estimate(network("vgg11", s), 1, "sgd") for s in (64, 224))
    assert large.activations > 10 * small.activations  # 12x the pixels
    assert large.params == small.params  # VGG pools to 7x7 before its classifier


def test_unknown_strategy_or_optimizer_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        memory.estimate(RESNET20, 8, "sgd", strategy="tpu_magic")
    with pytest.raises(ValueError, match="optimizer"):
        memory.estimate(RESNET20, 8, "lion")


def test_meminfo_available_is_read_in_bytes(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       65536000 kB\nMemFree:         1000 kB\nMemAvailable:    2048000 kB\n"
    )
    assert memory.meminfo_available(meminfo) == 2048000 * 1024
    meminfo.write_text("MemTotal:       65536000 kB\n")  # kernels before 3.14
    assert memory.meminfo_available(meminfo) is None
    assert memory.meminfo_available(tmp_path / "missing") is None


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_headroom_is_the_least_of_the_groups_above(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "0::/outer/inner\n")
    # inner: 8 GiB limit, 3 GiB used of which 1 GiB is reclaimable file cache -> 6 GiB.
    write(root / "outer/inner/memory.max", f"{8 * 2**30}\n")
    write(root / "outer/inner/memory.current", f"{3 * 2**30}\n")
    write(root / "outer/inner/memory.stat", f"anon 1\ninactive_file {2**30}\n")
    write(root / "outer/memory.max", "max\n")
    write(root / "outer/memory.current", "5\n")
    assert memory.cgroup_available(root, proc) == 6 * 2**30
    # outer: 5 GiB limit, 4.5 GiB used -> 0.5 GiB, less than inner's.
    write(root / "outer/memory.max", f"{5 * 2**30}\n")
    write(root / "outer/memory.current", f"{9 * 2**29}\n")
    assert memory.cgroup_available(root, proc) == 2**29


def test_cgroup_without_a_limit_gives_none(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "0::/\n")
    write(root / "memory.max", "max\n")
    write(root / "memory.current", "123\n")
    assert memory.cgroup_available(root, proc) is None
    assert memory.cgroup_available(tmp_path / "none", tmp_path / "none") is None


def test_cgroup_v1_limit_less_usage(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    write(proc, "4:memory:/\n3:cpu,cpuacct:/\n")
    write(root / "memory/memory.limit_in_bytes", f"{2**63 - 4096}\n")  # no limit
    write(root / "memory/memory.usage_in_bytes", "1000\n")
    assert memory.cgroup_available(root, proc) is None
    write(root / "memory/memory.limit_in_bytes", f"{4 * 2**30}\n")
    write(root / "memory/memory.usage_in_bytes", f"{2**30}\n")
    assert memory.cgroup_available(root, proc) == 3 * 2**30


def test_the_check_compares_with_available_memory_not_ram(monkeypatch):
    # Whatever the RAM, 1 GiB available refuses VGG-11 at 224 (about 5 GiB).
    monkeypatch.setattr(memory, "meminfo_available", lambda: 2**30)
    monkeypatch.setattr(memory, "cgroup_available", lambda: None)
    limit, device = memory.available_bytes()
    assert device.startswith("cpu device") and "MemAvailable" in device
    with pytest.raises(UsageError) as info:
        memory.check_fits(network("vgg11", 224), 16 // memory.jax.local_device_count(), "sgd")
    message = str(info.value)
    assert f"more than the {memory.format_bytes(limit)} available to this cpu device" in message
    assert "MemAvailable" in message and "\n" not in message


def test_a_container_limit_below_memavailable_wins(monkeypatch):
    monkeypatch.setattr(memory, "meminfo_available", lambda: 8 * 2**30)
    monkeypatch.setattr(memory, "cgroup_available", lambda: 2**30)
    assert memory.host_available() == (2**30, "container limit less its usage")
    monkeypatch.setattr(memory, "cgroup_available", lambda: None)
    assert memory.host_available() == (8 * 2**30, "MemAvailable")


def test_available_bytes_is_positive():
    size, description = memory.available_bytes()
    assert size > 0
    assert description and "\n" not in description


def test_sizes_read_like_a_person_wrote_them():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(45 * 2**20) == "45.0 MiB"
    assert memory.format_bytes(int(23.4 * 2**30)) == "23.4 GiB"
    assert memory.format_bytes(12_000 * 2**30) == "1.2e+04 GiB"

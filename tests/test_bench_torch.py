"""`flaxcnn.bench --reference torch`: the twins are ours in PyTorch, the ratios are reported.

Skipped where torch or torchvision is missing (the `torch` extra); the refusal without
them is tested in test_bench.py. No speed is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
pytest.importorskip("torchvision", reason="the torch extra is not installed")

from flaxcnn import cli  # noqa: E402
from flaxcnn.bench import command, planning, timing, torch_twins  # noqa: E402

RATIO_KEYS = (
    "torch_train_images_per_sec",
    "torch_eval_images_per_sec",
    "train_ratio_to_torch",
    "eval_ratio_to_torch",
)


@pytest.mark.parametrize(
    "arch, image_size",
    [("resnet18", 32), ("resnet20", 32), ("lenet5", 32), ("lenet5", 28), ("plain20", 32)],
)
def test_twin_has_our_parameter_count(arch, image_size):
    p = planning.plan(arch, image_size=image_size)
    model = torch_twins.build(p.network)
    assert torch_twins.count_params(model) == p.params
    images = torch.zeros(2, p.network.in_channels, image_size, image_size)
    assert model(images).shape == (2, 10)


def test_small_stem_is_ours():
    """ResNet-18 at 32x32 takes the 3x3 stride-1 stem without max-pool, as ours does."""
    network = planning.plan("resnet18", image_size=32).network
    assert network.options == {"small_stem": True}
    model = torch_twins.build(network)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_zero_padding_shortcut():
    """Option A: where the shape changes, the input subsampled, new channels zero."""
    block = torch_twins.CifarBlock(16, 32, stride=2, shortcut=True)
    for conv in (block.conv1, block.conv2):
        torch.nn.init.zeros_(conv.weight)  # the residual branch is 0 (+ BatchNorm's 0 shift)
    x = torch.rand(2, 16, 8, 8)
    y = block.eval()(x)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()
    assert torch_twins.count_params(block) == 9 * 16 * 32 + 9 * 32 * 32 + 2 * 2 * 32


def test_optimizer_is_the_trainers():
    p = planning.plan("resnet20", batch_size=64)
    settings = planning.optimizer_settings(64, total_steps=10)
    model = torch_twins.build(p.network)
    opt = torch_twins.make_optimizer(model, settings.peak_lr, settings.weight_decay, 0.9)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(t.ndim > 1 for t in decayed["params"]) and all(t.ndim == 1 for t in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    for group in opt.param_groups:
        assert group["nesterov"] and group["momentum"] == 0.9
        assert group["lr"] == pytest.approx(0.1 * 64 / 256)


def test_tiny_run_reports_the_ratios():
    result = timing.benchmark(
        "lenet5", image_size=32, batch_size=8, steps=1, reference="torch", repeats=2
    )
    for key in RATIO_KEYS:
        assert np.isfinite(result[key]) and result[key] > 0, key
    assert result["reference"] == "torch"
    twin = result["torch"]
    assert twin["params"] == result["params"] and twin["threads"] == torch.get_num_threads()
    assert twin["device"] == "cpu" and twin["autocast"] is None
    assert len(twin["runs"]) == len(result["runs"]) == 2
    assert result["train_ratio_to_torch"] == pytest.approx(
        result["train_images_per_sec"] / result["torch_train_images_per_sec"]
    )
    assert np.isfinite(twin["runs"][-1]["train_loss"])


def test_bfloat16_is_autocast():
    p = planning.plan("lenet5", batch_size=4, steps=1, dtype="bfloat16")
    settings = planning.optimizer_settings(4, total_steps=10)
    twin = torch_twins.TorchSteps(p.network, p.params, planning.synthetic_batch(p), 1, settings)
    twin.warm_up()
    run = twin.timed_run()
    assert np.isfinite(run["train_loss"]) and twin.info()["autocast"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in twin.model.parameters())


def test_cli_alternates_three_runs_by_default(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--arch", "lenet5", "--image-size", "32", "--batch-size", "8", "--steps", "1"]
    command.main([*argv, "--reference", "torch", "--json", str(path)])
    out = capsys.readouterr().out.splitlines()
    assert "median of 3 runs" in out[0]
    assert "torch img/s" in out[1] and out[1].count("ours/torch") == 2
    assert any(line.startswith("torch ") and " threads" in line for line in out)
    saved = json.loads(path.read_text())
    assert saved["settings"]["repeats"] == 3 and saved["settings"]["reference"] == "torch"
    (result,) = saved["results"]
    assert len(result["runs"]) == len(result["torch"]["runs"]) == 3
    assert all(result[key] > 0 for key in RATIO_KEYS)


@pytest.mark.parametrize("arch", ["simple_cnn", "netresdeep"])
def test_no_twin_is_refused(arch):
    with pytest.raises(cli.UsageError, match=f"no PyTorch twin of {arch}"):
        timing.benchmark(arch, reference="torch")


def test_a_different_parameter_count_is_refused():
    p = planning.plan("resnet20")
    with pytest.raises(cli.UsageError, match="269,722 trainable parameters, ours 269,723"):
        torch_twins.check_twin(p.network, p.params + 1)


@pytest.mark.slow  # a process that imports torch and jax; in-process: test_no_twin_is_refused
def test_no_twin_exits_2_in_one_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flaxcnn.bench",
            "--arch",
            "lenet5,simple_cnn",
            "--reference",
            "torch",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: --reference torch: no PyTorch twin of simple_cnn")

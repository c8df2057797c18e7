"""`flaxcnn.bench`: the numbers are there and sane, the JSON is written, bad input is refused.

The speeds themselves are not asserted: they are what the benchmark is for. LeNet-5 at
32x32 with a batch of 8 over the four test devices compiles in seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import pytest

from flaxcnn import bench, cli

LENET5_PARAMS = 61_706  # LeCun et al. 1998 with 10 outputs
LENET5_MACS = 416_520  # 28*28*6*25 + 10*10*16*150 + 120*400 + 84*120 + 10*84
TIMES = ("init_sec", "train_compile_sec", "train_step_ms", "eval_compile_sec")
RATES = ("train_images_per_sec", "eval_images_per_sec")


@pytest.fixture(scope="module")
def lenet5() -> dict:
    return bench.benchmark("lenet5", image_size=32, batch_size=8, steps=2)


def test_benchmark_numbers(lenet5):
    for key in (*TIMES, *RATES):
        assert math.isfinite(lenet5[key]) and lenet5[key] > 0, key
    assert math.isfinite(lenet5["train_loss"])
    assert lenet5["params"] == LENET5_PARAMS
    assert lenet5["macs_per_image"] == LENET5_MACS
    assert lenet5["gmacs_per_image"] == pytest.approx(LENET5_MACS / 1e9)
    assert lenet5["device_count"] == jax.device_count() == 4
    assert lenet5["per_device_batch"] == 2
    assert lenet5["jax_version"] == jax.__version__
    assert lenet5["device_kind"] and lenet5["model_options"] == {}


def test_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--arch", "lenet5", "--image-size", "32", "--batch-size", "8", "--steps", "2"]
    argv += ["--parallel", "shard_map", "--json", str(path)]
    bench.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("flaxcnn.bench: jax ") and "shard_map" in out[0]
    assert out[1].split()[:2] == ["arch", "input"]
    assert out[2].split()[:3] == ["lenet5", "32x32x1", "61,706"]
    saved = json.loads(path.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # no temp file left
    assert saved["device_count"] == 4 and saved["jax_version"] == jax.__version__
    assert saved["settings"]["batch_size"] == 8
    (result,) = saved["results"]
    assert result["parallel"] == "shard_map" and result["params"] == LENET5_PARAMS
    assert all(result[k] > 0 for k in (*TIMES, *RATES))


def test_input_size_follows_the_trainer():
    """Design size by default; a small image on a large design takes the small stem."""
    assert bench.plan("resnet34").network.image_size == 224
    assert bench.plan("resnet34").network.options == {}
    small = bench.plan("resnet34", image_size=8).network
    assert (small.image_size, small.options) == (8, {"small_stem": True})
    assert bench.plan("resnet20").network.image_size == 32
    assert bench.plan("lenet5", num_classes=100).params > LENET5_PARAMS


def test_arch_lists():
    assert bench.parse_archs(None) == list(bench.DEFAULT_ARCHS)
    assert bench.parse_archs(["lenet5, resnet20", "lenet5", "resnet34"]) == [
        "lenet5",
        "resnet20",
        "resnet34",
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arch": "resnet"}, "unknown architecture 'resnet'"),
        ({"arch": "lenet5", "batch_size": 6}, "does not divide evenly over 4 devices"),
        ({"arch": "lenet5", "image_size": 8}, "at least 16"),
        ({"arch": "lenet5", "steps": 0}, "--steps must be a positive integer"),
        ({"arch": "lenet5", "dtype": "float16"}, "unknown dtype"),
    ],
)
def test_bad_arguments_raise_usage_error(kwargs, message):
    with pytest.raises(cli.UsageError, match=message):
        bench.plan(**kwargs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "lenet5,resnt20"], "unknown architecture 'resnt20'. Did you mean resnet20"),
        (["--arch", "lenet5", "--image-size", "8"], "lenet5 needs --image-size of at least 16"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "flaxcnn.bench", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert message in proc.stderr

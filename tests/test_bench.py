"""`flaxcnn.bench`: the numbers are there and sane, the JSON is written, bad input is refused.

The speeds themselves are not asserted: they are what the benchmark is for. LeNet-5 at
32x32 with a batch of 8 over the four test devices compiles in seconds. The PyTorch
reference has its own tests (test_bench_torch.py), skipped where torch is missing. The
package's modules import each other without a cycle (checked on their source).
"""

from __future__ import annotations

import ast
import graphlib
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import pytest

from flaxcnn import bench, cli
from flaxcnn.bench import command, planning, timing

LENET5_PARAMS = 61_706  # LeCun et al. 1998 with 10 outputs
LENET5_MACS = 416_520  # 28*28*6*25 + 10*10*16*150 + 120*400 + 84*120 + 10*84
TIMES = ("init_sec", "train_compile_sec", "train_step_ms", "eval_compile_sec")
RATES = ("train_images_per_sec", "eval_images_per_sec")
FLOPS = (
    "train_flops_per_step",
    "eval_flops_per_step",
    "train_flops_per_sec",
    "eval_flops_per_sec",
    "peak_flops_per_sec",
    "train_utilisation",
    "eval_utilisation",
)
# A subprocess in which torch and torchvision do not import, as where they are not installed.
WITHOUT_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTorch())
from flaxcnn.bench import command
command.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def lenet5() -> dict:
    return timing.benchmark("lenet5", image_size=32, batch_size=8, steps=2)


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


def test_flops_from_xla_are_global_and_per_step(lenet5):
    """XLA's count is one device's program: times the 4 devices it is the whole batch's.

    Forward: 2 FLOPs per multiply-add of the batch (LeNet-5 has no padding to leave out),
    plus the element-wise work; a train step adds the backward pass, about twice that.
    """
    for key in FLOPS:
        assert math.isfinite(lenet5[key]) and lenet5[key] > 0, key
    for step in ("train", "eval"):
        per_device = lenet5[f"{step}_flops_per_step_per_device"]
        assert lenet5[f"{step}_flops_per_step"] == 4 * per_device
    forward = 2 * LENET5_MACS * lenet5["batch_size"]
    assert 1.0 <= lenet5["eval_flops_per_step"] / forward < 1.3
    assert 2.5 < lenet5["train_flops_per_step"] / lenet5["eval_flops_per_step"] < 4.0
    step_sec = lenet5["train_step_ms"] / 1e3
    assert lenet5["train_flops_per_sec"] == pytest.approx(lenet5["train_flops_per_step"] / step_sec)
    assert lenet5["train_utilisation"] == pytest.approx(
        lenet5["train_flops_per_sec"] / lenet5["peak_flops_per_sec"]
    )
    assert "XLA cost_analysis" in lenet5["flops_source"]


def test_peak_is_a_matrix_product_on_every_device(lenet5):
    peak = lenet5["peak"]
    assert peak["dtype"] == "float32" and peak["devices"] == 4
    n = peak["matrix_size"]
    assert n >= 1024 and peak["flops_per_call"] == 2 * n**3 * 4
    assert peak["call_sec_median"] == statistics.median(peak["call_sec"])
    assert peak["call_sec_median"] >= 0.01 or n == 16384  # well above a call's fixed costs
    assert lenet5["peak_flops_per_sec"] == peak["flops_per_sec"]
    assert peak["flops_per_sec"] == pytest.approx(peak["flops_per_call"] / peak["call_sec_median"])
    assert "jnp.matmul" in peak["method"] and "median of 5 calls" in peak["method"]


def test_repeats_report_the_median_run():
    result = timing.benchmark("lenet5", image_size=32, batch_size=8, steps=1, repeats=3)
    runs = result["runs"]
    assert result["repeats"] == len(runs) == 3
    median = statistics.median(r["train_sec"] for r in runs)
    assert result["train_images_per_sec"] == pytest.approx(8 / median)
    assert result["train_step_ms"] == pytest.approx(1e3 * median)
    assert all(r["train_images_per_sec"] > 0 and r["eval_images_per_sec"] > 0 for r in runs)
    assert "reference" not in result and "loop" not in result


def test_cli_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--arch", "lenet5", "--image-size", "32", "--batch-size", "8", "--steps", "2"]
    argv += ["--parallel", "shard_map", "--json", str(path)]
    command.main(argv)
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
    assert all(result[k] > 0 for k in (*TIMES, *RATES, *FLOPS))
    assert saved["peak"]["flops_per_sec"] == result["peak_flops_per_sec"]
    assert saved["settings"]["repeats"] == 1 and saved["settings"]["reference"] is None
    header = out[1].split()
    assert header.count("util") == 2 and any(h.endswith("FLOP/s") for h in header)
    assert any(line.startswith("FLOP/s: XLA's FLOPs per compiled step") for line in out[3:])


def test_input_size_follows_the_trainer():
    """Design size by default; a small image on a large design takes the small stem."""
    assert planning.plan("resnet34").network.image_size == 224
    assert planning.plan("resnet34").network.options == {}
    small = planning.plan("resnet34", image_size=8).network
    assert (small.image_size, small.options) == (8, {"small_stem": True})
    assert planning.plan("resnet20").network.image_size == 32
    assert planning.plan("lenet5", num_classes=100).params > LENET5_PARAMS


def test_arch_lists():
    assert command.parse_archs(None) == list(command.DEFAULT_ARCHS)
    assert command.parse_archs(["lenet5, resnet20", "lenet5", "resnet34"]) == [
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
        planning.plan(**kwargs)


@pytest.mark.slow  # trains two epochs of the digits
def test_loop_against_the_step(tmp_path, monkeypatch):
    """The trainer's loop on the digits at the step's network and batch; nothing left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = timing.benchmark("lenet5", batch_size=64, steps=2, loop=True, loop_epochs=2)
    loop = result["loop"]
    assert list(tmp_path.iterdir()) == []
    assert (loop["batch_size"], loop["image_size"]) == (result["batch_size"], 32) == (64, 32)
    assert loop["dataset"] == "digits" and loop["steps_per_epoch"] == (1437 - 144) // 64
    assert len(loop["epoch_images_per_sec"]) == 2 and loop["timed_epochs"] == 1
    assert result["loop_images_per_sec"] == loop["epoch_images_per_sec"][1] > 0
    assert result["loop_ratio_to_step"] == pytest.approx(
        result["loop_images_per_sec"] / result["train_images_per_sec"]
    )


def test_loop_takes_the_digits_input_size(tmp_path):
    """The trainer's 8x8 digits give ImageNet ResNets their small stem at 8x8, LeNet 32x32."""
    settings = {"batch_size": 128, "steps": 1, "image_size": None, "num_classes": 10}
    p, setup = planning.prepare_job("resnet18", settings, loop_root=tmp_path)
    assert (p.network.image_size, p.network.options) == (8, {"small_stem": True})
    assert setup.network == p.network and setup.batch_size == p.batch_size == 128
    p, _ = planning.prepare_job("lenet5", settings, loop_root=tmp_path)
    assert p.network.image_size == 32


def test_reference_without_torch_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(cli.UsageError, match=r"pip install 'flaxcnn\[torch\]'"):
        planning.reference_module("torch")


# Run as `python -m flaxcnn.bench` in a process of their own: one case that stops before any
# data code and one that imports the data layer (--loop), so that nothing an import prints
# can slip past the one-line check. The others call the same `main` in this process.
IN_A_PROCESS = {"unknown architecture 'resnt20'. Did you mean resnet20", "larger than the training"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "lenet5,resnt20"], "unknown architecture 'resnt20'. Did you mean resnet20"),
        (["--arch", "lenet5", "--image-size", "8"], "lenet5 needs --image-size of at least 16"),
        (["--arch", "lenet5", "--repeats", "0"], "--repeats must be a positive integer, got 0"),
        (["--arch", "lenet5", "--reference", "jax"], "invalid choice: 'jax'"),
        (["--arch", "lenet5", "--loop-epochs", "3"], "--loop-epochs goes with --loop"),
        (["--arch", "lenet5", "--loop", "--loop-epochs", "1"], "--loop-epochs must be at least 2"),
        (["--arch", "lenet5", "--loop", "--num-classes", "5"], "digits, which has 10 classes"),
        (["--arch", "lenet5", "--loop", "--batch-size", "2048"], "larger than the training"),
        (["--arch", ","], "--arch ',' names no architecture"),
        (["--arch", "lenet5", "--image-size", "100000"], "lower --image-size or --batch-size"),
        (["--arch", "lenet5", "--json", "/nonexistent/b.json"], "/nonexistent does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    if message in IN_A_PROCESS:
        proc = subprocess.run(
            [sys.executable, "-m", "flaxcnn.bench", *argv], capture_output=True, text=True
        )
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        with pytest.raises(SystemExit) as exit_:
            command.main(argv)
        code = exit_.value.code
        stdout, stderr = capsys.readouterr()
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert message in stderr


def test_reference_without_torch_exits_2():
    argv = ["--arch", "lenet5", "--reference", "torch", "--steps", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {planning.TORCH_MISSING}\n"


def bench_imports() -> dict[str, set[str]]:
    """The modules of flaxcnn/bench, each with the ones it imports of them, at its top or in
    a function (a lazy import closes a circle as well)."""
    folder = Path(bench.__file__).parent
    names = {path.stem for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # from M import a: M.a, a module or a name
                base = ["flaxcnn", "bench"][: 3 - node.level] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                modules = [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for parts in (m.split(".") for m in modules):
                if parts[:2] == ["flaxcnn", "bench"]:  # the package itself, or one of its names
                    name = parts[2] if len(parts) > 2 else "__init__"
                    imported.add(name if name in names else "__init__")
        graph[path.stem] = imported
    return graph


def test_the_modules_import_each_other_without_a_cycle():
    """No circle (graphlib raises CycleError on one), only `python -m flaxcnn.bench` imports
    the command line, and each module imports only those its package docstring lists above."""
    graph = bench_imports()
    assert "torch_twins" in graph["planning"] and "loop" in graph["planning"]  # lazy ones too
    order = list(graphlib.TopologicalSorter(graph).static_order())
    assert set(order) == set(graph)
    with pytest.raises(graphlib.CycleError):  # the check would see the old circle
        list(graphlib.TopologicalSorter({**graph, "figures": {"timing"}}).static_order())
    assert [name for name, imported in graph.items() if "command" in imported] == ["__main__"]
    listed = re.findall(r"^    (\w+)\.py ", bench.__doc__, flags=re.MULTILINE)
    assert sorted(listed) == sorted(set(graph) - {"__init__", "__main__"})
    for i, name in enumerate(listed):
        assert graph[name] <= set(listed[:i]), name
    assert bench.benchmark is timing.benchmark


def test_a_network_without_a_twin_is_refused_before_torch_is_imported(monkeypatch):
    """`--arch lenet5,simple_cnn --reference torch` stops at simple_cnn's name, without the
    seconds of importing torch for lenet5's twin first."""

    def imported(name):
        raise AssertionError(f"{name}'s framework imported before every name was checked")

    monkeypatch.setattr(planning, "reference_module", imported)
    plans = [planning.plan("lenet5"), planning.plan("simple_cnn")]
    with pytest.raises(cli.UsageError, match="no PyTorch twin of simple_cnn; twins exist for "):
        planning.check_reference("torch", plans)

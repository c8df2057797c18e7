"""End-to-end training through the CLI: equivalences, exact resume, signals, bad input.

Runs are subprocesses so that each gets its own device count (XLA_FLAGS) and so that
`kill -9` and SIGTERM are real. Small BatchNorm networks at 8x8 (resnet20, and a stack of
two residual blocks where only BatchNorm and the random streams matter) keep every run to
seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxcnn import train as train_cli
from flaxcnn.training import metrics as metrics_io
from flaxcnn.training.rundir import RunDir

TIMING = ("images_per_sec",)
BASE = [
    "--arch", "resnet20", "--image-size", "8", "--batch-size", "32",
    "--seed", "3", "--no-progress", "--log-every", "5",
]  # fmt: skip


# Two residual blocks of conv -> BatchNorm -> ReLU: what device equivalence needs (statistics
# synchronised across devices), at a fraction of resnet20's compile time.
SMALL_BN_NET = ["--arch", "netresdeep", "--model-option", "n_blocks=2"]


def env_for(devices: int, digits_data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["TFDS_DATA_DIR"] = str(digits_data_dir)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def start(args, digits_data_dir, devices=1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flaxcnn.train", *args],
        env=env_for(devices, digits_data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(args, digits_data_dir, devices=1, timeout=300) -> subprocess.CompletedProcess:
    proc = start(args, digits_data_dir, devices)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train_ok(args, digits_data_dir, devices=1) -> subprocess.CompletedProcess:
    result = run(args, digits_data_dir, devices)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(workdir: Path, drop_timing: bool = True) -> list[dict]:
    rows = metrics_io.read(workdir)
    if drop_timing:
        rows = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return rows


def assert_same_training(a: Path, b: Path, counts: dict[str, int]) -> None:
    """Two runs of the same global batches on other device counts or strategies.

    What data parallelism promises is the same arithmetic up to the order of its sums, so
    losses, parameters and BatchNorm statistics are compared to a tolerance (see
    LOSS_RTOL); accuracies count thresholded decisions and may differ by one example (an
    example at a tie flips under any rounding).
    """
    ra, rb = records(a), records(b)
    assert [(r["split"], r["epoch"], r["step"]) for r in ra] == [
        (r["split"], r["epoch"], r["step"]) for r in rb
    ]
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=LOSS_RTOL, err_msg=str((x, y)))
        for key in x.keys() & {"accuracy", "top5_accuracy"}:
            assert abs(x[key] - y[key]) * counts[x["split"]] <= 1 + 1e-9, (key, x, y)
        if "lr" in x:
            assert x["lr"] == pytest.approx(y["lr"], rel=1e-6)
    step_a, _, va = RunDir(a).restore_variables()
    step_b, _, vb = RunDir(b).restore_variables()
    assert step_a == step_b
    leaves_a, leaves_b = named_leaves(va), named_leaves(vb)
    assert leaves_a.keys() == leaves_b.keys() and leaves_a
    for name, value in leaves_a.items():
        rtol, atol = TOLERANCES[name.split("'")[1]]  # "['params']['conv1']['kernel']"
        np.testing.assert_allclose(value, leaves_b[name], rtol=rtol, atol=atol, err_msg=name)


def named_leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# One step agrees to ~1e-7 (test_steps.py); an epoch of 20 steps amplifies the differences
# of the sums' order. Measured on a 2-core Xeon (2026-12-07; an epoch of 22 steps, before
# 144 training images became the validation split), 1 device against 4: losses
# 8.4e-8 relative, parameters 1.2e-7 and BatchNorm statistics 7.2e-7 absolute. With
# resnet20 (until 2026-12-07) the same epoch differed by 1.4e-5 (the test loss, jax 0.12.1),
# 2.2e-5 and 4.9e-4: the tolerances below hold for it too, and leave room for other CPUs'
# rounding. A fault moves the epoch's loss further: statistics of a quarter of the batch
# (BatchNorm not synchronised) by 5.3e-4, gradients summed instead of averaged by 2.3e-3,
# not averaged at all by 2.1e-2.
LOSS_RTOL = 1e-4
TOLERANCES = {"params": (1e-3, 1e-4), "batch_stats": (2e-3, 1e-4)}  # rtol, atol


@pytest.mark.slow
def test_one_device_four_devices_pmap_and_shard_map_agree(digits_data_dir, tmp_path):
    """Same global batch and seed: 1 device == 4 devices (pmap) == 4 devices (shard_map),
    in losses, parameters and BatchNorm statistics after an epoch (assert_same_training).
    The 2-block network learns at the default rate (test accuracy 0.34 after the epoch)
    while its runs differ by about 1e-7 (LOSS_RTOL). The 1-device run is a process of its
    own; the 4-device ones run here, on the test process's 4 CPU devices
    (tests/conftest.py), through the same command line."""
    args = [*BASE, *SMALL_BN_NET, "--epochs", "1", "--batch-size", "64"]
    one = start([*args, "--workdir", str(tmp_path / "one")], digits_data_dir, devices=1)
    assert jax.local_device_count() == 4
    data = ["--data-dir", str(digits_data_dir)]
    train_cli.main([*args, *data, "--workdir", str(tmp_path / "four")])
    train_cli.main([*args, *data, "--workdir", str(tmp_path / "smap"), "--parallel", "shard_map"])
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-3000:]
    assert [r["split"] for r in records(tmp_path / "one")] == ["train", "val", "test"]
    counts = {"train": 20 * 64, "val": 144, "test": 360}
    assert_same_training(tmp_path / "one", tmp_path / "four", counts)
    assert_same_training(tmp_path / "four", tmp_path / "smap", counts)
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    config = json.loads((tmp_path / "four" / "config.json").read_text())
    assert config["devices"] == 4 and config["batch_size"] == 64 and config["image_size"] == 8


# 20 steps an epoch: a checkpoint every 7 steps, and so a kill, falls in the middle of one.
# BatchNorm statistics, dropout's random stream and the data order all carry across it.
RESUMABLE = [
    *BASE, *SMALL_BN_NET, "--dropout", "0.1",
    "--batch-size", "64", "--epochs", "3", "--checkpoint-every", "7",
]  # fmt: skip


@pytest.fixture
def uninterrupted(digits_data_dir, once_per_run) -> dict:
    """The run uninterrupted, trained once per test run for every interrupted one and the
    same-seed check: {"records": its metrics without timings, "workdir": where it is}."""

    def make(directory: Path) -> dict:
        train_ok([*RESUMABLE, "--workdir", str(directory)], digits_data_dir)
        return {"records": records(directory), "workdir": str(directory)}

    return once_per_run("uninterrupted", make)


@pytest.mark.slow
def test_same_seed_same_metrics_and_outputs(digits_data_dir, tmp_path, uninterrupted):
    """A second run of the same command (seed, dropout, BatchNorm, data order) logs exactly
    what the shared uninterrupted run logged, and writes the same kinds of files."""
    train_ok([*RESUMABLE, "--workdir", str(tmp_path / "b")], digits_data_dir)
    assert records(tmp_path / "b") == uninterrupted["records"]
    first = Path(uninterrupted["workdir"])
    files = {p.name for p in first.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= files
    rows = records(first, drop_timing=False)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(r["images_per_sec"] > 0 and r["lr"] >= 0 for r in train_rows)
    assert [r["epoch"] for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # train, val, test
    events = list((first / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def finished_checkpoints(workdir: Path) -> list[int]:
    """Steps of the committed checkpoints (orbax renames a finished one to its step)."""
    return [
        int(p.name)
        for p in (workdir / "checkpoints").glob("*")
        if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()
    ]


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, min_step: int) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = finished_checkpoints(workdir)
        if steps and max(steps) >= min_step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_interrupted_run_resumes_to_identical_metrics(
    digits_data_dir, tmp_path, how, uninterrupted
):
    """Killed mid-epoch, resumed: the metrics equal an uninterrupted run's exactly."""
    args = RESUMABLE

    part = tmp_path / "part"
    proc = start([*args, "--workdir", str(part)], digits_data_dir)
    saved = wait_for_checkpoint(part, proc, min_step=7)
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if how == "kill -9":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "checkpoint saved. Resume with: python -m flaxcnn.train" in out
    total_steps = json.loads((part / "config.json").read_text())["total_steps"]
    interrupted_at = max(finished_checkpoints(part))  # a kill mid-save leaves a tmp dir
    assert saved <= interrupted_at < total_steps, "the run was not interrupted mid-way"

    if how == "SIGTERM":  # the command printed, as printed: the workdir is all it takes
        command = out.strip().splitlines()[-1].split("Resume with: ")[1]
        assert command == shlex.join(["python", "-m", "flaxcnn.train", "--workdir", str(part)])
        resumed = train_ok(shlex.split(command)[3:], digits_data_dir)
    else:
        resumed = train_ok([*args, "--workdir", str(part)], digits_data_dir)
    assert f"resuming     from step {interrupted_at}" in resumed.stdout
    assert records(part) == uninterrupted["records"]


@pytest.mark.slow
def test_sigterm_before_the_first_step_exits_with_a_message(digits_data_dir, tmp_path):
    """A second in, the trainer is still importing jax or compiling: no step to finish and
    nothing to save, but the same kind of exit as a stop while training (no traceback)."""
    proc = start([*BASE, "--workdir", str(tmp_path / "run")], digits_data_dir)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM outside the training")
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir()
    )


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(digits_data_dir, tmp_path):
    workdir = tmp_path / "nan"
    result = run(
        ["--arch", "lenet5", "--lr", "1e30", "--checkpoint-every", "1", "--workdir",
         str(workdir), "--no-progress", "--epochs", "1"],
        digits_data_dir,
    )  # fmt: skip
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the loss became non-finite at step ")
    bad_step = int(message.split("at step ")[1].split(";")[0])
    kept = finished_checkpoints(workdir)
    assert kept and max(kept) < bad_step
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_init_from_loads_weights_and_replaces_a_classifier_of_another_size(
    digits_data_dir, finished_run, tmp_path
):
    from PIL import Image

    from flaxcnn.training import TrainConfig, train

    source = finished_run  # LeNet-5, the digits; --init-from loads its best checkpoint
    best = max(r["accuracy"] for r in records(source) if r["split"] == "test")
    lines: list[str] = []
    common = {"arch": "lenet5", "epochs": 1, "data_dir": str(digits_data_dir), "progress": False}

    # Same classes, no learning: everything is loaded, so the accuracy is the source's.
    frozen = TrainConfig(
        **common, workdir=str(tmp_path / "again"), init_from=str(source), lr=1e-12,
        warmup_epochs=0, weight_decay=0,
    )  # fmt: skip
    again = train(frozen, out=lines.append)
    assert lines[-1] == f"test accuracy: {again['accuracy']:.4f}"
    assert again["accuracy"] == pytest.approx(best)
    assert not any("re-initialised" in line for line in lines)

    # Three classes of your own images: only the output layer is new.
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    lines.clear()
    other = TrainConfig(
        **{**common, "dataset": f"folder:{tmp_path / 'imgs'}"},
        workdir=str(tmp_path / "three"), init_from=str(source), batch_size=8,
    )  # fmt: skip
    train(other, out=lines.append)
    note = next(line for line in lines if "re-initialised" in line)
    assert "output" in note and "c1" not in note and "f5" not in note


BAD_INPUT = [
    (["--arch", "resnet"], "unknown architecture 'resnet'"),
    (["--arch", "lenet5", "--dataset", "nope"], "nope"),
    (["--arch", "lenet5", "--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--arch", "lenet5", "--epochs", "0"], "--epochs must be positive"),
    (["--arch", "lenet5", "--lr", "-1"], "--lr must be positive"),
    (["--arch", "lenet5", "--batch-size", "30"], "does not divide evenly over 4 devices"),
    (["--arch", "lenet5", "--label-smoothing", "1.5"], "--label-smoothing"),
    (["--arch", "lenet5", "--val-fraction", "1"], "--val-fraction must be in [0, 1), got 1.0"),
    (["--arch", "lenet5", "--val-fraction", "nan"], "--val-fraction must be in [0, 1)"),
    (["--arch", "resnet20", "--dropout", "0.5"], "resnet20 has no dropout"),
    (["--arch", "lenet5", "--image-size", "8"], "at least 16x16"),
    (["--epochs", "2"], "--arch"),
    (["--arch", "lenet5", "--process-id", "1"], "go together"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_one_line_exit_2(argv, message, digits_data_dir, tmp_path, capsys, monkeypatch):
    from flaxcnn import train as cli

    monkeypatch.setenv("TFDS_DATA_DIR", str(digits_data_dir))
    workdir = tmp_path / "w"
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--workdir", str(workdir), "--no-progress"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not workdir.exists(), "a rejected run must not create its workdir"


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_existing_workdir_is_never_damaged_by_bad_runs(
    digits_data_dir, tmp_path, capsys, monkeypatch
):
    from flaxcnn import train as cli

    monkeypatch.setenv("TFDS_DATA_DIR", str(digits_data_dir))
    workdir = tmp_path / "lenet"
    cli.main(["--arch", "lenet5", "--epochs", "1", "--workdir", str(workdir), "--no-progress"])
    before = snapshot(workdir)
    attempts = [
        (["--arch", "netresdeep"], "--arch netresdeep contradicts the run"),  # another arch
        (["--arch", "lenet5", "--no-resume"], "already holds checkpoints"),
        (["--arch", "lenet5", "--epochs", "-3"], "--epochs must be positive"),
        (["--arch", "lenet5", "--batch-size", "6"], "--batch-size 6 contradicts the run"),
    ]
    for argv, message in attempts:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, "--workdir", str(workdir), "--no-progress"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
        assert snapshot(workdir) == before, argv

    other = tmp_path / "other"
    with pytest.raises(SystemExit):
        cli.main(["--arch", "netresdeep", "--init-from", str(workdir), "--workdir", str(other)])
    assert "holds a lenet5 checkpoint, not netresdeep" in capsys.readouterr().err
    assert snapshot(workdir) == before

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--arch", "lenet5", "--workdir", str(blocker / "run")])
    assert exit_.value.code == 2
    assert "cannot write to --workdir" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_cli_bad_input_through_a_real_process(digits_data_dir, tmp_path):
    result = run(["--arch", "vgg61", "--workdir", str(tmp_path / "w")], digits_data_dir)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown architecture 'vgg61'. Did you mean")
    assert len(result.stderr.strip().splitlines()) == 1

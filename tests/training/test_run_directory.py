"""A run directory's life: resume from its own config.json, one run at a time, damaged files
survived, and inputs that must not hang or crash.

Each test reproduces a case that used to lose or silently change a user's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxcnn import evaluate, plot
from flaxcnn import train as cli
from flaxcnn.training import TrainConfig, TrainingError, UsageError, metrics, train
from flaxcnn.training.checkpoint import CHECKSUMS
from flaxcnn.training.rundir import RunDir, checkpoint_steps


def untimed_records(workdir: Path) -> list[dict]:
    """The run's metrics.jsonl without its timings, which differ between identical runs."""
    return [
        {k: v for k, v in r.items() if k not in metrics.TIMING_FIELDS}
        for r in metrics.read(workdir)
    ]


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def quiet(line: str) -> None:
    pass


@pytest.fixture
def env(digits_data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(digits_data_dir))
    return digits_data_dir


def cli_lines(argv, capsys) -> tuple[int, list[str], list[str]]:
    """(exit code, stdout lines, stderr lines) of `python -m flaxcnn.train ARGV`, in process."""
    capsys.readouterr()
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


@pytest.fixture(scope="module")
def lenet_run(digits_data_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch LeNet-5 run with batch 32 (not the default), lr 0.05."""
    workdir = tmp_path_factory.mktemp("runs") / "lenet"
    cfg = TrainConfig(
        arch="lenet5", epochs=1, batch_size=32, lr=0.05, seed=1, progress=False,
        data_dir=str(digits_data_dir), workdir=str(workdir),
    )  # fmt: skip
    train(cfg, out=quiet)
    return workdir


CONTRADICTIONS = [
    (["--batch-size", "64"], "--batch-size 64 contradicts the run", "which has 32"),
    (["--optimizer", "adamw"], "--optimizer adamw contradicts", "which has sgd"),
    (["--lr", "0.5"], "--lr 0.5 contradicts", "which has 0.05"),
    (["--schedule", "step"], "--schedule step contradicts", "which has cosine"),
    (["--arch", "resnet20"], "--arch resnet20 contradicts", "which has lenet5"),
    (["--dataset", "mnist"], "--dataset mnist contradicts", "which has digits"),
    (["--image-size", "16"], "--image-size 16 contradicts", "which has 32"),
    (["--model-option", "pooling=avg"], "--model-option pooling=avg contradicts", "pooling=max"),
    (["--seed", "2"], "--seed 2 contradicts", "which has 1"),
    (["--dtype", "bfloat16"], "--dtype bfloat16 contradicts", "which has float32"),
    (["--label-smoothing", "0.2"], "--label-smoothing 0.2 contradicts", "which has 0.1"),
    (["--weight-decay", "0"], "--weight-decay 0 contradicts", "which has 0.0005"),
    (["--augment", "none"], "--augment none contradicts", "which has crop"),
    (["--val-fraction", "0.2"], "--val-fraction 0.2 contradicts", "which has 0.1"),
    (["--epochs", "0"], "--epochs must be positive", ""),
    (["--init-from", "elsewhere"], "--init-from elsewhere contradicts", "which has None"),
]


@pytest.mark.parametrize("argv, message, stored", CONTRADICTIONS)
def test_a_flag_that_contradicts_the_run_is_refused_and_nothing_is_written(
    argv, message, stored, lenet_run, env, capsys
):
    before = snapshot(lenet_run)
    code, _, err = cli_lines(["--workdir", str(lenet_run), *argv], capsys)
    assert code == 2
    assert len(err) == 1 and message in err[0] and stored in err[0], err
    assert snapshot(lenet_run) == before  # config.json untouched, metrics and checkpoints too


@pytest.mark.slow
def test_workdir_alone_resumes_with_every_stored_setting_and_records_changes(
    lenet_run, env, tmp_path, capsys
):
    """The stored run: batch 32, lr 0.05, seed 1. Resumed with --workdir alone it keeps them;
    a longer --epochs and other harmless changes go into the run's history."""
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(lenet_run, workdir)
    code, out, err = cli_lines(["--workdir", str(workdir)], capsys)
    assert code == 0, err
    assert any("batch        32 global" in line for line in out)
    assert out[-1].startswith("test accuracy: ")  # already finished: reported again

    code, out, err = cli_lines(
        ["--workdir", str(workdir), "--epochs", "2", "--log-every", "3", "--progress"], capsys
    )
    assert code == 0, err
    assert any(line.startswith("epoch 2/2") for line in out)
    saved = json.loads((workdir / "config.json").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["lr"], saved["seed"]) == (2, 32, 0.05, 1)
    changes = [entry["changes"] for entry in saved["history"]]
    assert changes == [{}, {"epochs": [1, 2], "log_every": [10, 3], "progress": [False, True]}]


@pytest.mark.slow
def test_folder_runs_store_the_resolved_path_and_stop_when_the_folder_changed(
    env, tmp_path, capsys, monkeypatch
):
    folder = tmp_path / "imgs"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(10):
            value = (40 if label == "a" else 200) + i
            Image.new("L", (8, 8), value).save(folder / label / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "run"
    base = ["--arch", "simple_cnn", "--epochs", "1", "--no-progress"]
    code, out, err = cli_lines(
        [*base, "--dataset", "folder:imgs", "--workdir", str(workdir)], capsys
    )
    assert code == 0, err
    # 14 training images: a small split trains without random crops by default.
    assert (
        "  augment      none (the default under 1280 training images; --augment to change)" in out
    )
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["dataset"] == f"folder:{folder.resolve()}"
    assert saved["augment"] == "none"  # resolved and stored

    # flaxcnn.evaluate from another directory finds the data.
    monkeypatch.chdir("/")
    assert evaluate.evaluate_workdir(workdir)["num_examples"] == saved["data"]["num_test"]

    # Two images change class (the counts and pixel statistics stay the same): noticed.
    (folder / "a" / "0.png").rename(folder / "b" / "from-a.png")
    (folder / "b" / "0.png").rename(folder / "a" / "from-b.png")
    before = snapshot(workdir)
    code, _, err = cli_lines(["--workdir", str(workdir), "--epochs", "2"], capsys)
    assert code == 2 and "changed since the run" in err[-1] and "its files" in err[-1], err
    assert snapshot(workdir) == before
    (folder / "b" / "from-a.png").rename(folder / "a" / "0.png")
    (folder / "a" / "from-b.png").rename(folder / "b" / "0.png")

    # The folder grows: a resume says what changed and stops; with --accept-new-data it goes on.
    for i in range(10, 15):
        Image.new("L", (8, 8), 200 + i).save(folder / "b" / f"{i}.png")
    before = snapshot(workdir)
    code, _, err = cli_lines(["--workdir", str(workdir), "--epochs", "2"], capsys)
    assert code == 2 and [line for line in err if "error" in line] == err[-1:], err
    assert "changed since the run" in err[-1] and "num_train" in err[-1]
    assert "--accept-new-data" in err[-1]
    assert snapshot(workdir) == before
    code, _, err = cli_lines(
        ["--workdir", str(workdir), "--epochs", "2", "--accept-new-data"], capsys
    )
    assert code == 0, err
    history = json.loads((workdir / "config.json").read_text())["history"]
    assert "data" in history[-1]["changes"]


@pytest.mark.slow
def test_continuing_on_a_smaller_folder_plans_the_remaining_epochs_from_the_step_reached(
    env, tmp_path, capsys, monkeypatch
):
    """--accept-new-data after images were removed (fewer steps per epoch): the epochs
    finished stay finished, each later epoch is one of the new data, none is skipped."""
    folder = tmp_path / "imgs"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(15):  # 24 train / 6 test images: 6 steps of 4
            value = (40 if label == "a" else 200) + i
            Image.new("L", (8, 8), value).save(folder / label / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    run, mid = tmp_path / "run", tmp_path / "mid"
    # Without a validation split, whose share of the images would shift the arithmetic.
    base = ["--arch", "simple_cnn", "--no-progress", "--batch-size", "4", "--val-fraction", "0"]
    argv = [*base, "--dataset", "folder:imgs", "--epochs", "1", "--checkpoint-every", "5"]
    assert cli_lines([*argv, "--workdir", str(run)], capsys)[0] == 0
    assert json.loads((run / "config.json").read_text())["steps_per_epoch"] == 6
    shutil.copytree(run, mid)
    for i in range(3):  # 21 train images: 5 steps an epoch
        (folder / "b" / f"{i}.png").unlink()

    def train_records(workdir: Path) -> list[tuple[int, int]]:
        return [(r["epoch"], r["step"]) for r in metrics.read(workdir) if r["split"] == "train"]

    # From the end of epoch 1 (step 6): epoch 2 is 5 steps of the new data.
    code, out, err = cli_lines(
        ["--workdir", str(run), "--epochs", "2", "--accept-new-data"], capsys
    )
    assert code == 0, err
    assert not [line for line in out if "lost" in line], out
    note = "note: the data changed: epochs of 5 steps (were 6); epoch 2 ends at step 11, the"
    assert f"{note} last at step 11" in out, out
    assert train_records(run) == [(1, 6), (2, 11)]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["steps_per_epoch"], saved["total_steps"]) == (5, 11)
    assert saved["epoch_plan"] == {"start_step": 6, "start_epoch": 1}
    assert saved["history"][-1]["changes"]["steps_per_epoch"] == [6, 5]
    assert checkpoint_steps(run / "checkpoints")[-1] == 11
    # The plan is kept: a later resume adds epochs of 5 steps.
    assert cli_lines(["--workdir", str(run), "--epochs", "3"], capsys)[0] == 0
    assert train_records(run) == [(1, 6), (2, 11), (3, 16)]

    # From step 5 of epoch 1 (a mid-epoch checkpoint), already a new epoch's length: epoch 1
    # keeps 4 of its steps and ends one step later, at 6; epoch 2 at 11.
    shutil.rmtree(mid / "checkpoints" / "6")
    code, out, err = cli_lines(
        ["--workdir", str(mid), "--epochs", "2", "--accept-new-data"], capsys
    )
    assert code == 0, err
    assert "resuming     from step 5" in "\n".join(out)
    assert train_records(mid) == [(1, 6), (2, 11)]
    assert json.loads((mid / "config.json").read_text())["epoch_plan"] == {
        "start_step": 1,
        "start_epoch": 0,
    }


@pytest.mark.slow
def test_one_run_per_workdir(lenet_run, env, tmp_path):
    run = RunDir(lenet_run)
    with run.locked():
        with pytest.raises(UsageError, match=f"in use by process {os.getpid()}"), run.locked():
            pass
        # A second training process is refused, naming this one; nothing is written.
        before = snapshot(lenet_run)
        result = subprocess.run(
            [sys.executable, "-m", "flaxcnn.train", "--workdir", str(lenet_run), "--epochs", "2"],
            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"in use by process {os.getpid()}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert snapshot(lenet_run) == before
        # Readers do not need the lock.
        assert plot.read_run(lenet_run)

    # A holder killed with -9 leaves no stale lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from flaxcnn.training.rundir import RunDir\n"
         f"with RunDir({str(lenet_run)!r}).locked():\n"
         "    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UsageError, match=f"process {holder.pid}"), run.locked():
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with run.locked():
        pass


def two_epoch_run(finished_run: Path, copy_run, digits_data_dir) -> TrainConfig:
    """A copy of the session's finished two-epoch LeNet-5 run, and its settings."""
    workdir = copy_run(finished_run, "run")
    return TrainConfig(
        arch="lenet5", epochs=2, seed=0, progress=False, data_dir=str(digits_data_dir),
        workdir=str(workdir),
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped bytes", "truncated"])
def test_a_damaged_checkpoint_is_set_aside_and_the_newest_intact_one_used(
    damage, digits_data_dir, finished_run, copy_run
):
    cfg = two_epoch_run(finished_run, copy_run, digits_data_dir)
    workdir = Path(cfg.workdir)
    steps = RunDir(workdir).checkpoint_steps()
    assert steps == [10, 20]
    latest = workdir / "checkpoints" / "20"
    assert (latest / CHECKSUMS).is_file()
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    if damage == "flipped bytes":
        data[len(data) // 2] ^= 0xFF
        biggest.write_bytes(bytes(data))
    else:
        biggest.write_bytes(bytes(data[: len(data) // 2]))

    lines: list[str] = []
    train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), out=lines.append)
    note = next(line for line in lines if "is damaged" in line)
    assert note.startswith("checkpoint 20 is damaged (") and biggest.name in note
    assert "resuming     from step 10" in "\n".join(lines)
    kept = list((workdir / "checkpoints-damaged").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("20-")  # kept aside, not deleted
    assert RunDir(workdir).checkpoint_steps()[-1] == 30


@pytest.mark.slow
def test_metrics_file_damage_is_survived_and_reported(digits_data_dir, finished_run, copy_run):
    cfg = two_epoch_run(finished_run, copy_run, digits_data_dir)
    workdir = Path(cfg.workdir)
    metrics = workdir / "metrics.jsonl"
    intact = metrics.read_text()

    # A torn last line (a kill or a full disk mid-write): dropped on resume.
    metrics.write_text(intact + '{"split": "train", "epo')
    lines: list[str] = []
    train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), out=lines.append)
    assert any("dropped a half-written last line" in line for line in lines)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # train, val, test

    # A shortened file: the lost epochs are named. A missing one: said so.
    metrics.write_text("\n".join(metrics.read_text().splitlines()[2:]) + "\n")
    lines.clear()
    train(TrainConfig(**{**cfg.__dict__, "epochs": 4}), out=lines.append)
    assert any("no records of epoch(s) 1 " in line for line in lines), lines
    metrics.unlink()
    lines.clear()
    train(TrainConfig(**{**cfg.__dict__, "epochs": 5}), out=lines.append)
    assert any("metrics.jsonl is missing" in line for line in lines), lines


@pytest.mark.slow
def test_a_failed_write_ends_in_one_line_and_leaves_the_previous_checkpoint_usable(
    digits_data_dir, tmp_path, monkeypatch
):
    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save
    calls = []

    def disk_full(self, step, *args, **kwargs):  # orbax's own write fails at the 2nd save
        calls.append(step)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    workdir = tmp_path / "run"
    cfg = TrainConfig(
        arch="lenet5", epochs=2, batch_size=128, progress=False, data_dir=str(digits_data_dir),
        workdir=str(workdir),
    )  # fmt: skip
    with pytest.raises(TrainingError) as error:
        train(cfg, out=quiet)
    message = str(error.value)
    assert "\n" not in message and "No space left on device" in message and "step 20" in message
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    lines: list[str] = []
    train(cfg, out=lines.append)  # resumes from the intact checkpoint at step 11
    assert "resuming     from step 10" in "\n".join(lines)

    # The metrics file cannot be written: one line too.
    from flaxcnn.training import metrics

    def unwritable(self, record):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(metrics.MetricsWriter, "write", unwritable)
    with pytest.raises(TrainingError, match=r"cannot write .*metrics.jsonl \(Permission denied"):
        train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), out=quiet)


BAD_INPUTS = [
    (["--arch", "resnet18", "--image-size", "100000"], "needs about", "--image-size"),
    (["--arch", "lenet5", "--seed", "-1"], "--seed must be an integer from 0 to 2**32 - 1", ""),
    (["--arch", "lenet5", "--seed", str(2**32)], "--seed must be an integer", ""),
]


@pytest.mark.parametrize("argv, message, hint", BAD_INPUTS)
def test_inputs_that_used_to_hang_or_crash(argv, message, hint, env, tmp_path, capsys):
    start = time.monotonic()
    code, _, err = cli_lines([*argv, "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and hint in err[0], err
    assert not (tmp_path / "w").exists()
    assert time.monotonic() - start < 120  # refused, not hanging


def test_plot_refuses_a_metrics_line_that_is_not_an_object(lenet_run, tmp_path, capsys):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(lenet_run, workdir)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]", *lines[1:]]) + "\n")
    with pytest.raises(SystemExit) as exit_:
        plot.main([str(workdir)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2 is not a JSON object" in err[0], err


def test_reconcile_compares_settings_as_the_run_used_them():
    from flaxcnn.training import resume

    stored = {
        **TrainConfig(arch="netresdeep").to_json(),
        "batch_size": 32, "lr": 0.1, "model_options": {"n_chans": 8}, "workdir": "W",
    }  # fmt: skip
    same = TrainConfig(arch="netresdeep", dropout=0.0, lr=0.1, batch_size=32)
    merged, changes = resume.reconcile(stored, same, {"arch", "dropout", "lr", "batch_size"})
    assert changes == {} and merged.batch_size == 32  # the model's own dropout rate is 0.0
    with pytest.raises(UsageError, match=r"--dropout 0.3 contradicts the run in W, which has 0"):
        resume.reconcile(stored, TrainConfig(arch="netresdeep", dropout=0.3), {"dropout"})
    listed = {**stored, "arch": "simple_cnn", "model_options": {"features": [8, 16]}}
    given = TrainConfig(arch="simple_cnn", model_options={"features": (8, 16)})
    assert resume.reconcile(listed, given, {"model_options"})[1] == {}


@pytest.mark.slow
def test_list_valued_options_resume(digits_data_dir, tmp_path):
    """JSON gives lists back where the options hold tuples: still the same run."""
    cfg = TrainConfig(
        arch="simple_cnn", model_options={"features": "8,16"}, epochs=1, batch_size=128,
        progress=False, data_dir=str(digits_data_dir), workdir=str(tmp_path / "run"),
    )  # fmt: skip
    train(cfg, out=quiet)
    lines: list[str] = []
    train(TrainConfig(workdir=str(tmp_path / "run"), epochs=2), out=lines.append)
    assert "resuming     from step 10" in "\n".join(lines)


@pytest.mark.slow
def test_no_resume_without_the_runs_settings_and_older_runs_keep_theirs(lenet_run, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(lenet_run, workdir)
    stored = json.loads((workdir / "config.json").read_text())
    del stored["precise_bn"]  # as a run of an older version recorded it
    (workdir / "config.json").write_text(json.dumps(stored))
    train(TrainConfig(workdir=str(workdir), epochs=2), out=quiet)
    assert json.loads((workdir / "config.json").read_text())["precise_bn"] == 0

    (workdir / "config.json").unlink()
    with pytest.raises(UsageError, match=r"no readable config\.json"):
        train(TrainConfig(arch="lenet5", workdir=str(workdir), epochs=3), out=quiet)


def test_runs_record_their_augmentation_and_older_runs_keep_their_data_sets_own(
    finished_run, copy_run
):
    """config.json holds --augment resolved (the digits are never mirrored). A run from
    before --augment has no such key: it ran with its data set's own augmentation, which a
    resume keeps (and checks given flags against) without loading the data."""
    from flaxcnn import data
    from flaxcnn.data.transforms import AUGMENTATIONS
    from flaxcnn.training.config import AUGMENT_CHOICES
    from flaxcnn.training.loop import resume_settings

    assert ("default", *AUGMENTATIONS) == AUGMENT_CHOICES
    assert not data.flips_keep_labels("digits") and data.flips_keep_labels("folder:/x")
    assert data.flips_keep_labels("cifar10") and not data.flips_keep_labels("mnist:3.0.1")
    workdir = copy_run(finished_run)
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["augment"] == "crop"
    del stored["augment"]  # as a run of an older version recorded it
    (workdir / "config.json").write_text(json.dumps(stored))

    def resumed(**given) -> TrainConfig:
        config = TrainConfig(workdir=str(workdir), **given)
        return resume_settings(config, {"workdir", *given})[0]

    assert resumed().augment == "crop"
    assert resumed(augment="crop").augment == resumed(augment="default").augment == "crop"
    with pytest.raises(UsageError, match=r"--augment crop\+flip contradicts .* which has crop;"):
        resumed(augment="crop+flip")


@pytest.mark.slow
def test_nothing_is_moved_when_no_checkpoint_restores(digits_data_dir, finished_run, copy_run):
    cfg = two_epoch_run(finished_run, copy_run, digits_data_dir)
    workdir = Path(cfg.workdir)
    for step in (10, 20):
        sums = workdir / "checkpoints" / str(step) / CHECKSUMS
        sums.write_text(sums.read_text().replace('"', "'"))  # unreadable: damaged
    with pytest.raises(TrainingError, match=r"no checkpoint .* can be restored .*10: its"):
        train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), out=quiet)
    assert RunDir(workdir).checkpoint_steps() == [10, 20]
    assert not (workdir / "checkpoints-damaged").exists()


def test_a_resume_that_fails_before_its_first_checkpoint_leaves_config_json_as_it_was(
    finished_run, copy_run, env, capsys, monkeypatch
):
    """Its changed settings are written with its first checkpoint, so the resume command
    printed before still works; a resume that gets there records them."""
    from flaxcnn.training.loop import Trainer

    workdir = copy_run(finished_run)
    before = (workdir / "config.json").read_bytes()

    train_epoch = Trainer.train_epoch

    def fail(self, epoch):
        raise TrainingError("the first step failed")

    monkeypatch.setattr(Trainer, "train_epoch", fail)
    argv = ["--workdir", str(workdir), "--epochs", "3", "--log-every", "4"]
    code, _, err = cli_lines(argv, capsys)
    assert code == 1 and err == ["error: the first step failed"]
    assert (workdir / "config.json").read_bytes() == before

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    code, out, err = cli_lines(argv, capsys)
    assert code == 0 and out[-1].startswith("test accuracy: "), err
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["log_every"] == 4
    assert saved["history"][-1]["changes"] == {"epochs": [2, 3], "log_every": [10, 4]}


@pytest.mark.slow
def test_data_worker_processes_checkpoint_and_resume_like_none(finished_run, copy_run, env):
    """grain's reader over 2 worker processes cannot save its own position (it used to end
    the run at its first checkpoint); the run saves and restores the index of the next
    batch instead, and trains on the same batches as without workers."""
    results = {}
    for workers in (0, 2):
        workdir = copy_run(finished_run, name=f"workers-{workers}")
        config = TrainConfig(workdir=str(workdir), epochs=3, workers=workers, checkpoint_every=4)
        results[workers] = train(
            config, out=quiet, explicit={"workdir", "epochs", "workers", "checkpoint_every"}
        )
        results[workers, "rows"] = untimed_records(workdir)
        steps = checkpoint_steps(workdir / "checkpoints")
        assert steps[-1] == 30  # 10 steps an epoch; saved mid-epoch (every 4) and at the end
    assert results[2] == results[0]
    assert results[2, "rows"] == results[0, "rows"]


# What orbax raised for a full disk (a tmpfs, orbax-checkpoint 0.11): tensorstore's error as
# a ValueError, which used to end the run with 340 lines of tracebacks.
TENSORSTORE_DISK_FULL = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "/w/checkpoints'
    '/22.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
    '"/w/d/6e5a": Failed to write 48772 bytes to file 20: No space left on device '
    "[os_error_code='28']"
)


@pytest.mark.parametrize(
    "error, reported",
    [(TENSORSTORE_DISK_FULL, True), (OSError(13, "Permission denied"), True),
     (ValueError("a bug, not the disk"), False)],
)  # fmt: skip
def test_a_full_disk_is_a_checkpoint_write_error_whatever_orbax_calls_it(
    tmp_path, monkeypatch, capsys, error, reported
):
    """The trainer turns CheckpointWriteError into one line (the test above); anything
    else is raised as it is, with whatever orbax printed."""
    import numpy as np
    import orbax.checkpoint as ocp

    from flaxcnn.training import checkpoint

    def fail(self, *args, **kwargs):
        print("tensorstore: Event loop is closed", file=sys.stderr)
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "save", fail)
    monkeypatch.setattr(checkpoint, "IN_FLIGHT_S", 0.0)
    ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints")
    expected = checkpoint.CheckpointWriteError if reported else ValueError
    with pytest.raises(expected) as raised:
        ckpts.save(1, {"w": np.zeros(3)}, {"step": 1}, {})
    ckpts.close()
    if reported:
        assert raised.value.errno == (error.errno if isinstance(error, OSError) else 28)
        assert raised.value.strerror in ("No space left on device", "Permission denied")
        assert capsys.readouterr().err == ""  # the caller's line is all the user sees
    else:
        assert "Event loop is closed" in capsys.readouterr().err


def test_a_directory_where_the_lock_file_belongs_is_refused_in_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()
    locked = RunDir(tmp_path).locked()
    with pytest.raises(UsageError, match=r"\.lock is a directory, where the run's lock file"):
        locked.__enter__()


def test_the_lock_holds_when_its_note_cannot_be_written(tmp_path):
    """On a full disk the holder's pid cannot be written: the lock is taken all the same, and
    the first file the run must write reports the disk (it used to end in a traceback).
    Here no file may grow at all (RLIMIT_FSIZE 0: a write fails with EFBIG)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        with RunDir(tmp_path).locked():
            taken = True
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert taken and (tmp_path / ".lock").read_text() == ""
    with RunDir(tmp_path).locked():
        assert f"process {os.getpid()}" in (tmp_path / ".lock").read_text()


@pytest.mark.slow
def test_a_workdir_without_a_checkpoint_starts_again_with_its_own_settings(
    finished_run, copy_run, env, capsys
):
    """Its run stopped before the first save (killed while compiling, diverged, or its
    checkpoints deleted): `--workdir W` alone starts it again from its config.json; a flag
    that contradicts that is refused, with nothing written."""
    import shutil

    workdir = copy_run(finished_run)
    shutil.rmtree(workdir / "checkpoints")
    stored = json.loads((workdir / "config.json").read_text())
    before = snapshot(workdir)
    for argv, message in [
        (["--arch", "resnet20"], "--arch resnet20 contradicts the run"),
        (["--arch", "lenet5", "--lr", "0.3"], "--lr 0.3 contradicts the run"),
    ]:
        code, _, err = cli_lines(["--workdir", str(workdir), *argv], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert snapshot(workdir) == before

    code, out, err = cli_lines(["--workdir", str(workdir)], capsys)
    assert code == 0, err
    assert out[0].startswith(f"note: {workdir} has no checkpoint (its run stopped before")
    assert out[-1].startswith("test accuracy: ")
    again = json.loads((workdir / "config.json").read_text())
    assert {k: again[k] for k in ("arch", "epochs", "batch_size", "lr", "seed")} == {
        k: stored[k] for k in ("arch", "epochs", "batch_size", "lr", "seed")
    }
    # The same settings and seed: the same run as the first, record for record.
    assert untimed_records(workdir) == untimed_records(finished_run)


def test_notes_on_resume_name_only_what_was_lost(tmp_path):
    missing = tmp_path / "metrics.jsonl"
    assert metrics.resume_file(missing, step=7, finished=0) == []  # none written yet
    assert metrics.resume_file(missing, step=50, finished=2) == [
        f"{missing} is missing: the records of epoch(s) 1-2 are lost"
    ]


def test_the_nonfinite_loss_error_says_whether_a_checkpoint_was_kept(tmp_path):
    from flaxcnn.training.errors import NonFiniteLoss

    kept = str(NonFiniteLoss(12, tmp_path, last_saved=10))
    assert "at step 12; the last good checkpoint (step 10) is kept in" in kept
    none = str(NonFiniteLoss(3, tmp_path, last_saved=None))
    assert "at step 3; no checkpoint had been saved: start again in a new --workdir" in none
    assert "kept" not in none


@pytest.mark.parametrize("inside", ["run", "cat/run", "."])
def test_a_workdir_inside_the_data_folder_is_refused(tmp_path, capsys, monkeypatch, inside):
    """Its checkpoints would be read back as a class of images at the next resume."""
    folder = tmp_path / "imgs"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv = ["--arch", "lenet5", "--dataset", "folder:imgs", "--workdir", f"imgs/{inside}"]
    code, _, err = cli_lines(argv, capsys)
    assert code == 2 and len(err) == 1 and "is inside the data folder" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == ["cat", "dog"]  # nothing written


def test_a_run_keeps_the_best_checkpoint_and_the_last_two(tmp_path):
    """What resume needs (the newest, and one to fall back on if it is damaged) and what
    evaluate and --init-from read (the best): not every checkpoint (151 MB each for the
    main job's ResNet-34)."""
    from flaxcnn.training.checkpoint import VAL_METRIC, Checkpoints

    ckpts = Checkpoints(tmp_path / "checkpoints", keep=TrainConfig().keep_checkpoints)
    try:
        for step, accuracy in [(1, 0.9), (2, 0.5), (3, 0.6), (4, 0.7)]:
            state = {"w": np.full((3,), step, np.float32)}
            ckpts.save(step, state, {}, {}, {VAL_METRIC: accuracy})
    finally:
        ckpts.close()
    assert checkpoint_steps(tmp_path / "checkpoints") == [1, 3, 4]

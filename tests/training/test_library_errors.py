"""`train()` raises typed exceptions (a notebook can catch them); only the CLI exits.

Also what a run prints: results on stdout, the progress bar on stderr and only on a
terminal, so that a redirected log holds no carriage-return updates.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flaxcnn.training import (
    Interrupted,
    NonFiniteLoss,
    TrainConfig,
    TrainingError,
    UsageError,
    train,
)
from flaxcnn.training.rundir import RunDir


@pytest.mark.slow
def test_nonfinite_loss_raises_with_the_step_and_the_good_checkpoints(digits_data_dir, tmp_path):
    cfg = TrainConfig(
        arch="lenet5", lr=1e30, checkpoint_every=1, epochs=1, progress=False,
        data_dir=str(digits_data_dir), workdir=str(tmp_path / "nan"),
    )  # fmt: skip
    with pytest.raises(NonFiniteLoss) as error:
        train(cfg, out=lambda line: None)
    assert isinstance(error.value, TrainingError)
    assert error.value.step >= 1
    kept = RunDir(tmp_path / "nan").checkpoint_steps()
    assert kept and max(kept) < error.value.step
    assert str(error.value.checkpoints) in str(error.value)


@pytest.mark.slow
def test_a_signal_raises_interrupted_after_saving(digits_data_dir, tmp_path):
    """SIGTERM during epoch 1: the epoch ends, is saved, and train() raises Interrupted."""
    workdir = tmp_path / "run"
    cfg = TrainConfig(
        arch="lenet5", epochs=3, progress=False, data_dir=str(digits_data_dir),
        workdir=str(workdir),
    )  # fmt: skip

    def out(line: str) -> None:
        if line.startswith("epoch 1/3"):
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the step finishes first

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        train(cfg, out=out)
    e = stopped.value
    assert e.signum == signal.SIGTERM and e.exit_code == 128 + signal.SIGTERM
    assert e.step in RunDir(workdir).checkpoint_steps()
    assert e.resume_command.endswith(f"--workdir {workdir}")
    # The handlers are the caller's again.
    assert signal.getsignal(signal.SIGTERM) == before


def test_bad_input_raises_usage_error_not_system_exit(digits_data_dir, tmp_path):
    with pytest.raises(UsageError, match="--epochs must be positive"):
        train(TrainConfig(arch="lenet5", epochs=0, workdir=str(tmp_path / "w")))
    assert not (tmp_path / "w").exists()


def test_a_bad_init_from_is_refused_before_the_network_is_built(
    digits_data_dir, tmp_path, monkeypatch
):
    from flaxcnn.training import loop

    def not_yet(*args, **kwargs):
        raise AssertionError("the state was built before --init-from was checked")

    monkeypatch.setattr(loop, "create_train_state", not_yet)
    base = dict(arch="lenet5", data_dir=str(digits_data_dir), workdir=str(tmp_path / "w"))
    with pytest.raises(UsageError, match="no such directory"):
        train(TrainConfig(**base, init_from=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no checkpoint found"):
        train(TrainConfig(**base, init_from=str(tmp_path / "empty")))
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_a_redirected_log_has_results_only(digits_data_dir, tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(digits_data_dir), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "flaxcnn.train", "--arch", "lenet5", "--epochs", "2",
         "--workdir", str(tmp_path / "w")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout and "\r" not in result.stderr
    assert "epoch 1/2" not in result.stderr  # no progress bar when stderr is not a terminal
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("test accuracy: ")
    assert [line[:9] for line in lines if line.startswith("epoch")] == ["epoch 1/2", "epoch 2/2"]
    assert "OpenCV" not in result.stderr

"""Environment settings that used to end in pages of output: one line each, exit code 2,
saying what to change, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flaxcnn import cli

LENET = ["--arch", "lenet5", "--epochs", "1", "--no-progress"]


def run(module: str, args: list[str], tmp_path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environment.update({"JAX_PLATFORMS": "cpu", **env})
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=environment, cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, args",
    [("flaxcnn.train", [*LENET, "--workdir", "run"]), ("flaxcnn.bench", ["--arch", "lenet5"])],
)
@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_PLATFORMS": "cuda"}, "JAX could not start the platform JAX_PLATFORMS='cuda'"),
        ({"XLA_FLAGS": "xla_force_host_platform_device_count=2"}, "XLA_FLAGS holds"),
    ],
    ids=["cuda-without-a-gpu", "flags-without-dashes"],
)
def test_a_bad_environment_is_one_line(tmp_path, module, args, env, message, digits_data_dir):
    result = run(module, args, tmp_path, TFDS_DATA_DIR=str(digits_data_dir), **env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_empty_tfds_data_dir_is_refused_not_the_current_directory(tmp_path):
    result = run("flaxcnn.train", [*LENET, "--workdir", str(tmp_path / "run")], tmp_path,
                 TFDS_DATA_DIR="")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        "error: TFDS_DATA_DIR is set but empty: unset it (the default is ~/tensorflow_datasets) "
        "or set it to a directory"
    )
    assert list(tmp_path.iterdir()) == []  # no data set prepared here, no workdir


def test_other_errors_pass_through_where_jax_starts():
    """Only a JAX that cannot start its devices is reported as the platform's fault."""
    with pytest.raises(RuntimeError, match="something else"), cli.jax_backend_errors():
        raise RuntimeError("something else")
    with pytest.raises(AssertionError), cli.jax_backend_errors():
        raise AssertionError

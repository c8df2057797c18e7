"""Environment settings that used to end in pages of output: one line each, exit code 2,
saying what to change, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# `python -m MODULE ARGS...` as a user of `pip install -e .` runs it, whichever checkout (or
# PYTHONPATH) these tests run from: the checkout is not on sys.path, and flaxcnn and its
# direct children are found by setuptools' editable finder (`_EditableFinder` in the
# generated __editable___flaxcnn_*_finder.py), which Python asks only after sys.path.
AS_AN_EDITABLE_INSTALL = """
import os, runpy, sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location

package, module, *args = sys.argv[1:]
root = os.path.realpath(os.path.dirname(package))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != root]


class Editable:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "flaxcnn":
            return spec_from_file_location(name, os.path.join(package, "__init__.py"))
        if name.rpartition(".")[0] == "flaxcnn":
            return PathFinder.find_spec(name, [package])
        return None


sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, Editable)
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # three processes, each importing the trainer
def test_a_flaxcnn_folder_in_the_current_directory_is_named_in_one_line(tmp_path):
    package = Path(cli.__file__).parent
    if not (package.parent / "pyproject.toml").exists():
        pytest.skip("flaxcnn is installed as a regular package, which no folder can hide")

    def run_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
        cwd.mkdir(exist_ok=True)
        command = [sys.executable, "-c", AS_AN_EDITABLE_INSTALL, str(package), *args]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    done = run_in(tmp_path / "plain", "flaxcnn.train", "--help")  # the setting itself works
    assert done.returncode == 0 and "--arch" in done.stdout, done.stderr[-3000:]

    empty = tmp_path / "empty"
    (empty / "flaxcnn").mkdir(parents=True)  # flaxcnn's __init__ would not run
    (data := tmp_path / "data" / "flaxcnn" / "data").mkdir(parents=True)  # nor flaxcnn.data
    (data.parent / "notes.txt").write_text("not a package\n")
    for cwd, args in [(empty, ["--help"]), (data.parent.parent, ["--arch", "lenet5"])]:
        done = run_in(cwd, "flaxcnn.train", *args)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr[-3000:]
        assert done.stderr.startswith(f"error: {cwd / 'flaxcnn'} (a folder without __init__.py)")
        assert "run from another directory or rename that folder" in done.stderr

"""Test-wide setup: four fake CPU devices, so multi-device code runs on any laptop, and one
XLA compilation cache for the whole test run.

Many tests compile the same programs (a LeNet-5 or ResNet-20 train step at the same shapes),
in the xdist workers and in the `python -m flaxcnn.train` children they start. JAX's
persistent compilation cache lets every compile after the first be a load. The cache lives
in a fresh directory for each test run (shared by its workers and their children through
the environment) and is removed at the end, so no test ever sees a program compiled by
other code. `FLAXCNN_TEST_XLA_CACHE=0` turns it off (to measure the suite without it).
"""

import fcntl
import json
import os
import pathlib
import shutil
import tempfile


def _compilation_cache_dir() -> tuple[str | None, bool]:
    """(the run's cache directory, whether this process owns it). The first pytest process
    (the xdist controller, or a run without xdist) makes it; the workers it starts inherit
    it through the environment."""
    if os.environ.get("FLAXCNN_TEST_XLA_CACHE", "1").strip().lower() in ("0", "false", "no"):
        return None, False
    inherited = os.environ.get(_CACHE_VARIABLE)
    if inherited:
        return inherited, False
    path = tempfile.mkdtemp(prefix="flaxcnn-test-xla-cache-")
    os.environ[_CACHE_VARIABLE] = path
    return path, True


_CACHE_VARIABLE = "FLAXCNN_TEST_XLA_CACHE_DIR"
# Before JAX is imported (chex imports it): JAX reads these when it starts.
_CACHE, _OWNED = _compilation_cache_dir()
if _CACHE is not None:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

import chex  # noqa: E402
import pytest  # noqa: E402

chex.set_n_cpu_devices(4)

REFERENCE = pathlib.Path(__file__).parent / "reference" / "torchvision.json"


def pytest_collection_modifyitems(config, items):
    """The files with the most `slow` tests first, each file's tests in their own order.

    pytest-xdist hands tests out in this order as workers free up, so whatever runs last
    decides how long one worker waits for the other at the end: run in file-name order, the
    long training tests of tests/training/ came last (a full run, 2026-12-07: one worker
    idle for 23 s). The order only: xdist may still hand one file's tests to both workers,
    so a test must not count on the other tests of its file running beside it."""

    def file(item) -> str:
        return item.nodeid.split("::")[0]

    slow: dict[str, int] = {}
    for item in items:
        slow[file(item)] = slow.get(file(item), 0) + (item.get_closest_marker("slow") is not None)
    rank = {path: i for i, path in enumerate(sorted(slow, key=lambda path: -slow[path]))}
    items.sort(key=lambda item: rank[file(item)])  # stable: each file's own order


def pytest_sessionfinish(session):
    """The process that made the run's cache removes it."""
    if _OWNED:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> pathlib.Path:
    """A data directory in which the digits were prepared once for the whole session."""
    from flaxcnn import data  # the data layer loads tfds: only for the tests that ask

    path = tmp_path_factory.mktemp("tfds")
    data.load("digits", data_dir=path)
    return path


@pytest.fixture(scope="session")
def reference() -> dict:
    """Published figures (torchvision 0.29, He et al. 2016), copied from shared/reference."""
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory, worker_id):
    """`once_per_run(name, make)`: the JSON value of `make(directory)`, computed once per test
    run for all xdist workers.

    For a reference that several tests compare against (an uninterrupted training run, an
    experiment's smoke record): the first worker to ask makes it, under a lock, in a
    directory that every worker of the run shares and that stays until the run ends (files
    `make` writes there can be used by path); the others wait for it and read it. A `make`
    that fails writes nothing, and the next worker to ask tries again. (pytest-xdist's
    `xdist_group` would keep such tests on one worker, but under pytest 9 it does not.)
    """
    base = tmp_path_factory.getbasetemp()  # under xdist, its parent is the run's
    root = (base if worker_id == "master" else base.parent) / "once-per-run"
    root.mkdir(exist_ok=True)

    def get(name: str, make):
        directory, result = root / name, root / f"{name}.json"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not result.exists():
                shutil.rmtree(directory, ignore_errors=True)  # a failed attempt's files
                directory.mkdir()
                text = json.dumps(make(directory))
                result.with_suffix(".tmp").write_text(text)
                result.with_suffix(".tmp").replace(result)
            return json.loads(result.read_text())

    return get


@pytest.fixture(scope="session")
def finished_run(digits_data_dir, once_per_run) -> pathlib.Path:
    """The workdir of one finished LeNet-5 run on the digits, with the trainer's defaults
    but two epochs in batches of 128 with a 1-epoch warmup (1,293 training digits after the
    validation split's 144: 10 steps an epoch, checkpoints at steps 10 and 20; the default
    3-epoch warmup would leave two epochs all warmup).

    Trained once per test run, by the first worker that asks, for every test that only
    needs a finished run (plot, evaluate, predict, --init-from, resume checks without a
    kill of their own). Read it only: a test that changes a run works on
    `copy_run(finished_run)`. (What readers write beside it, a plot or a confusion matrix,
    goes through a uniquely named temporary file renamed into place.)
    """

    def make(directory: pathlib.Path) -> str:
        from flaxcnn.training import TrainConfig, train

        workdir = directory / "lenet5-digits"
        config = TrainConfig(
            arch="lenet5", epochs=2, batch_size=128, warmup_epochs=1.0,
            data_dir=str(digits_data_dir), workdir=str(workdir), progress=False,
        )  # fmt: skip
        train(config, out=lambda line: None)
        return str(workdir)

    return pathlib.Path(once_per_run("finished_run", make))


@pytest.fixture(scope="module")
def own_finished_run(finished_run, tmp_path_factory) -> pathlib.Path:
    """A copy of `finished_run` for one test module, for the modules whose tests write
    plots beside the run or compare a snapshot of its files: on the shared run, a test on
    the other xdist worker may write a PNG (or its temporary file) at any moment."""
    target = tmp_path_factory.mktemp("run") / finished_run.name
    shutil.copytree(finished_run, target, ignore=shutil.ignore_patterns(".lock"))
    return target


@pytest.fixture
def copy_run(tmp_path):
    """`copy_run(workdir, name="copy")`: a copy of a run directory (without its lock file)
    in the test's temporary directory, to change or resume."""

    def copy(workdir: pathlib.Path, name: str = "copy") -> pathlib.Path:
        target = tmp_path / name
        shutil.copytree(workdir, target, ignore=shutil.ignore_patterns(".lock"))
        return target

    return copy

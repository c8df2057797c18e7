"""Bad input to the data layer: one line (ValueError, or exit code 2 from the bench), no
traceback, and nothing written: unusable data directories and bench arguments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flaxcnn import data
from flaxcnn.data import bench, digits
from flaxcnn.data.bench import main as bench_main

REPO_ROOT = str(Path(data.__file__).resolve().parents[2])


def tree(path: Path) -> list[str]:
    return sorted(os.fspath(p.relative_to(path)) for p in path.rglob("*"))


def one_line_exit_2(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        bench_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
def test_digits_in_a_data_dir_that_is_a_file(tmp_path, a_file, under, capsys):
    data_dir = a_file / "sub" if under else a_file
    with pytest.raises(ValueError) as error:
        data.load("digits", data_dir=data_dir)
    message = str(error.value)
    assert message.startswith(f"cannot prepare digits in data dir {data_dir}: {a_file} is not")
    assert "\n" not in message
    assert tree(tmp_path) == ["a_file"] and a_file.read_text() == "not a directory"
    line = one_line_exit_2(capsys, ["--data-dir", str(data_dir)])
    assert f"data dir {data_dir}" in line


def test_folder_in_a_data_dir_that_is_a_file(tmp_path, a_file, image_folder, capsys):
    folder = image_folder(per_class=5)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=f"cannot prepare folder:.* in data dir {a_file}: "):
        data.load(f"folder:{folder}", data_dir=a_file)
    line = one_line_exit_2(capsys, ["--dataset", f"folder:{folder}", "--data-dir", str(a_file)])
    assert f"data dir {a_file}: {a_file} is not a directory" in line
    assert tree(tmp_path) == before


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root writes through missing write permission (the next test simulates it)",
)
def test_unwritable_data_dir(tmp_path, image_folder, capsys):
    folder = image_folder(per_class=5)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        for name in ("digits", f"folder:{folder}"):
            with pytest.raises(ValueError, match=f"data dir {locked}: {locked} is not writable"):
                data.load(name, data_dir=locked)
            one_line_exit_2(capsys, ["--dataset", name, "--data-dir", str(locked)])
        assert tree(locked) == []
    finally:
        locked.chmod(0o755)


def test_unwritable_data_dir_simulated(tmp_path, image_folder, monkeypatch, capsys):
    folder = image_folder(per_class=5)
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw)
    )
    for name in ("digits", f"folder:{folder}"):
        # A data dir not there yet: the directory it would be created in is checked.
        with pytest.raises(ValueError, match=f"data dir {locked / 'sub'}: {locked} is not writ"):
            data.load(name, data_dir=locked / "sub")
        line = one_line_exit_2(capsys, ["--dataset", name, "--data-dir", str(locked)])
        assert "--data-dir" in line and "data_dir=" in line  # How to get out of it.
    assert tree(locked) == []


def test_data_already_prepared_in_an_unwritable_dir_still_loads(
    digits_data_dir, monkeypatch, tmp_path
):
    access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode, **kw: Path(path) != digits_data_dir and access(path, mode, **kw),
    )
    assert data.load("digits", data_dir=digits_data_dir).info.num_train == 1437


def test_digits_in_an_existing_empty_dir(tmp_path):
    assert data.load("digits", data_dir=tmp_path).info.num_train == 1437


def test_a_failed_write_is_one_line_naming_the_data_dir(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(digits, "prepare_array_record", full_disk)
    with pytest.raises(
        ValueError, match=f"cannot prepare digits in data dir {tmp_path}: .*No space left"
    ):
        data.load("digits", data_dir=tmp_path)


def test_one_line_on_the_real_command_line(tmp_path, a_file):
    """No traceback and no tfds warning besides the error line, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", "flaxcnn.data.bench", "--data-dir", str(a_file / "sub")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: cannot prepare digits in data dir {a_file / 'sub'}: {a_file} is not a "
        "directory; choose another with --data-dir (command line) or data_dir= (Python)"
    ]


def test_bench_on_a_missing_folder(tmp_path, capsys):
    line = one_line_exit_2(
        capsys, ["--dataset", f"folder:{tmp_path / 'nonexistent'}", "--data-dir", str(tmp_path)]
    )
    assert line == f"error: folder:{tmp_path / 'nonexistent'}: no such directory"
    assert tree(tmp_path) == []


def test_bench_on_a_dangling_symlink(tmp_path, image_folder, capsys):
    folder = image_folder(per_class=5)
    (folder / "dog" / "x.png").symlink_to(tmp_path / "nonexistent.png")
    argv = ["--dataset", f"folder:{folder}", "--data-dir", str(tmp_path / "tfds")]
    assert "x.png: broken symbolic link to" in one_line_exit_2(capsys, argv)
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--batches", "-1"), ("--batches", "0"), ("--batch-size", "0"), ("--workers", "-1")],
)
def test_bench_rejects_bad_numbers_before_preparing_anything(tmp_path, capsys, flag, value):
    line = one_line_exit_2(capsys, ["--data-dir", str(tmp_path / "tfds"), flag, value])
    assert line.startswith(f"error: {flag} must be") and f"got {value}" in line
    assert not (tmp_path / "tfds").exists()


def test_bench_refuses_batches_that_cannot_fit_in_memory(tmp_path, capsys):
    line = one_line_exit_2(capsys, ["--data-dir", str(tmp_path / "tfds"), "--image-size", "100000"])
    assert "100000x100000x3 need about" in line and "lower --image-size or --batch-size" in line
    assert not (tmp_path / "tfds").exists()


def test_bench_rejects_a_non_number_in_one_line(capsys):
    assert "--batches" in one_line_exit_2(capsys, ["--batches", "many"])


@pytest.mark.parametrize("batches", [0, -1])
def test_measure_throughput_rejects_no_batches(digits_data_dir, batches):
    ds = data.load("digits", data_dir=digits_data_dir)
    with pytest.raises(ValueError, match=f"batches must be positive, got {batches}"):
        bench.measure_throughput(ds, global_batch_size=8, batches=batches)

"""folder:PATH data sets: PNG/JPEG class folders prepared once into array_record."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from flaxcnn import data
from flaxcnn.data.folder import prepared_home

REPO_ROOT = str(Path(data.__file__).resolve().parents[2])


def prepared_versions(folder, data_dir):
    home = prepared_home(folder.resolve(), data_dir)
    if not home.exists():
        return []
    return sorted(p.name for p in home.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_mixed_png_jpeg_gray_rgb_sizes(image_folder, tmp_path):
    folder = image_folder(per_class=5)
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    info = ds.info
    assert info.class_names == ("cat", "dog", "owl") and info.num_classes == 3
    # Mixed sizes: squared and resized to the median shorter side (20); some RGB -> 3 channels.
    assert info.image_shape == (20, 20, 3)
    assert info.num_train + info.num_test == 15 and info.num_test == 3  # 20%, stratified
    assert {ds.test[i]["label"] for i in range(3)} == {0, 1, 2}
    assert info.hflip is True and len(info.mean) == len(info.std) == 3
    example = ds.train[0]
    assert example["image"].shape == (20, 20, 3) and example["image"].dtype == np.uint8


def test_same_sized_grayscale_folder_keeps_size_and_one_channel(tmp_path, write_image):
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / "gray" / cls / f"{i}.png", rng, size=(12, 10), gray=True)
    ds = data.load(f"folder:{tmp_path / 'gray'}", data_dir=tmp_path / "tfds")
    assert ds.info.image_shape == (10, 12, 1)


def test_test_subdirectory_is_the_test_split(image_folder, tmp_path):
    folder = image_folder(per_class=4, test_per_class=2)
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    assert ds.info.class_names == ("cat", "dog", "owl")
    assert (ds.info.num_train, ds.info.num_test) == (12, 6)


def test_test_subdirectory_must_have_the_same_classes(image_folder, tmp_path):
    folder = image_folder(per_class=4, test_per_class=2)
    (folder / "test" / "owl").rename(folder / "test" / "emu")
    with pytest.raises(ValueError, match=r"missing: \['owl'\], unexpected: \['emu'\]"):
        data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")


def test_prepared_once_and_again_only_when_the_folder_changes(image_folder, tmp_path):
    folder, data_dir = image_folder(per_class=5), tmp_path / "tfds"
    data.load(f"folder:{folder}", data_dir=data_dir)
    (first,) = prepared_versions(folder, data_dir)
    info_file = prepared_home(folder.resolve(), data_dir) / first / "dataset_info.json"
    written = info_file.stat().st_mtime_ns
    data.load(f"folder:{folder}", data_dir=data_dir)
    assert info_file.stat().st_mtime_ns == written
    (folder / "cat" / "0.png").rename(folder / "cat" / "renamed.png")
    ds = data.load(f"folder:{folder}", data_dir=data_dir)
    (second,) = prepared_versions(folder, data_dir)  # The superseded copy is gone.
    assert second != first and ds.info.num_train + ds.info.num_test == 15


def test_corrupt_image_stops_with_a_one_line_message_naming_it(image_folder, tmp_path):
    folder = image_folder(per_class=5)
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError) as error:
        data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    message = str(error.value)
    assert "broken.png" in message and "\n" not in message
    # Names the way out for both the trainer's users and Python's.
    assert "--skip-corrupt" in message and "skip_corrupt=True" in message
    assert prepared_versions(folder, tmp_path / "tfds") == []


def test_truncated_image_stops_preparation(image_folder, tmp_path):
    folder = image_folder(per_class=5)
    whole = (folder / "cat" / "1.jpg").read_bytes()
    (folder / "cat" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg"):
        data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")


def test_preparation_message_names_the_final_directory(image_folder, tmp_path, capsys):
    folder, data_dir = image_folder(per_class=5), tmp_path / "tfds"
    data.load(f"folder:{folder}", data_dir=data_dir)
    (version,) = prepared_versions(folder, data_dir)
    final = prepared_home(folder.resolve(), data_dir) / version
    message = capsys.readouterr().err
    assert f"once in {final}\n" in message and ".incomplete-" not in message


def skip_notes(capsys) -> list[str]:
    """The lines on stderr since the last call, without the one-off preparation line."""
    return [
        line for line in capsys.readouterr().err.splitlines() if not line.startswith("preparing ")
    ]


def test_skip_corrupt_names_each_skipped_file_on_stderr(image_folder, tmp_path, capsys):
    """An image whose header is garbage and one whose pixels are cut off (found only when it
    is decoded): each is named, by full path, at every load; nothing goes through logging."""
    folder = image_folder(per_class=5)
    (folder / "dog" / "broken.png").write_bytes(b"garbage")
    whole = (folder / "cat" / "1.jpg").read_bytes()
    (folder / "cat" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds", skip_corrupt=True)
    assert ds.info.num_train + ds.info.num_test == 15
    expected = [
        f"note: skipped {folder.resolve() / name}: not a readable PNG/JPEG image"
        for name in ("cat/cut.jpg", "dog/broken.png")
    ]
    assert skip_notes(capsys) == expected
    data.load(f"folder:{folder}", data_dir=tmp_path / "tfds", skip_corrupt=True)  # prepared
    assert skip_notes(capsys) == expected


def test_skip_corrupt_names_the_first_five_and_counts_the_rest(image_folder, tmp_path, capsys):
    folder = image_folder(per_class=5)
    names = [f"{cls}/bad{i}.png" for i, cls in enumerate(["cat"] * 4 + ["dog"] * 3)]
    for name in names:
        (folder / name).write_bytes(b"garbage")
    capsys.readouterr()
    data.load(f"folder:{folder}", data_dir=tmp_path / "tfds", skip_corrupt=True)
    notes = skip_notes(capsys)
    assert notes[:5] == [
        f"note: skipped {folder.resolve() / name}: not a readable PNG/JPEG image"
        for name in names[:5]
    ]
    (version,) = prepared_versions(folder, tmp_path / "tfds")
    listed = prepared_home(folder.resolve(), tmp_path / "tfds") / version / "metadata.json"
    assert notes[5:] == [
        f'note: and 2 more; all 7 skipped files are listed under "skipped" in {listed}'
    ]
    assert json.loads(listed.read_text())["skipped"] == names


def test_stray_files_get_a_clear_message(image_folder, tmp_path):
    folder = image_folder(per_class=5)
    (folder / "owl" / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"hidden files are ignored")
    with pytest.raises(ValueError, match=r"1 file\(s\) are not PNG/JPEG.*owl/notes.txt") as error:
        data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    assert "--skip-corrupt" in str(error.value) and "skip_corrupt=True" in str(error.value)
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds", skip_corrupt=True)
    assert ds.info.num_train + ds.info.num_test == 15


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "has no class subdirectories"),
        ({"only": 3}, "a single class"),
        ({"a": 3, "b": 0}, "class directory 'b' has no PNG/JPEG images"),
        ({"a": 3, "b": 1}, "class 'b' has fewer than 2 images"),
    ],
)
def test_unusable_folders_get_clear_messages(tmp_path, write_image, layout, message):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    root.mkdir()
    for cls, count in layout.items():
        (root / cls).mkdir()
        for i in range(count):
            write_image(root / cls / f"{i}.png", rng)
    with pytest.raises(ValueError, match=message):
        data.load(f"folder:{root}", data_dir=tmp_path / "tfds")


@pytest.mark.parametrize("name", ["x\ny", "x ", " x", "tab\there"])
def test_class_names_that_cannot_stand_as_names_are_refused(tmp_path, write_image, name):
    """'x' and 'x ' were one class in a report, and a line break split a CSV row."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for cls in ("x" if name != "x" else "y", name):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            write_image(root / cls / f"{i}.png", rng)
    with pytest.raises(ValueError, match="cannot stand as a class name") as error:
        data.load(f"folder:{root}", data_dir=tmp_path / "tfds")
    assert repr(name) in str(error.value) and "\n" not in str(error.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        data.load(f"folder:{tmp_path / 'nowhere'}", data_dir=tmp_path / "tfds")


KILLED_PREPARATION = """
import sys, time
from pathlib import Path
from flaxcnn import data
from flaxcnn.data import folder

real = folder.encode_png
count = 0
def slow_encode(image):
    global count
    count += 1
    if count == 4:  # Some examples are written: tell the test, then wait to be killed.
        Path(sys.argv[3]).write_text("writing")
        time.sleep(60)
    return real(image)
folder.encode_png = slow_encode
data.load("folder:" + sys.argv[1], data_dir=sys.argv[2])
"""


def test_killed_preparation_leaves_nothing_that_looks_prepared(image_folder, tmp_path):
    folder, data_dir = image_folder(per_class=5), tmp_path / "tfds"
    previous = data.load(f"folder:{folder}", data_dir=data_dir)
    (old_version,) = prepared_versions(folder, data_dir)
    (folder / "owl" / "0.png").unlink()  # A change, so the next load prepares again...
    marker = tmp_path / "marker"
    script = tmp_path / "prepare.py"
    script.write_text(textwrap.dedent(KILLED_PREPARATION))
    child = subprocess.Popen(
        [sys.executable, str(script), str(folder), str(data_dir), str(marker)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the preparation never started writing"
        os.kill(child.pid, signal.SIGKILL)  # ...and is killed half-way through.
    finally:
        child.kill()
        child.wait()
    home = prepared_home(folder.resolve(), data_dir)
    assert prepared_versions(folder, data_dir) == [old_version]  # Previous copy intact...
    assert list(home.glob(".incomplete-*"))  # ...beside the abandoned staging directory.
    assert len(previous.train) == previous.info.num_train  # Still readable.
    ds = data.load(f"folder:{folder}", data_dir=data_dir)  # Prepares afresh, cleans up.
    assert ds.info.num_train + ds.info.num_test == 14
    assert not list(home.glob(".incomplete-*"))
    assert len(prepared_versions(folder, data_dir)) == 1


def test_dangling_symlink_is_an_unreadable_image_named_in_one_line(image_folder, tmp_path):
    folder = image_folder(per_class=5)
    (folder / "cat" / "x.png").symlink_to(tmp_path / "nonexistent.png")
    with pytest.raises(ValueError) as error:
        data.load(f"folder:{folder}", data_dir=tmp_path / "tfds")
    message = str(error.value)
    assert f"{folder / 'cat' / 'x.png'}: broken symbolic link to" in message
    assert "\n" not in message and "--skip-corrupt" in message
    assert not (tmp_path / "tfds").exists()  # Found before anything was written.


def test_dangling_symlink_is_skipped_with_skip_corrupt(image_folder, tmp_path, capsys):
    folder = image_folder(per_class=5)
    (folder / "owl" / "loop.jpg").symlink_to("loop.jpg")  # A loop of links is broken too.
    (folder / "cat" / "x.png").symlink_to(tmp_path / "nonexistent.png")
    capsys.readouterr()
    ds = data.load(f"folder:{folder}", data_dir=tmp_path / "tfds", skip_corrupt=True)
    assert ds.info.num_train + ds.info.num_test == 15
    notes = skip_notes(capsys)
    assert len(notes) == 2 and "cat/x.png" in notes[0] and "owl/loop.jpg" in notes[1]

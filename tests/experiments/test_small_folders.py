"""experiments/small_data.py: its folders are drawn the same every time, its page reports what
the trainer logged, and its verdict follows the numbers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import small_data
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# The decoded pixels of the folders the small-data rule was chosen on (drawn by the script
# that chose it): the experiment measures those images, not look-alikes.
PIXELS = {
    "d2x75": "5b5787b43bb72073",
    "d3x60": "2808338d513467bd",
    "d5x50": "f3b35d8bae27eb06",
    "s3x70": "08c2dd94bb196344",
    "s4x60": "11fc4449cd75541e",
    "p3x70": "1db426388725e00f",
    "p5x60": "f2c8000b17e0ffdf",
}


def pixel_digest(path: Path) -> str:
    """sha256 of every image's relative path, mode, shape and pixels (not its PNG bytes,
    which a new zlib may pack differently)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with Image.open(file) as image:
            pixels = np.asarray(image)
            mode = image.mode
        digest.update(f"{file.relative_to(path).as_posix()} {mode} {pixels.shape}\0".encode())
        digest.update(pixels.tobytes())
    return digest.hexdigest()[:16]


def test_the_folders_are_the_ones_the_rule_was_chosen_on(tmp_path):
    assert list(small_data.FOLDERS) == list(PIXELS)
    for name, folder in small_data.FOLDERS.items():
        path = small_data.make_folder(folder, tmp_path)
        assert path == tmp_path / name
        assert sorted(p.name for p in path.iterdir()) == sorted(folder.classes)
        assert len(list(path.rglob("*.png"))) == folder.images
        assert 150 <= folder.images <= 300 and 2 <= len(folder.classes) <= 5  # the claim's
        assert pixel_digest(path) == PIXELS[name], name


def test_a_folder_made_twice_is_the_same_bytes(tmp_path):
    for name in ("d2x75", "p5x60"):  # a digits folder and a thresholded shapes one
        folder = small_data.FOLDERS[name]
        first = small_data.make_folder(folder, tmp_path / "a")
        second = small_data.make_folder(folder, tmp_path / "b")
        assert small_data.folder_digest(first) == small_data.folder_digest(second)
    # Made again where it is: untouched, file times too (the trainer's prepared copy of a
    # folder is keyed on them); a changed or stray file makes it drawn afresh.
    path = tmp_path / "a" / "d2x75"
    digest = small_data.folder_digest(path)
    times = {p: p.stat().st_mtime_ns for p in path.rglob("*.png")}
    small_data.make_folder(small_data.FOLDERS["d2x75"], tmp_path / "a")
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*.png")} == times
    (path / "3" / "0.png").write_bytes(b"not a png")
    (path / "8" / "stray.png").write_bytes(b"")
    small_data.make_folder(small_data.FOLDERS["d2x75"], tmp_path / "a")
    assert small_data.folder_digest(path) == digest


def test_the_child_trains_this_checkouts_code():
    """An installed flaxcnn may point at another checkout: the child gets this one first."""
    path = small_data.child_environment()["PYTHONPATH"].split(os.pathsep)
    assert path[0] == str(ROOT)


def _run(folder: str, arch: str, seed: int, accuracy: float | None) -> dict:
    return {"folder": folder, "arch": arch, "seed": seed, "test_accuracy": accuracy}


def _settings(folders, archs, seeds) -> small_data.Settings:
    return small_data.Settings(tuple(folders), tuple(archs), tuple(seeds), epochs=10)


def test_verdict_follows_the_numbers():
    settings = _settings(["d2x75", "s3x70"], ["lenet5"], [0, 1, 2])
    every = [_run(f, "lenet5", s, 1.0) for f in settings.folders for s in settings.seeds]
    cells = small_data.summarize(every, settings)
    assert [c["met"] for c in cells] == [True, True]
    text = small_data.verdict(cells, 10)
    assert text.startswith("The claim held as measured: with --epochs 10 and no other flag")
    assert "(6 of 6 runs)" in text

    # A mean above the line is not enough: every seed must reach it.
    almost = [*every[:5], _run("s3x70", "lenet5", 2, 0.9)]
    cells = small_data.summarize(almost, settings)
    assert cells[1]["mean"] == pytest.approx((2 + 0.9) / 3) and cells[1]["mean"] > 0.95
    assert not cells[1]["met"] and cells[1]["min"] == 0.9
    text = small_data.verdict(cells, 10)
    assert text.startswith("The claim held only in part")
    assert "1 of the 2 folder-network pairs" in text and "(5 of 6 runs did)" in text
    assert "lenet5 met it on 1 of 2 folders (d2x75); not on s3x70 (mean 0.967, min 0.900" in text
    assert "Pairs met, by kind of folder: digits 1 of 1, coloured shapes 0 of 1." in text
    assert "No network met it on s3x70." in text
    assert small_data.cell_text(cells[0]) == "1.000 (min 1.000) ✓"
    assert small_data.cell_text(cells[1]) == "0.967 (min 0.900)"

    # 57 of 60 is 0.95 even when the float comes back a hair under it.
    edge = [_run("d2x75", "lenet5", s, float(np.float32(57) / np.float32(60))) for s in (0, 1)]
    edge_settings = _settings(["d2x75"], ["lenet5"], [0, 1])
    assert small_data.summarize(edge, edge_settings)[0]["met"]

    # A failed run is a miss; a pair with none finished says so; nothing met: did not hold.
    two = _settings(["d2x75", "p3x70"], ["simple_cnn", "resnet20"], [0])
    runs = [_run("d2x75", "simple_cnn", 0, 0.5), _run("d2x75", "resnet20", 0, None),
            _run("p3x70", "simple_cnn", 0, 0.94), _run("p3x70", "resnet20", 0, 0.9)]  # fmt: skip
    cells = small_data.summarize(runs, two)
    assert not any(c["met"] for c in cells) and cells[1]["failed"] == 1
    assert small_data.cell_text(cells[1]) == "failed (1 of 1)"
    text = small_data.verdict(cells, 10)
    assert text.startswith("The claim did not hold: with --epochs 10 and no other flag, no ")
    assert "(0 of 4 runs did)" in text
    assert "resnet20 met it on 0 of 2 folders; not on d2x75 (every run failed); p3x70" in text
    assert text.endswith("1 run failed; a failed run counts as one that did not.")
    assert small_data.verdict([], 10).endswith("untested here.")


def test_bad_arguments_are_one_line_and_exit_2(tmp_path):
    cases = {
        "--nope": ["--smoke", "--nope", "--out", str(tmp_path)],
        "--publish": ["--smoke", "--publish"],  # a smoke page is never a committed one
    }
    for word, args in cases.items():
        proc = subprocess.run(
            [sys.executable, "experiments/small_data.py", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and word in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_run_reports_what_the_trainer_logged(run_experiment, tmp_path):
    record, out = run_experiment("small_data")
    assert record["size"] == "smoke"
    data = record["data"]
    assert data["settings"] == {"folders": ["d2x75"], "archs": ["lenet5"], "seeds": [0],
                                "epochs": 1}  # fmt: skip
    assert data["threshold"] == 0.95

    # The folder it trained on is the one drawn here again, byte for byte.
    (folder,) = data["folders"]
    work = out.parent / "work"
    assert folder["path"] == str(work / "folders" / "d2x75") and folder["images"] == 150
    again = small_data.make_folder(small_data.FOLDERS["d2x75"], tmp_path)
    assert folder["sha256"] == small_data.folder_digest(again)

    # What a user types, and the numbers from the files the trainer wrote.
    (run,) = data["runs"]
    workdir = work / "runs" / "d2x75-lenet5-seed0"
    assert run["command"] == (
        f"python -m flaxcnn.train --arch lenet5 --dataset folder:{work / 'folders' / 'd2x75'} "
        f"--epochs 1 --seed 0 --workdir {workdir} --data-dir {work / 'data'} --no-progress"
    )
    assert run["exit_code"] == 0 and run["error"] is None and run["wall_sec"] > 0
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in logged if r["split"] == "test"][-1]
    assert run["test_accuracy"] == test["accuracy"] and run["test_epoch"] == 1
    config = json.loads((workdir / "config.json").read_text())
    for key in ("batch_size", "peak_lr", "augment", "lr", "lr_min_batch", "image_size"):
        assert run["config"][key] == config[key], key
    assert run["config"]["batch_size_chosen"] is True  # no --batch-size: the trainer chose
    splits = {k: config["data"][k] for k in ("num_train", "num_val", "num_test")}
    assert {k: run["data"][k] for k in splits} == splits
    assert sum(splits.values()) == 150 and folder["splits"]["num_test"] == splits["num_test"]
    assert not (workdir / "checkpoints").exists()  # deleted; the metrics stay

    # The cell, the verdict and the page all say what the run measured.
    (cell,) = data["cells"]
    accuracy = run["test_accuracy"]
    assert cell["mean"] == cell["min"] == accuracy
    assert cell["met"] == (accuracy >= 0.95 - small_data.TOLERANCE)
    assert data["verdict"] == small_data.verdict(data["cells"], 1)
    page = (out / "small_data.md").read_text()
    split_text = f"{splits['num_train']} / {splits['num_val']} / {splits['num_test']}"
    assert f"| d2x75 | digits | 3, 8 | 150 | {split_text} | {small_data.cell_text(cell)} |" in page
    c = run["config"]
    assert (
        f"| d2x75 | {splits['num_train']} | {c['batch_size']} | {c['steps_per_epoch']} | "
        f"{c['lr']:g} | {c['lr_min_batch']} | {c['peak_lr']:g} | {c['augment']} | "
        f"{c['image_size']}x{c['image_size']}x1 |"
    ) in page
    assert data["verdict"] in page and "python experiments/small_data.py --full" in page
    assert (out / "small_data.png").stat().st_size > 10_000

"""A user's small folder of images: a batch that gives every epoch real steps, corrupt files
skipped from the command line, and no top-5 accuracy where it cannot mean anything."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxcnn import evaluate
from flaxcnn.training import TrainConfig, UsageError, console, optim, train
from flaxcnn.training.resolve import SMALL_SPLIT, default_batch_size, prepare, resolved_config


@pytest.mark.parametrize(
    "num_train, devices, expected",
    [
        (50_000, 1, 128),  # CIFAR: the usual 128
        (1293, 1, 64),  # the digits less validation: 20 steps, where 128 would give 10
        (1293, 8, 64),
        (600, 1, 16),  # 37 steps, where 32 would give 18
        (144, 1, 8),  # 180 images, 20% held out: 18 steps (8 is the floor)
        (144, 3, 6),  # a multiple of the device count
        (20, 4, 8),  # never below 8 (2 steps): fewer would be all noise
    ],
)
def test_default_batch_size_gives_an_epoch_real_steps(num_train, devices, expected):
    assert default_batch_size(num_train, devices) == expected


def digit_folder(root: Path, classes=(0, 1, 7), per_class=60) -> Path:
    """Real images: the scikit-learn digits of three classes, as 32x32 PNGs, one folder each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in classes:
        (root / str(label)).mkdir(parents=True)
        images = digits.images[digits.target == label][:per_class]
        for i, image in enumerate(images):
            pixels = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).save(
                root / str(label) / f"{i}.png"
            )
    return root


def header_line(setup, name: str) -> str:
    return next(line for line in console.header(setup, None) if line.startswith(f"  {name}"))


def test_a_small_folder_gets_a_batch_that_gives_real_steps(digits_data_dir, tmp_path):
    """The rule as the trainer resolves it for 180 real images (no run needed; 36 of them
    test images, 14 validation images): batch 8 at the learning rate of a batch of 64,
    without random crops, said in the header, stored; a batch the user asks for that the
    data cannot fill stays an error, nothing written."""
    folder = digit_folder(tmp_path / "imgs")
    cfg = TrainConfig(
        arch="simple_cnn", dataset=f"folder:{folder}", data_dir=str(digits_data_dir),
        workdir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    setup = prepare(cfg)
    assert (setup.batch_size, setup.batch_size_chosen, setup.steps_per_epoch) == (8, True, 16)
    assert setup.optimizer.peak_lr == pytest.approx(0.1 * 64 / 256)  # not 0.1 * 8 / 256
    assert setup.config.augment == "none"  # a folder's own default, crop+flip, above 1,280
    batch_line = header_line(setup, "batch")
    assert "8 global" in batch_line and "chosen for 130 training images" in batch_line, batch_line
    assert "lr 0.025 (= base x 64/256: a batch below 64 takes its rate)" in header_line(
        setup, "optimizer"
    )
    assert header_line(setup, "augment").endswith(
        "none (the default under 1280 training images; --augment to change)"
    )
    stored = resolved_config(setup)
    assert stored["batch_size_chosen"] is True and stored["lr_min_batch"] == 64
    assert stored["augment"] == "none" and stored["peak_lr"] == pytest.approx(0.025)
    # A run from before the floor (its config.json without lr_min_batch) resumes as it ran:
    # scaled linearly all the way down.
    del stored["lr_min_batch"]
    old = prepare(dataclasses.replace(cfg, augment=stored["augment"]), stored)
    assert old.optimizer.peak_lr == pytest.approx(0.1 * 8 / 256)
    assert "lr 0.003125 (= base x 8/256)" in header_line(old, "optimizer")
    # Given explicitly, the augmentation is the user's, whatever the split's size.
    assert prepare(dataclasses.replace(cfg, augment="crop")).config.augment == "crop"
    # --help says the rule with the trainer's own numbers.
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    assert f"none for a training split of fewer than {SMALL_SPLIT} images" in helps["augment"]
    assert f"down to a batch of {optim.LR_MIN_BATCH}, whose rate" in helps["lr"]
    too_big = TrainConfig(**{**cfg.__dict__, "batch_size": 256})
    with pytest.raises(UsageError, match="larger than the training split"):
        prepare(too_big)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_small_folder_trains_well_with_the_defaults(digits_data_dir, tmp_path):
    """With no setting but 10 epochs (evaluated and saved at the end only: what is trained
    is the same), as issue 21 asks; experiments/small_data.py measures more folders."""
    folder = digit_folder(tmp_path / "imgs")
    cfg = TrainConfig(
        arch="simple_cnn", dataset=f"folder:{folder}", data_dir=str(digits_data_dir),
        workdir=str(tmp_path / "run"), progress=False, epochs=10, eval_every=10,
        checkpoint_every=10 * 16,
    )  # fmt: skip
    test = train(cfg, out=lambda line: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["batch_size"] == 8 and saved["batch_size_chosen"] is True
    assert test["accuracy"] >= 0.95, test

    # Three classes: top-5 would always be 1, so it is reported nowhere.
    assert "top5_accuracy" not in test
    result = evaluate.evaluate_workdir(tmp_path / "run")
    assert result["top5"] is None
    assert not any("top-5" in line for line in evaluate.report(result))


@pytest.mark.slow
def test_skip_corrupt_from_the_command_line(digits_data_dir, tmp_path, capsys, monkeypatch):
    from flaxcnn import train as cli

    monkeypatch.setenv("TFDS_DATA_DIR", str(digits_data_dir))
    folder = digit_folder(tmp_path / "imgs", per_class=12)
    (folder / "1" / "broken.png").write_bytes(b"not a png at all")
    argv = ["--arch", "lenet5", "--dataset", f"folder:{folder}", "--epochs", "1", "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--workdir", str(tmp_path / "a")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0] and "--skip-corrupt" in err[0], err

    cli.main([*argv, "--workdir", str(tmp_path / "b"), "--skip-corrupt"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test accuracy: ")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["skip_corrupt"] is True

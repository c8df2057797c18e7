"""`flaxcnn.predict`: top-k classes of image files from a run's checkpoint.

Two run directories: one trained for real (the session's LeNet-5 run on the digits, whose
predictions must equal the logits the data pipeline gives on the same test examples), and
one "converted-like" (random ResNet-18 variables saved with the metadata torchvision's
ImageNet weights get: 1000 WordNet ids, English descriptions, Resize(256)/CenterCrop(224)),
made without training. Both are only read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from flaxcnn import cli, convert, data, imagenet
from flaxcnn import predict as pr
from flaxcnn.training.build import Network
from flaxcnn.training.checkpoint import Checkpoints
from flaxcnn.training.rundir import RunDir, write_json_atomic

REPO = Path(__file__).resolve().parents[1]
NUM_DIGITS = 6  # test examples predicted from PNG files


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and modification time."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def save_run(workdir: Path, variables: dict, meta: dict, config: dict | None = None) -> Path:
    """A run directory holding one checkpoint (step 0) of `variables`, written as the
    trainer writes checkpoints, but without training."""
    workdir.mkdir(parents=True)
    ckpts = Checkpoints(workdir / "checkpoints", keep=1)
    try:
        ckpts.save(0, variables, {}, meta, None)
    finally:
        ckpts.close()
    write_json_atomic(workdir / "config.json", config or {"arch": meta["arch"]})
    return workdir


def random_image(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Smooth colour gradients plus noise: every resampling detail shows."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], -1
    )
    noisy = base[..., :channels] + rng.integers(-40, 41, (height, width, channels))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir(digits_data_dir) -> Iterator[Path]:
    """The session's prepared digits, also the default TFDS directory while this module runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(digits_data_dir))
        yield digits_data_dir


@pytest.fixture(scope="module")
def lenet_run(data_dir, own_finished_run) -> Path:
    """The session's finished LeNet-5 run on the digits, copied for this module (read
    only)."""
    return own_finished_run


@pytest.fixture(scope="module")
def digits(lenet_run, tmp_path_factory) -> dict:
    """The first test examples as PNG files, and the logits the run's network gives them
    through the data pipeline (`data.eval_batches`, as evaluation reads them)."""
    _, meta, variables = RunDir(lenet_run).restore_variables()
    dataset = data.load(meta["dataset"])
    batches = data.eval_batches(
        dataset,
        global_batch_size=16,
        image_size=meta["image_size"],
        channels=meta["in_channels"],
        process_index=0,
        process_count=1,
    )
    batch = next(iter(batches))
    model = Network.from_meta(meta).create()
    logits = np.asarray(
        jax.jit(model.apply, static_argnames="train")(variables, batch["image"], train=False)
    )
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i in range(NUM_DIGITS):
        example = dataset.test[i]
        path = folder / f"digit-{i}-label-{example['label']}.png"
        Image.fromarray(example["image"][..., 0]).save(path)
        paths.append(path)
    return {
        "paths": paths,
        "logits": logits[:NUM_DIGITS],
        "class_names": [str(c) for c in meta["class_names"]],
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Lossless image files of the shapes photos come in."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("photos")
    shapes = {
        "landscape": (300, 451, 3),
        "portrait": (517, 289, 3),
        "small": (61, 90, 3),  # upscaled to 256 on its shorter side
        "grayscale": (250, 333, 1),
    }
    paths = {}
    for name, (h, w, c) in shapes.items():
        pixels = random_image(rng, h, w, c)
        paths[name] = folder / f"{name}.png"
        Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory) -> dict:
    """Random ResNet-18 variables written as `flaxcnn.convert` writes converted weights."""
    network = Network(arch="resnet18", num_classes=1000, image_size=224, in_channels=3)
    model = network.create()
    # The parameters do not depend on the input's size: initialise at 32x32, much faster.
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False
    )
    variables = jax.tree.map(np.asarray, dict(variables))
    folder = tmp_path_factory.mktemp("runs")
    source = folder / "resnet18.pth"  # only named and hashed in the metadata
    source.write_bytes(b"weights")
    workdir = convert.write_run(folder / "resnet18-imagenet", "resnet18", variables, {}, source)
    _, meta, _ = RunDir(workdir).restore_variables()
    assert meta["class_descriptions"] == imagenet.class_names()
    assert meta["preprocessing"] == imagenet.preprocessing()
    return {"workdir": workdir, "model": model, "variables": variables, "meta": meta}


# ------------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", ["landscape", "portrait", "small", "grayscale"])
def test_preprocess_equals_torchvision_resize_center_crop(photos, name):
    pytest.importorskip("torch", reason="torch is not installed (the torch extra)")
    transforms = pytest.importorskip(
        "torchvision.transforms", reason="torchvision is not installed (the torch extra)"
    )
    preprocessing = imagenet.preprocessing()
    reference = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )
    with Image.open(photos[name]) as image:
        expected = reference(image.convert("RGB")).permute(1, 2, 0).numpy()
    image = pr.load_image(photos[name])
    assert image.shape[2] == (1 if name == "grayscale" else 3)
    got = pr.preprocess(image, preprocessing, channels=3)
    assert got.dtype == np.float32 and got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_center_crop_larger_than_the_image_pads_as_torchvision(photos):
    pytest.importorskip("torch", reason="torch is not installed (the torch extra)")
    transforms = pytest.importorskip(
        "torchvision.transforms", reason="torchvision is not installed (the torch extra)"
    )
    preprocessing = {"resize": 33, "crop": 48, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25]}
    reference = transforms.Compose(
        [
            transforms.Resize(33),
            transforms.CenterCrop(48),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )
    with Image.open(photos["landscape"]) as image:
        expected = reference(image.convert("RGB")).permute(1, 2, 0).numpy()
    got = pr.preprocess(pr.load_image(photos["landscape"]), preprocessing, channels=3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_preprocess_with_equal_sides_is_the_training_square(photos):
    from flaxcnn.data.imaging import match_channels, resize_square

    image = pr.load_image(photos["portrait"])
    preprocessing = {"resize": 40, "crop": 40, "mean": [0.3], "std": [0.2]}
    got = pr.preprocess(image, preprocessing, channels=1)
    square = match_channels(resize_square(image, 40), 1).astype(np.float32)
    np.testing.assert_allclose(got, (square / 255 - 0.3) / 0.2, rtol=0, atol=1e-5)
    assert got.shape == (40, 40, 1)


def test_preprocess_refuses_unusable_metadata():
    image = np.zeros((10, 12, 3), np.uint8)
    good = {"resize": 8, "crop": 8, "mean": [0.5] * 3, "std": [0.2] * 3}
    for bad, words in [
        ({**good, "mean": [0.5]}, "1 mean value(s) for 3 input channel(s)"),
        ({**good, "std": [0.2, 0.0, 0.2]}, "positive standard deviations"),
        ({**good, "crop": 0}, "positive integers"),
        ({k: v for k, v in good.items() if k != "resize"}, "lacks resize"),
    ]:
        with pytest.raises(cli.UsageError, match="preprocessing metadata") as info:
            pr.preprocess(image, bad, channels=3)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_load_image_modes_and_orientation(tmp_path):
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    cases = {
        "rgba.png": Image.fromarray(rgb).convert("RGBA"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "gray.png": Image.fromarray(rgb).convert("L"),
        "gray-alpha.png": Image.fromarray(rgb).convert("LA"),
        "sixteen.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
    for name in ("rgba.png", "palette.png", "cmyk.jpg"):
        got = pr.load_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (4, 6, 3), name
    np.testing.assert_array_equal(pr.load_image(tmp_path / "rgba.png"), rgb)
    for name in ("gray.png", "gray-alpha.png", "sixteen.png"):
        got = pr.load_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (4, 6, 1), name
    np.testing.assert_array_equal(pr.load_image(tmp_path / "sixteen.png")[..., 0], rgb[..., 0])
    # A photo taken with the camera turned: shown (and classified) upright.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    assert pr.load_image(tmp_path / "turned.jpg").shape == (6, 4, 3)


def test_load_image_refuses_what_is_not_an_image(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture\n")
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:80])
    for path in (text, truncated, tmp_path / "missing.png", tmp_path):
        with pytest.raises(cli.UsageError) as info:
            pr.load_image(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, message


# ------------------------------------------------------------------------------- predictions


@pytest.mark.slow
def test_converted_weights_give_the_softmax_of_the_network(imagenet_run, photos):
    images = [photos["landscape"], photos["grayscale"]]
    results = pr.predict(imagenet_run["workdir"], images, top=5)
    model, meta = imagenet_run["model"], imagenet_run["meta"]
    inputs = np.stack([pr.preprocess(pr.load_image(p), meta["preprocessing"], 3) for p in images])
    logits = jax.jit(model.apply, static_argnames="train")(
        imagenet_run["variables"], inputs, train=False
    )
    expected = softmax(np.asarray(logits))
    descriptions = imagenet.class_names()
    assert len(results) == 2
    for got, probs in zip(results, expected, strict=True):
        assert len(got) == 5
        order = np.argsort(-probs, kind="stable")[:5]
        assert [name for name, _ in got] == [descriptions[i] for i in order]
        np.testing.assert_allclose([p for _, p in got], probs[order], rtol=0, atol=1e-5)
        shown = [p for _, p in got]
        assert shown == sorted(shown, reverse=True)
        assert not any(name.startswith("n0") for name, _ in got)  # not the WordNet ids


def test_trained_run_agrees_with_the_data_pipeline(lenet_run, digits):
    results = pr.predict(lenet_run, digits["paths"], top=10, batch_size=4)  # two batches
    names = digits["class_names"]
    for got, logits in zip(results, digits["logits"], strict=True):
        assert got[0][0] == names[int(np.argmax(logits))]
        probs = dict(got)
        assert sorted(probs) == sorted(names)
        expected = softmax(logits)
        np.testing.assert_allclose([probs[n] for n in names], expected, rtol=0, atol=1e-5)
        assert abs(sum(probs.values()) - 1) < 1e-5


def test_older_checkpoint_uses_the_data_set_normalisation(lenet_run, digits, tmp_path):
    _, meta, variables = RunDir(lenet_run).restore_variables()
    older = {k: v for k, v in meta.items() if k != "preprocessing"}
    config = json.loads((lenet_run / "config.json").read_text())
    workdir = save_run(tmp_path / "older", variables, older, config)
    results = pr.predict(workdir, digits["paths"][:2], top=10)
    for got, logits in zip(results, digits["logits"][:2], strict=True):
        probs = dict(got)
        expected = softmax(logits)
        np.testing.assert_allclose(
            [probs[n] for n in digits["class_names"]], expected, rtol=0, atol=1e-5
        )
    # ...and says so in one line when that data set cannot be loaded.
    lost = save_run(tmp_path / "lost", variables, {**older, "dataset": "no_such_dataset_here"})
    with pytest.raises(cli.UsageError, match=r"no_such_dataset_here.*cannot be loaded") as info:
        pr.predict(lost, digits["paths"][:1])
    assert "\n" not in str(info.value)


def test_library_refuses_bad_top_and_unknown_architecture(lenet_run, digits, tmp_path):
    with pytest.raises(cli.UsageError, match="--top must be at least 1"):
        pr.predict(lenet_run, digits["paths"][:1], top=0)
    with pytest.raises(cli.UsageError, match="more than the checkpoint's 10 classes"):
        pr.predict(lenet_run, digits["paths"][:1], top=11)
    _, meta, variables = RunDir(lenet_run).restore_variables()
    strange = save_run(tmp_path / "strange", variables, {**meta, "arch": "lenet6"})
    with pytest.raises(cli.UsageError, match="lenet6"):
        pr.predict(strange, digits["paths"][:1])


# ------------------------------------------------------------------------------- command line


def test_cli_prints_top_classes_and_json(lenet_run, digits, capsys):
    before = snapshot(lenet_run)
    images = [str(p) for p in digits["paths"][:2]]
    pr.main(["--workdir", str(lenet_run), "--top", "3", *images])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 4
    expected = pr.predict(lenet_run, images, top=3)
    for i, path in enumerate(images):
        header, *rows = lines[4 * i : 4 * i + 4]
        assert header == path
        assert rows == [f"  {p:.4f}  {name}" for name, p in expected[i]]

    pr.main(["--workdir", str(lenet_run), "--json", "--top", "2", *images])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in records] == images
    for record, classes in zip(records, expected, strict=True):
        assert [t["class"] for t in record["top"]] == [name for name, _ in classes[:2]]
        got = [t["probability"] for t in record["top"]]
        np.testing.assert_allclose(got, [p for _, p in classes[:2]], rtol=0, atol=1e-6)
    assert snapshot(lenet_run) == before  # writes nothing


def test_cli_bad_input_is_one_line_and_exit_code_2(lenet_run, digits, data_dir, tmp_path, capsys):
    text = tmp_path / "photo.jpg"
    text.write_text("this is text\n")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    image = str(digits["paths"][0])
    run = str(lenet_run)
    cases = {
        "missing image": (["--workdir", run, str(tmp_path / "nope.png")], "nope.png"),
        "text file": (["--workdir", run, str(text)], "photo.jpg"),
        "missing workdir": (["--workdir", str(tmp_path / "gone"), image], "does not exist"),
        "no checkpoints": (["--workdir", str(empty), image], "has no checkpoint"),
        "top 0": (["--workdir", run, "--top", "0", image], "--top"),
        "top too many": (["--workdir", run, "--top", "11", image], "10 classes"),
        "unknown step": (["--workdir", run, "--step", "999", image], "no checkpoint at step 999"),
    }
    before = snapshot(lenet_run), sorted(p.name for p in tmp_path.iterdir())
    for name, (argv, message) in cases.items():  # main(), as `python -m` runs it
        with pytest.raises(SystemExit) as exit_:
            pr.main(argv)
        out, err = capsys.readouterr()
        assert exit_.value.code == cli.EXIT_BAD_INPUT, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert message in err and out == "", (name, err, out)
    # One as a real process: the exit status, and nothing else on stderr.
    argv, message = cases["text file"]
    proc = subprocess.run(
        [sys.executable, "-m", "flaxcnn.predict", *argv], cwd=REPO, text=True,
        capture_output=True, env={**os.environ, "TFDS_DATA_DIR": str(data_dir)}, timeout=180,
    )  # fmt: skip
    assert proc.returncode == cli.EXIT_BAD_INPUT, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and proc.stdout == ""
    assert (snapshot(lenet_run), sorted(p.name for p in tmp_path.iterdir())) == before


def test_importing_the_command_loads_neither_jax_nor_the_data_layer():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from flaxcnn import predict; "
            "print('jax' in sys.modules, 'flaxcnn.data' in sys.modules)",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.split() == ["False", "False"], proc.stderr


def test_a_network_with_fewer_classes_than_the_default_top_shows_them_all(
    lenet_run, digits, tmp_path, capsys
):
    """The usual first folder has 2 or 3 classes: `predict` shows all of them by default
    (it used to refuse, asking for --top); an explicit --top beyond them is still refused."""
    _, meta, variables = RunDir(lenet_run).restore_variables()
    variables = jax.tree.map(np.asarray, variables)
    params = variables["params"]
    output = next(n for n in params if params[n].get("bias", np.zeros(0)).shape == (10,))
    params[output] = {"kernel": params[output]["kernel"][:, :3], "bias": params[output]["bias"][:3]}
    names = ["circle", "square", "triangle"]
    meta = {**meta, "num_classes": 3, "class_names": names}
    three = save_run(tmp_path / "three", variables, meta)
    results = pr.predict(three, digits["paths"][:2])
    assert [sorted(name for name, _ in r) for r in results] == [names, names]
    assert all(sum(p for _, p in r) == pytest.approx(1.0, abs=1e-5) for r in results)
    pr.main(["--workdir", str(three), str(digits["paths"][0])])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and sorted(line.split()[-1] for line in printed[1:]) == names
    with pytest.raises(cli.UsageError, match="--top 4 is more than the checkpoint's 3 classes"):
        pr.predict(three, digits["paths"][:1], top=4)


def test_weights_of_another_architecture_are_refused_in_one_line(lenet_run, digits, tmp_path):
    """A checkpoint whose metadata names another network than its weights (a legacy or a
    hand-edited one) used to end in Flax's ScopeParamNotFoundError traceback."""
    from flaxcnn import evaluate

    _, meta, variables = RunDir(lenet_run).restore_variables()
    other = save_run(tmp_path / "other", variables, {**meta, "arch": "simple_cnn"})
    with pytest.raises(cli.UsageError, match="do not fit a simple_cnn network") as error:
        pr.predict(other, digits["paths"][:1])
    assert "\n" not in str(error.value)
    with pytest.raises(cli.UsageError, match="do not fit a simple_cnn network"):
        evaluate.evaluate_workdir(other)

"""Fine-tuning converted torchvision weights: the whole network, or only the classifier.

The source is torchvision's resnet18 with its own random initialisation and perturbed
BatchNorm statistics (nothing may be downloaded), converted by `flaxcnn.convert` into a
run directory, then trained on small folders of images with `--init-from`, as a user would
with the real ImageNet weights. `--freeze-backbone` must leave every loaded parameter and
statistic exactly as converted, and train the new classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="converting torchvision weights needs the torch extra: "
    "pip install 'flaxcnn[torch]'"
)  # fmt: skip
torchvision = pytest.importorskip("torchvision", reason="needs torchvision (the torch extra)")

from flaxcnn import convert  # noqa: E402
from flaxcnn import train as train_cli  # noqa: E402
from flaxcnn.cli import UsageError  # noqa: E402
from flaxcnn.training import TrainConfig, train  # noqa: E402
from flaxcnn.training.rundir import RunDir  # noqa: E402

pytestmark = pytest.mark.slow

SIZE = 65  # above the small-input limit (64): torchvision's own 7x7/2 stem, loaded as is


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(value) for path, value in leaves}


@pytest.fixture
def converted(once_per_run) -> Path:
    """A run directory of torchvision resnet18 weights with BatchNorm statistics estimated
    as training would (here over random images), so not the initial ones; converted once
    per test run. Read it only."""
    return Path(once_per_run("converted-resnet18", convert_resnet18))


def convert_resnet18(directory: Path) -> str:
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the running statistics become plain averages
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(16, 3, SIZE, SIZE))
    net.eval()
    state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
    variables = convert.from_torchvision("resnet18", state_dict)
    source = directory / "resnet18.pth"
    torch.save(net.state_dict(), source)
    out = directory / "resnet18-imagenet"
    options = convert.model_options("resnet18", state_dict)
    convert.write_run(out, "resnet18", variables, options, source)
    return str(out)


@pytest.fixture
def data_dir(digits_data_dir, monkeypatch) -> Path:
    monkeypatch.setenv("TFDS_DATA_DIR", str(digits_data_dir))
    return digits_data_dir


def fine_tune(converted: Path, workdir: Path, out=lambda line: None, **settings) -> dict:
    settings = {"epochs": 1, "dataset": "digits", **settings}
    config = TrainConfig(
        arch="resnet18", init_from=str(converted), image_size=SIZE,
        workdir=str(workdir), progress=False, **settings,
    )  # fmt: skip
    return train(config, out=out)


def image_folder(root: Path, pixels) -> str:
    """A folder data set of three classes of 16x16 RGB images, 16 each, `pixels(label, rng)`
    drawing one image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(3):
        (root / str(label)).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(pixels(label, rng)).save(root / str(label) / f"{i}.png")
    return f"folder:{root}"


def colour(label: int, rng: np.random.Generator) -> np.ndarray:
    """Reddish, greenish or bluish noise: a linear probe on any features tells them apart."""
    rgb = np.full(3, 40.0)
    rgb[label] = 200.0
    return np.clip(rgb + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)


def noise(label: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_frozen_backbone_trains_only_the_new_classifier(converted, data_dir, tmp_path):
    """Two epochs of 4 steps of 8 on 48 coloured images (10 of them test images), at a step
    size of 0.1 from the first step (the linear rule would give a batch of 8 only 0.003)."""
    lines: list[str] = []
    result = fine_tune(
        converted, tmp_path / "frozen", lines.append, freeze_backbone=True, epochs=2,
        dataset=image_folder(tmp_path / "imgs", colour), warmup_epochs=0.0, lr=3.2,
    )  # fmt: skip
    assert np.isfinite(result["loss"])
    assert "--init-from: re-initialised ['fc']['bias'], ['fc']['kernel'] (shape differs)" in lines
    assert any("backbone frozen" in line for line in lines)

    _, _, source = RunDir(converted).restore_variables()
    _, meta, tuned = RunDir(tmp_path / "frozen").restore_variables()
    assert meta["num_classes"] == 3 and tuned["params"]["fc"]["kernel"].shape == (512, 3)
    before, after = flat(source), flat(tuned)
    head = {"['params']['fc']['kernel']", "['params']['fc']['bias']"}
    assert set(after) == set(before)
    for name in sorted(set(after) - head):  # every loaded parameter and statistic, bit for bit
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert len(set(after) - head) == 100  # 20 convs, 20 BatchNorms: 60 parameters, 40 statistics
    config = json.loads((tmp_path / "frozen" / "config.json").read_text())
    assert config["freeze_backbone"] is True and config["init_from"] == str(converted)
    assert result["accuracy"] == 1.0, result  # the classifier learned (chance is 1/3)


def test_full_fine_tuning_moves_the_backbone(converted, data_dir, tmp_path):
    """A few steps on a small folder (48 images of noise) show it."""
    folder = image_folder(tmp_path / "imgs", noise)
    # The running averages suffice here (precise BN would compile one more program).
    result = fine_tune(converted, tmp_path / "full", dataset=folder, precise_bn=0)
    assert np.isfinite(result["loss"])
    _, _, source = RunDir(converted).restore_variables()
    _, _, tuned = RunDir(tmp_path / "full").restore_variables()
    before, after = flat(source), flat(tuned)
    conv = "['params']['layer1_0']['conv1']['kernel']"
    assert not np.array_equal(after[conv], before[conv])
    # It started from the converted weights: one epoch moves them only a little.
    change = np.linalg.norm(after[conv] - before[conv]) / np.linalg.norm(before[conv])
    assert change < 0.5
    stats = "['batch_stats']['bn1']['mean']"
    assert not np.array_equal(after[stats], before[stats])  # BatchNorm statistics re-estimated


def test_freezing_a_layer_the_source_cannot_provide_is_refused(converted, data_dir, tmp_path):
    # At 8x8 the small-input stem replaces the 7x7 conv1, which would stay random.
    config = TrainConfig(
        arch="resnet18", init_from=str(converted), freeze_backbone=True,
        workdir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"--freeze-backbone: conv1/kernel cannot come from"):
        train(config, out=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_freeze_backbone_needs_init_from(data_dir, tmp_path):
    config = TrainConfig(arch="resnet18", freeze_backbone=True, workdir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="--freeze-backbone needs --init-from"):
        train(config, out=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_a_converted_directory_is_not_resumed(converted, data_dir, capsys):
    before = sorted(p.relative_to(converted) for p in converted.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--arch", "resnet18", "--workdir", str(converted), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds converted weights, not a training run" in err[0]
    assert sorted(p.relative_to(converted) for p in converted.rglob("*")) == before

"""flaxcnn.report: the page of what a run's network sees, and the functions behind it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import evaluate, models, report
from flaxcnn.models import summary
from flaxcnn.training.rundir import RunDir

SECTIONS = (
    "1. The run",
    "2. Learning curves",
    "3. Where it goes wrong",
    "4. What the first layer learned",
    "5. What each stage sees",
    "6. Why it decides",
)
CHROMIUM_INSTALL = "apt-get install -y chromium"


class Tiny(nn.Module):
    """One convolution and a dense layer: Grad-CAM and saliency can be written out by hand."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
        x = nn.relu(x)
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


@pytest.mark.slow
def test_grad_cam_and_saliency_equal_the_gradients_written_out():
    model = Tiny()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
    variables = model.init(jax.random.key(1), jnp.asarray(images))
    found = report.anatomy(model, (1, 7, 6, 3))
    assert found.stages == (report.Layer("conv", "Conv", (5, 4, 4)),)
    assert found.first_conv == "conv"
    out = report.analyse_images(model, variables, images, found.stages, found.stages[-1])

    # The same network written directly, without Flax.
    kernel = variables["params"]["conv"]["kernel"]
    conv_bias = variables["params"]["conv"]["bias"]
    dense, dense_bias = variables["params"]["fc"]["kernel"], variables["params"]["fc"]["bias"]

    def conv(x):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + conv_bias

    def head(a):
        return jax.nn.relu(a).reshape(a.shape[0], -1) @ dense + dense_bias

    activation = np.asarray(conv(images))
    logits = np.asarray(head(activation))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(out["probs"], probs, rtol=1e-5, atol=1e-6)
    classes = np.argsort(-probs, axis=-1)[:, : report.TOP]
    np.testing.assert_array_equal(out["classes"], classes)
    np.testing.assert_allclose(out["maps"]["conv"], activation, rtol=1e-5, atol=1e-6)

    # Grad-CAM by hand: d logit_k / d a = the dense column of k, where the ReLU passes.
    w = np.asarray(dense).reshape(5, 4, 4, 5)
    for t in range(report.TOP):
        for n in range(2):
            k = classes[n, t]
            grad = w[..., k] * (activation[n] > 0)
            alpha = grad.mean(axis=(0, 1))
            cam = np.maximum((activation[n] * alpha).sum(-1), 0)
            cam = np.asarray(jax.image.resize(cam, (7, 6), "bilinear"))
            expected = cam / max(cam.max(), 1e-30)
            np.testing.assert_allclose(out["cam"][t, n], expected, rtol=1e-4, atol=1e-5)

    # Saliency: a separate jax.grad of the top class's logit of the direct network.
    for n in range(2):
        grad = jax.grad(lambda x, n=n: head(conv(x))[n, classes[n, 0]])(jnp.asarray(images))
        saliency = np.abs(np.asarray(grad[n])).max(-1)
        np.testing.assert_allclose(
            out["saliency"][n], saliency / saliency.max(), rtol=1e-4, atol=1e-6
        )

    # Contrast: the std over positions, averaged over channels, per image.
    np.testing.assert_allclose(
        out["contrast"]["conv"], activation.std(axis=(1, 2)).mean(-1), rtol=1e-5
    )
    assert out["share"]["conv"].shape == (2,) and np.all(out["share"]["conv"] <= 1 + 1e-6)


def test_stages_are_the_last_layer_at_each_resolution():
    lenet = report.anatomy(models.create("lenet5", num_classes=10), (1, 32, 32, 1))
    assert [s.name for s in lenet.stages] == ["c1", "c3"]
    assert [s.shape for s in lenet.stages] == [(28, 28, 6), (10, 10, 16)]
    resnet = report.anatomy(models.create("resnet20", num_classes=10), (1, 32, 32, 3))
    assert [s.name for s in resnet.stages] == ["layer1_2", "layer2_2", "layer3_2"]
    assert resnet.first_conv == "conv1"
    inner = report.pick_layers(resnet, ["layer2_0/conv1", "conv1"])
    assert [(layer.name, layer.shape) for layer in inner] == [
        ("layer2_0/conv1", (16, 16, 32)),
        ("conv1", (32, 32, 16)),
    ]
    with pytest.raises(report.cli.UsageError, match=r"no layer 'layer9' .* layer1_0"):
        report.pick_layers(resnet, ["layer9"])


# One of each family's code (deeper variants repeat the same modules), traced only; and one
# compiled and run (compiling GoogLeNet's analysis takes a minute on two cores, VGG-11's 20 s:
# both were run so by hand with COMPILED extended, and passed).
ABSTRACT = (
    "alexnet",
    "simple_cnn",
    "netresdeep",
    "plain20",
    "resnet34",
    "resnet50",
    "vgg19_bn",
    "vgg11",
    "googlenet",
)
COMPILED = ("resnet20",)


@pytest.mark.slow
@pytest.mark.parametrize("name", ABSTRACT + COMPILED)
def test_every_family_is_analysed(name):
    """The layers are found and Grad-CAM reaches the last stage: traced only (jax.eval_shape)
    for most, compiled and run on random weights for one, at their smallest input."""
    spec = models.get_spec(name)
    size = max(spec.min_size, 8 if name in COMPILED else 32)
    model = models.create(name, num_classes=7)
    shape = (2, size, size, spec.in_channels)
    found = report.anatomy(model, shape)
    assert found.stages and found.first_conv
    if name in COMPILED:
        rng = np.random.default_rng(0)  # random weights, no initialiser to compile (|.|: the
        # BatchNorm variances must be positive)
        variables = jax.tree.map(
            lambda a: np.abs(rng.normal(0, 0.1, a.shape)).astype(np.float32),
            summary.init_shapes(model, shape),
        )
        images = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        out = report.analyse_images(model, variables, images, found.stages, found.stages[-1])
        assert np.isfinite(out["cam"]).all() and np.isfinite(out["saliency"]).all()
        assert out["cam"].max() == pytest.approx(1.0) or out["cam"].max() == 0
    else:
        variables = summary.init_shapes(model, shape)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        out = jax.eval_shape(
            report.make_analyse(model, found.stages, found.stages[-1]), variables, x
        )
    assert out["cam"].shape == (report.TOP, 2, size, size)
    assert out["saliency"].shape == (2, size, size)
    for stage in found.stages:
        assert out["maps"][stage.name].shape == (2, *stage.shape)


def restored(workdir):
    _, meta, variables = RunDir(workdir).restore_variables()
    return meta, variables, evaluate.build_model(meta, variables)


@pytest.mark.slow
def test_feature_maps_have_the_layers_shapes_in_float32_and_bfloat16(finished_run):
    meta, variables, model = restored(finished_run)
    assert RunDir(finished_run).read_config()["devices"] > 1  # trained data-parallel
    dataset = evaluate.load_test_split(meta, RunDir(finished_run).read_config()["data_dir"])
    images, _ = report.first_test_images(dataset, 32, 1, 3)
    found = report.anatomy(model, (1, 32, 32, 1))
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = models.create("lenet5", num_classes=10, dtype=dtype)
        out[dtype] = report.analyse_images(model, variables, images, found.stages, found.stages[-1])
        for stage in found.stages:
            assert out[dtype]["maps"][stage.name].shape == (3, *stage.shape)
            assert out[dtype]["maps"][stage.name].dtype == np.float32
        assert np.isfinite(out[dtype]["cam"]).all() and np.isfinite(out[dtype]["saliency"]).all()
    np.testing.assert_allclose(out["bfloat16"]["probs"], out["float32"]["probs"], atol=0.03)
    # The grid: a row per layer, its most varied channels side by side, each the layer's
    # spatial shape, scaled to its own range.
    maps = {s.name: out["float32"]["maps"][s.name][0] for s in found.stages}
    figure = report.feature_maps_figure(images[0, ..., 0], maps)
    pictures = [np.ma.filled(ax.images[0].get_array(), np.nan) for ax in figure.axes]
    assert [p.shape for p in pictures] == [(32, 32), (28, 6 * 29 - 1), (10, 16 * 11 - 1)]
    c3 = maps["c3"]
    order = report.most_varied(c3)
    assert sorted(order) == list(range(16)) and c3[..., order[0]].std() >= c3[..., order[-1]].std()
    second = pictures[2][:, 11:21]  # the second tile: the second most varied channel
    channel = c3[..., order[1]]
    np.testing.assert_allclose(second, (channel - channel.min()) / np.ptp(channel), atol=1e-6)
    assert np.isnan(pictures[2][:, 10]).all()  # a blank column between tiles


def test_test_split_matches_evaluate_and_the_gallery_is_the_most_confident_mistakes(
    finished_run,
):
    meta, variables, model = restored(finished_run)
    config = RunDir(finished_run).read_config()
    dataset = evaluate.load_test_split(meta, config["data_dir"])
    test = report.classify_test_split(model, variables, dataset, meta, batch_size=100, keep=5)
    expected = evaluate.evaluate_workdir(finished_run)
    np.testing.assert_array_equal(test["confusion_matrix"], expected["confusion_matrix"])
    assert len(test["label"]) == 360  # every test digit once, padding masked out

    wrong = np.flatnonzero(test["pred"] != test["label"])
    confidence = test["top_probs"][:, 0]
    idx = test["wrong_index"]
    assert len(idx) == min(5, len(wrong)) > 0
    assert set(idx) <= set(wrong)
    assert list(confidence[idx]) == sorted(confidence[idx], reverse=True)
    assert confidence[idx].min() >= np.sort(confidence[wrong])[::-1][len(idx) - 1]
    everything, labels = report.first_test_images(dataset, 32, 1, 360)
    np.testing.assert_array_equal(labels, test["label"])
    np.testing.assert_array_equal(test["wrong_images"], everything[idx])

    pairs = report.confused_pairs(test["confusion_matrix"], 3)
    off = test["confusion_matrix"] - np.diag(np.diag(test["confusion_matrix"]))
    assert [c for _, _, c in pairs] == sorted(off.ravel())[::-1][:3]
    assert all(i != j and off[i, j] == c for i, j, c in pairs)


def test_filter_measures():
    same = np.ones((3, 2, 2, 1))
    assert report.filter_measures(same)["mean_abs_cosine"] == pytest.approx(1.0)
    orthogonal = np.eye(4).reshape(4, 2, 2, 1)
    measures = report.filter_measures(orthogonal, initial=2 * orthogonal)
    assert measures["mean_abs_cosine"] == 0 and measures["init_mean_abs_cosine"] == 0
    assert measures["moved"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def lenet_page(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "page"
    image = out.parent / "three.png"
    from PIL import Image

    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))).save(image)
    report.main(["--workdir", str(finished_run), str(image), "--out", str(out)])
    return out


@pytest.mark.slow
def test_page_has_the_six_sections_and_its_pictures(lenet_page):
    page = (lenet_page / "index.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == list(SECTIONS)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(p.name for p in lenet_page.glob("*.png"))
    assert {
        "curves.png",
        "confusion.png",
        "wrong.png",
        "filters.png",
        "maps1.png",
        "contrast.png",
        "decision1.png",
    } <= set(sources)
    assert "three.png" in page and "Grad-CAM" in page
    assert not list(lenet_page.glob(".*"))  # no temporary file left
    # Which checkpoint, and why; the splits as the run made them.
    assert "the best validation accuracy of the run (" in page
    assert "1293 train, 144 validation, 360 test" in page


def run_main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        report.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_exit_2_and_nothing_written(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert "does not exist" in run_main(
        ["--workdir", str(tmp_path / "nope"), "--out", str(out)], capsys
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no checkpoint" in run_main(["--workdir", str(empty)], capsys)
    assert list(empty.iterdir()) == []
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert str(bad) in run_main(
        ["--workdir", str(finished_run), str(bad), "--out", str(out)], capsys
    )
    err = run_main(["--workdir", str(finished_run), "--layers", "c1,c9", "--out", str(out)], capsys)
    assert "no layer 'c9'" in err and "c1, c3" in err
    assert "--max-images" in run_main(["--workdir", str(finished_run), "--max-images", "0"], capsys)
    assert not out.exists() and not (finished_run / report.DEFAULT_DIR).exists()


# ------------------------------------------------------------------------------- a browser


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (fds 3 and 4, messages
    ending in NUL), with only the standard library."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1300,900",
            "about:blank",
        ]
        # bash (dash takes no fd above 9) puts the pipes on fds 3 and 4, where Chromium
        # expects them (no preexec_fn: a fork of a process running JAX's threads must not
        # run Python).
        redirect = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.process = subprocess.Popen(
            ["bash", "-c", redirect, binary, *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer = b""
        self.events: list[dict] = []
        self.next_id = 0

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def receive(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.from_chrome], [], [], deadline - time.monotonic())
            assert ready, "no answer from chromium"
            chunk = os.read(self.from_chrome, 1 << 20)
            assert chunk, "chromium closed the pipe"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_for(self, method: str) -> dict:
        while True:
            found = [e for e in self.events if e.get("method") == method]
            if found:
                return found[0]
            self.events.append(self.receive())

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)


def load_in_browser(page: Path, screenshot: Path, profile: Path) -> tuple[list[dict], list]:
    """Open `page` from disk in headless Chromium: every <img>'s state, the errors logged
    (console errors, uncaught exceptions, failed loads), and a full-page screenshot."""
    tools = DevTools(chromium(), profile)
    try:
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable", session)
        tools.send("Page.navigate", session, url=page.resolve().as_uri())
        tools.wait_for("Page.loadEventFired")
        images = tools.send(
            "Runtime.evaluate",
            session,
            returnByValue=True,
            expression="[...document.images].map(i => ({src: i.getAttribute('src'), "
            "complete: i.complete, width: i.naturalWidth}))",
        )["result"]["value"]
        shot = tools.send(
            "Page.captureScreenshot", session, format="png", captureBeyondViewport=True
        )
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = [
            e
            for e in tools.events
            if e.get("method") == "Runtime.exceptionThrown"
            or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
            or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]
    finally:
        tools.close()
    return images, errors


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason=f"needs Debian's chromium: {CHROMIUM_INSTALL}")
def test_a_real_browser_shows_every_picture_and_logs_no_error(lenet_page, tmp_path):
    screenshot = tmp_path / "page.png"
    images, errors = load_in_browser(lenet_page / "index.html", screenshot, tmp_path / "profile")
    assert errors == []
    assert len(images) == len(list(lenet_page.glob("*.png"))) >= 8
    assert all(i["complete"] and i["width"] > 0 for i in images), images
    from PIL import Image

    with Image.open(screenshot) as shot:
        width, height = shot.size
        assert width >= 1000 and height > 3000  # the whole page, not the window
        assert len(shot.convert("L").getcolors(1 << 16) or []) > 50  # pictures, not a blank


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason=f"needs Debian's chromium: {CHROMIUM_INSTALL}")
def test_the_browser_check_sees_a_broken_picture(lenet_page, tmp_path):
    """The check above can fail: a page whose picture is missing fails it."""
    broken = tmp_path / "broken"
    shutil.copytree(lenet_page, broken)
    (broken / "filters.png").unlink()
    images, errors = load_in_browser(
        broken / "index.html", tmp_path / "shot.png", tmp_path / "profile"
    )
    assert [i["src"] for i in images if i["width"] == 0] == ["filters.png"]
    assert errors  # the failed load is logged

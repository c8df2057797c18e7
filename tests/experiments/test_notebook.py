"""The Colab notebook, experiments/colab.ipynb: stored clean, and it runs end to end.

The run uses the notebook's SMOKE setting (embedded digits, simple_cnn, two epochs, CPU), set
the way papermill would: a cell injected after the cell tagged "parameters". It executes in a
real Jupyter kernel (nbclient), offline, from the repository root, so every cell after the
install cell -- devices, data, training, curves, evaluation -- runs as it does on Colab.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import sys
from pathlib import Path

import pytest

from flaxcnn import imagenet

nbformat = pytest.importorskip(
    "nbformat", reason="reading notebooks needs nbformat (pip install nbformat)"
)
nbclient = pytest.importorskip(
    "nbclient", reason="running the notebook needs nbclient (pip install nbclient ipykernel)"
)
pytest.importorskip(
    "ipykernel", reason="running the notebook needs a Python kernel (pip install ipykernel)"
)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "experiments" / "colab.ipynb"
STEPS = 20  # an epoch of the 1,293 training digits (less 144 for validation), batches of 64
# The digits' test split (sklearn's stratified split of its 1,797 digits), class by class.
DIGITS_TEST_LABEL_COUNTS = [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
PARAMETERS = (
    "SMOKE",
    "DATASET",
    "ARCH",
    "EPOCHS",
    "BATCH_SIZE",
    "DTYPE",
    "DATA_DIR",
    "WORKDIR",
    "REPO_URL",
    "RUN_DEGRADATION_FULL",
)
# Appended to the notebook under test: what the cells computed, as one line of JSON.
REPORT = """\
import json, sys
import numpy as np
print("REPORT " + json.dumps({
    "prefix": sys.prefix,
    "executable": sys.executable,
    "smoke": SMOKE,
    "arch": ARCH,
    "devices": len(jax.devices()),
    "curves_png": str(curves_png),
    "confusion_png": str(result["output"]),
    "top1": result["top1"],
    "top5": result["top5"],
    "step": result["step"],
    "num_examples": result["num_examples"],
    "confusion_total": int(result["confusion_matrix"].sum()),
    "confusion_row_sums": result["confusion_matrix"].sum(axis=1).tolist(),
    "test_label_counts": [int(n) for n in np.bincount(
        [int(dataset.test[i]["label"]) for i in range(info.num_test)], minlength=10
    )],
    "final_test_accuracy": test_metrics["accuracy"],
    "have_torch": HAVE_TORCH,
    "pretrained_top5": pretrained_top5,
    "finetune_accuracy": None if finetune_metrics is None else finetune_metrics["accuracy"],
    "report_page": str(report_page),
}))
"""


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb: nbformat.NotebookNode) -> int:
    """The index of the one code cell tagged "parameters"."""
    tagged = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def single_device_env(tmp_path: Path, smoke_xla_flags: str) -> dict[str, str]:
    """The kernel's environment: one CPU device as on a laptop (tests/conftest.py asks this
    process for four fake ones), XLA's flags for a compile-bound smoke run (`smoke_xla_flags`
    in conftest.py: each of the kernel's programs runs a few times, so compiling is what
    costs), and a TFDS directory of the test's own."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, *smoke_xla_flags.split()])
    env["JAX_PLATFORMS"] = "cpu"
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds-default")
    return env


def test_notebook_is_stored_valid_and_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    namespace: dict = {}
    exec(nb.cells[parameters_index(nb)].source, namespace)  # plain assignments only
    assert set(PARAMETERS) <= set(namespace)
    # The stored defaults are the Colab run, not the smoke check.
    assert namespace["SMOKE"] is False and namespace["RUN_DEGRADATION_FULL"] is False
    assert (namespace["DATASET"], namespace["ARCH"]) == ("cifar10", "resnet20")
    assert (namespace["DTYPE"], namespace["BATCH_SIZE"]) == ("bfloat16", 128)
    assert namespace["REPO_URL"] == ""  # no URL is made up; the user supplies one
    source = "\n".join(cell.source for cell in code)
    assert '"google.colab" in sys.modules' in source
    assert '"[cuda12]"' in source and '"[tpu]"' in source
    assert '"experiments/degradation.py", "--full"' in source


def install_helpers(repo_url: str = "") -> dict:
    """The install cell's imports, classes and functions, without its Colab-only actions."""
    nb = read_notebook()
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "def accelerator" in c.source]
    tree = ast.parse(cell.source)
    kinds = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)
    tree.body = [node for node in tree.body if isinstance(node, kinds)]
    namespace = {"REPO_URL": repo_url}
    exec(compile(tree, str(NOTEBOOK), "exec"), namespace)
    return namespace


def test_install_cell_finds_the_repository_or_says_in_one_line_what_to_do(tmp_path, monkeypatch):
    helpers = install_helpers()
    monkeypatch.chdir(ROOT)
    assert helpers["find_repo"]() == ROOT
    monkeypatch.chdir(ROOT / "experiments")  # Jupyter starts a kernel in the notebook's folder
    assert helpers["find_repo"]() == ROOT
    monkeypatch.chdir(tmp_path)
    if Path("/content/flaxcnn/pyproject.toml").exists():
        pytest.skip("this machine has /content/flaxcnn, where the cell looks for an upload")
    with pytest.raises(helpers["Stop"]) as stop:
        helpers["find_repo"]()  # no repository, no REPO_URL: nothing is cloned
    (line,) = stop.value._render_traceback_()
    assert "REPO_URL" in line and "upload" in line


def test_install_cell_picks_the_extra_for_the_runtime(tmp_path, monkeypatch):
    helpers = install_helpers()
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    helpers["Path"] = lambda path: tmp_path / str(path).lstrip("/")  # /dev -> tmp_path/dev
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    for name in ("COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    accelerator = helpers["accelerator"]
    assert accelerator() == "cpu"

    nvidia_smi = bin_dir / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\nexit 0\n")
    nvidia_smi.chmod(0o755)
    assert accelerator() == "gpu"
    nvidia_smi.write_text("#!/bin/sh\nexit 9\n")  # installed, but no GPU attached
    assert accelerator() == "cpu"

    (dev / "vfio" / "0").touch()  # TPU v5e/v6e VMs
    assert accelerator() == "tpu"
    (dev / "vfio" / "0").unlink()
    (dev / "accel0").touch()  # TPU v2-v4 VMs
    assert accelerator() == "tpu"
    (dev / "accel0").unlink()
    monkeypatch.setenv("TPU_NAME", "local")
    assert accelerator() == "tpu"


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path, smoke_xla_flags):
    nb = read_notebook()
    work, data_dir = tmp_path / "work", tmp_path / "tfds"
    injected = nbformat.v4.new_code_cell(
        f"SMOKE = True\nDATA_DIR = {str(data_dir)!r}\nWORKDIR = {str(work)!r}",
        metadata={"tags": ["injected-parameters"]},
    )
    nb.cells.insert(parameters_index(nb) + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT)}}
    )
    # CellExecutionError shows the failing cell
    client.execute(env=single_device_env(tmp_path, smoke_xla_flags))

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    (line,) = [x for x in text.splitlines() if x.startswith("REPORT ")]
    report = json.loads(line.removeprefix("REPORT "))

    # The kernel is this environment's Python, on one CPU device, in the smoke setting.
    assert Path(report["prefix"]) == Path(sys.prefix), report["executable"]
    assert f"python  {report['executable']}" in text
    assert report["smoke"] is True and report["arch"] == "simple_cnn"
    assert report["devices"] == 1
    assert "not on Colab" in text  # the install cell did nothing here
    assert "skipped: set RUN_DEGRADATION_FULL = True" in text

    # The artifacts: curves and confusion matrix as PNGs in the workdir, shown inline.
    assert report["curves_png"] == str(work / "loss_accuracy.png")
    assert report["confusion_png"] == str(work / "confusion_matrix.png")
    for png in (work / "loss_accuracy.png", work / "confusion_matrix.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [out for out in outputs if "image/png" in out.get("data", {})]
    # + two pictures of the report (section 7), + the photo of section 8 where torch is
    assert len(shown) == (5 if report["have_torch"] else 4)
    assert (data_dir / "digits").is_dir()  # DATA_DIR was used, not the default

    # Section 7: the report of this run, beside it, with its six sections; what the cell
    # showed are two of its pictures, the feature maps and the Grad-CAM of a test image.
    page = Path(report["report_page"])
    assert page == work / "report" / "index.html"
    html = page.read_text()
    assert len(re.findall(r"<h2>\d\. ", html)) == 6
    assert "simple_cnn" in html and "360 test images" in html
    images = re.findall(r'<img src="([^"]+)"', html)
    assert {"maps1.png", "decision1.png", "maps2.png", "confusion.png"} <= set(images)
    assert all((page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in images)
    report_shown = [base64.b64decode(out["data"]["image/png"]) for out in shown[2:4]]
    assert report_shown == [(page.parent / n).read_bytes() for n in ("maps1.png", "decision1.png")]

    # Two epochs logged; the evaluation covered the whole digits test split with the best
    # checkpoint, the one of the highest validation accuracy, so its top-1 is the test
    # accuracy training logged at that step.
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    tests = {r["step"]: r["accuracy"] for r in records if r["split"] == "test"}
    vals = {r["step"]: r["accuracy"] for r in records if r["split"] == "val"}
    train_records = [r for r in records if r["split"] == "train"]
    assert [(r["epoch"], r["step"]) for r in train_records] == [(1, STEPS), (2, 2 * STEPS)]
    assert len(tests) == 2 and report["final_test_accuracy"] == tests[max(tests)]
    assert report["num_examples"] == report["confusion_total"] == 360
    # Every test digit once: each true class's row holds as many as the split has (counted
    # in the kernel from the data set's own labels).
    assert report["confusion_row_sums"] == report["test_label_counts"]
    assert report["test_label_counts"] == DIGITS_TEST_LABEL_COUNTS
    assert vals.keys() == tests.keys() == {STEPS, 2 * STEPS}
    assert vals[report["step"]] == max(vals.values())  # the best of the two epochs' checkpoints
    assert tests[report["step"]] == pytest.approx(report["top1"], abs=1e-6)
    for accuracy in (report["top1"], report["top5"]):  # counts of the 360 test digits
        assert accuracy * 360 == pytest.approx(round(accuracy * 360), abs=1e-6)
    assert report["top1"] <= report["top5"] <= 1.0
    assert f"  top-1 accuracy  {report['top1']:.4f}" in text

    # Section 7, where PyTorch is installed (the torch extra): torchvision's resnet18 (its
    # random initialisation, offline) converted, five classes of a digit, one epoch of
    # fine-tuning its classifier.
    if report["have_torch"]:
        assert "largest relative logit difference from torchvision's: " in text
        top5 = report["pretrained_top5"]
        names = imagenet.class_names()  # five distinct ImageNet classes, most probable first
        assert len({name for name, _ in top5}) == 5 and all(name in names for name, _ in top5)
        assert [p for _, p in top5] == sorted((p for _, p in top5), reverse=True)
        assert top5[-1][1] > 0 and sum(p for _, p in top5) <= 1 + 1e-6
        finetuned_dir = tmp_path / "resnet18-digits"
        finetuned = json.loads((finetuned_dir / "config.json").read_text())
        assert finetuned["freeze_backbone"] is True and finetuned["image_size"] == 65
        logged = [json.loads(x) for x in (finetuned_dir / "metrics.jsonl").read_text().splitlines()]
        # On 100 of the digits as a folder of PNGs, 10 of each class: 20 test images, 8 for
        # validation, 72 to train on in 9 steps of the batch the small-data rule chose (8).
        assert finetuned["dataset"].startswith("folder:") and finetuned["batch_size"] == 8
        per_class = [len(list(d.iterdir())) for d in (tmp_path / "digit-images").iterdir()]
        assert per_class == [10] * 10
        assert [(r["split"], r["epoch"], r["step"]) for r in logged] == [
            ("train", 1, 9), ("val", 1, 9), ("test", 1, 9)
        ]  # fmt: skip
        assert report["finetune_accuracy"] == logged[2]["accuracy"]
        correct = report["finetune_accuracy"] * 20
        assert correct == pytest.approx(round(correct), abs=1e-6)
    else:
        assert "skipped: converting torchvision's weights needs PyTorch" in text

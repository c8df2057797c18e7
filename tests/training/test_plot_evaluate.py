"""`flaxcnn.plot` and `flaxcnn.evaluate` on one real run: LeNet-5, two epochs of the digits.

The run is this module's copy of the session's `finished_run` (trained over the test
session's four CPU devices), and only read. Evaluation runs on one device with other batch sizes:
it must count every test example exactly once and agree with the logged loss to float
rounding. The accuracies may differ by one example at most: another batch size is another
compiled program, whose rounding can move a logit that sits at a tie across it. The
bad-input cases run the commands as subprocesses, for their real exit codes and stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flaxcnn import cli, data, plot
from flaxcnn import evaluate as ev
from flaxcnn.training import metrics as metrics_io
from flaxcnn.training.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(digits_data_dir) -> Iterator[Path]:
    """The session's prepared digits, also the default TFDS directory while this module runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(digits_data_dir))
        yield digits_data_dir


@pytest.fixture(scope="module")
def run(data_dir, own_finished_run) -> Path:
    """The workdir of the session's finished two-epoch LeNet-5 run (checkpoints at both
    epochs), copied for this module."""
    return own_finished_run


@pytest.fixture(scope="module")
def result(run, tmp_path_factory) -> dict:
    """The default evaluation (best checkpoint, the run's batch size), with its PNG."""
    output = tmp_path_factory.mktemp("eval") / "confusion.png"
    return ev.evaluate_workdir(run, output=output)


@pytest.fixture(scope="module")
def num_test(data_dir) -> int:
    return data.load("digits").info.num_test


def logged_test(run: Path, step: int) -> dict:
    """The last test record the run logged at `step`."""
    records = [r for r in metrics_io.read(run) if r["split"] == "test" and r["step"] == step]
    assert records, f"no test record at step {step}"
    return records[-1]


def within_one_example(a: float, b: float, count: int) -> bool:
    """Two accuracies over the same `count` examples that differ by one decision at most."""
    return abs(a - b) * count <= 1 + 1e-9


def check_png(path: Path, min_size=(300, 300)) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        image.verify()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers


def snapshot(workdir: Path, pngs: bool = False) -> dict[str, tuple[int, int]]:
    """Every file (but the PNGs unless `pngs`) with size and modification time."""
    return {
        str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and (pngs or p.suffix != ".png")
    }


def fake_run(source: Path, target: Path, arch: str, factor: float) -> Path:
    """A second run for the plots: the first one's metrics, scaled, under another name."""
    target.mkdir()
    records = metrics_io.read(source)
    with open(target / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({**r, "loss": r["loss"] * factor}) + "\n")
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "arch": arch}))
    return target


# ---------------------------------------------------------------- plot


def test_plot_writes_the_default_png_into_the_workdir(run):
    path = plot.plot_runs([run])
    assert path == run / plot.DEFAULT_NAME
    check_png(path, min_size=(800, 350))


def legend_inside_figure(figure) -> list[str]:
    """The figure legend's labels, once its drawn extent is checked to lie in the figure."""
    figure.canvas.draw()
    (legend,) = figure.legends
    box, inside = legend.get_window_extent(), figure.bbox
    assert inside.x0 <= box.x0 and box.x1 <= inside.x1, (box, inside)
    assert inside.y0 <= box.y0 and box.y1 <= inside.y1, (box, inside)
    return [t.get_text() for t in legend.get_texts()]


def test_plot_puts_several_runs_on_one_figure_named_by_their_workdirs(run, tmp_path):
    """Default workdir names are long (ARCH-DATASET-TIMESTAMP): the legend used to run off
    both edges of the figure. It names each run once, by its workdir, then the line styles."""
    other = fake_run(run, tmp_path / "simple_cnn-digits-20250101-120000", "simple_cnn", 1.5)
    third = fake_run(run, tmp_path / "resnet20-digits-20250101-130000", "resnet20", 2.0)
    workdirs = [run, other, third]
    labels = plot.run_labels(workdirs)
    assert labels == [run.name, other.name, third.name]
    runs = list(zip(labels, [plot.read_run(w) for w in workdirs], strict=True))
    figure = plot.draw_runs(runs)
    assert legend_inside_figure(figure) == [*labels, "train", "validation", "test"]
    loss_ax, acc_ax = figure.axes
    assert len(loss_ax.lines) == len(acc_ax.lines) == 9  # 3 runs x (train, val, test)
    epochs, losses = plot.curve(runs[1][1], "test", "loss")
    assert epochs == [1, 2] and losses == list(loss_ax.lines[5].get_ydata())  # run 1, test

    output = tmp_path / "all.png"
    assert plot.plot_runs(workdirs, output) == output
    check_png(output, min_size=(800, 350))


def test_plot_tells_apart_runs_of_the_same_name_and_fits_any_name():
    workdirs = ["/runs/a/lenet5", "/runs/b/lenet5", "/other/a/lenet5", "/runs/c", "/runs/c"]
    labels = plot.run_labels(workdirs)
    assert labels == ["runs/a/lenet5", "b/lenet5", "other/a/lenet5", "c", "c (2)"]
    records = [{"split": s, "epoch": 1, "loss": 1.0, "accuracy": 0.5} for s in ("train", "test")]
    long_name = "x" * 250  # wider than the figure even in one column: the figure widens
    figure = plot.draw_runs([(long_name, records), ("short", records)])
    assert legend_inside_figure(figure) == [long_name, "short", "train", "test"]


def test_plot_cli_writes_where_asked(run, tmp_path, capsys):
    output = tmp_path / "cli.png"
    plot.main([str(run), "--output", str(output)])
    assert capsys.readouterr().out.strip() == f"wrote {output}"
    check_png(output)


def test_a_failed_write_leaves_the_previous_png_and_no_temporary(tmp_path, monkeypatch):
    output = tmp_path / "kept.png"
    output.write_bytes(b"previous")
    figure = plot.new_figure(2, 2)

    def crash(*args, **kwargs):
        args[0].write(b"\x89PNG half")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(figure, "savefig", crash)
    with pytest.raises(RuntimeError):
        plot.save_png(figure, output)
    assert output.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.png"]


# ---------------------------------------------------------------- evaluate


def test_evaluate_agrees_with_the_logged_test_metrics(run, result, num_test):
    logged = logged_test(run, result["step"])
    assert result["step"] in RunDir(run).checkpoint_steps()
    assert result["arch"] == "lenet5" and result["dataset"] == "digits"
    assert result["num_examples"] == num_test
    assert result["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert within_one_example(result["top1"], logged["accuracy"], result["num_examples"])
    assert within_one_example(result["top5"], logged["top5_accuracy"], result["num_examples"])
    check_png(result["output"])


def test_evaluate_every_checkpointed_epoch_matches_its_log(run, num_test):
    steps = RunDir(run).checkpoint_steps()
    assert len(steps) == 2
    for step in steps:
        # batch 7 leaves a padded last batch (360 = 51 x 7 + 3): the mask must drop it.
        got = ev.evaluate_workdir(run, step=step, batch_size=7)
        assert got["step"] == step and got["output"] is None
        logged = logged_test(run, step)
        assert got["num_examples"] == num_test
        assert got["loss"] == pytest.approx(logged["loss"], rel=1e-5)
        assert within_one_example(got["top1"], logged["accuracy"], got["num_examples"])


def test_confusion_matrix_adds_up(result, num_test):
    confusion = result["confusion_matrix"]
    assert confusion.shape == (10, 10) and confusion.dtype == np.int64
    assert result["num_examples"] == confusion.sum() == num_test
    assert np.trace(confusion) / confusion.sum() == result["top1"]
    labels = np.array([data.load("digits").test[i]["label"] for i in range(num_test)])
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=10))


def test_per_class_accuracy_is_consistent(result):
    confusion, per_class = result["confusion_matrix"], result["per_class_accuracy"]
    counts = result["per_class_count"]
    assert result["class_names"] == [str(d) for d in range(10)]
    np.testing.assert_array_equal(counts, confusion.sum(axis=1))
    np.testing.assert_allclose(per_class, np.diag(confusion) / counts)
    assert np.all((per_class >= 0) & (per_class <= 1))
    assert np.sum(per_class * counts) / counts.sum() == pytest.approx(result["top1"])


def test_per_class_accuracy_of_a_class_without_examples_is_nan():
    confusion = ev.confusion_matrix(np.array([0, 0, 2]), np.array([0, 2, 2]), 3)
    np.testing.assert_array_equal(confusion, [[1, 0, 1], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(ev.per_class_accuracy(confusion), [0.5, np.nan, 1.0])


def test_evaluate_cli_reports_every_class(run, tmp_path, capsys, result):
    output = tmp_path / "cm.png"
    ev.main(["--workdir", str(run), "--output", str(output)])
    out = capsys.readouterr().out
    assert f"top-1 accuracy  {result['top1']:.4f}" in out
    assert f"top-5 accuracy  {result['top5']:.4f}" in out
    for name, acc in zip(result["class_names"], result["per_class_accuracy"], strict=True):
        assert f"    {name}  {acc:.4f}  " in out
    assert out.rstrip().endswith(f"confusion matrix: {output}")
    check_png(output)


def test_reading_a_run_changes_nothing_but_the_png(run, tmp_path):
    before = snapshot(run)
    plot.plot_runs([run])
    ev.evaluate_workdir(run, output=run / ev.DEFAULT_NAME)
    with pytest.raises(cli.UsageError):
        ev.evaluate_workdir(run, step=999)
    assert snapshot(run) == before
    check_png(run / ev.DEFAULT_NAME)


# ---------------------------------------------------------------- bad input


def bad_inputs(run: Path, tmp: Path) -> dict[str, list[str]]:
    """Name -> command line; each must fail with exit code 2 and one line on stderr."""
    a_file = tmp / "a-file"
    a_file.write_text("")
    no_metrics = tmp / "no-metrics"
    no_metrics.mkdir()
    plot_cmd, eval_cmd = ["flaxcnn.plot"], ["flaxcnn.evaluate", "--workdir"]
    return {
        "plot: missing workdir": [*plot_cmd, str(tmp / "missing")],
        "plot: not a directory": [*plot_cmd, str(run), str(a_file)],
        "plot: no metrics.jsonl": [*plot_cmd, str(no_metrics)],
        "plot: output in a missing dir": [*plot_cmd, str(run), "--output", str(tmp / "no/x.png")],
        "plot: output is a dir": [*plot_cmd, str(run), "--output", str(tmp)],
        "plot: no workdir": plot_cmd,
        "evaluate: missing workdir": [*eval_cmd, str(tmp / "missing")],
        "evaluate: not a directory": [*eval_cmd, str(a_file)],
        "evaluate: no checkpoint": [*eval_cmd, str(no_metrics)],
        "evaluate: unknown step": [*eval_cmd, str(run), "--step", "5"],
        "evaluate: output in a missing dir": [*eval_cmd, str(run), "--output", str(tmp / "n/x")],
        "evaluate: output is a dir": [*eval_cmd, str(run), "--output", str(tmp)],
        "evaluate: batch size 0": [*eval_cmd, str(run), "--batch-size", "0"],
    }


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", *argv]
    pipe = subprocess.PIPE
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=pipe, stderr=pipe)


MAINS = {"flaxcnn.plot": plot.main, "flaxcnn.evaluate": ev.main}


def test_bad_input_is_one_line_and_exit_code_2(run, tmp_path, data_dir, capsys):
    cases = bad_inputs(run, tmp_path)
    before, before_tmp = snapshot(run, pngs=True), sorted(p.name for p in tmp_path.iterdir())
    for name, (command, *argv) in cases.items():  # each command's main(), as `-m` runs it
        with pytest.raises(SystemExit) as exit_:
            MAINS[command](argv)
        out, err = capsys.readouterr()
        assert exit_.value.code == cli.EXIT_BAD_INPUT, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert out == "", (name, out)
    # Two as real processes: the exit status, and nothing else on stderr.
    env = {**os.environ, "TFDS_DATA_DIR": str(data_dir)}
    procs = {name: start(cases[name], env) for name in ("plot: no metrics.jsonl",
                                                        "evaluate: unknown step")}  # fmt: skip
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == cli.EXIT_BAD_INPUT, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert "Traceback" not in err and out == "", (name, out)
    assert snapshot(run, pngs=True) == before  # not even a PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp


def test_library_errors_name_the_problem(run, tmp_path):
    with pytest.raises(cli.UsageError, match="steps 10, 20"):
        ev.evaluate_workdir(run, step=3)
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(cli.UsageError, match="no checkpoint"):
        ev.evaluate_workdir(empty)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metrics.jsonl").write_text("")
    with pytest.raises(cli.UsageError, match="no records"):
        plot.plot_runs([tmp_path / "blank"])
    with pytest.raises(cli.UsageError, match="at least one"):
        plot.plot_runs([])
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"split": "test", "epo\n')  # a whole line, not a torn one: refused
    with pytest.raises(cli.UsageError, match="line 7 is not a JSON object"):
        plot.plot_runs([copy], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

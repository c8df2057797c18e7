"""The best checkpoint is chosen on a validation split; the test split is only reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flaxcnn import evaluate
from flaxcnn.training import TrainConfig, metrics, train
from flaxcnn.training.checkpoint import TEST_METRIC, VAL_METRIC, Checkpoints
from flaxcnn.training.rundir import RunDir


def test_a_run_logs_validation_and_chooses_its_best_checkpoint_by_it(finished_run):
    records = metrics.read(finished_run)
    assert [(r["split"], r["epoch"]) for r in records] == [
        ("train", 1), ("val", 1), ("test", 1), ("train", 2), ("val", 2), ("test", 2),
    ]  # fmt: skip
    config = json.loads((finished_run / "config.json").read_text())
    assert config["val_fraction"] == 0.1 and config["best_checkpoint_by"] == "val_accuracy"
    assert (config["data"]["num_train"], config["data"]["num_val"]) == (1293, 144)
    val = {r["step"]: r["accuracy"] for r in records if r["split"] == "val"}
    test = {r["step"]: r["accuracy"] for r in records if r["split"] == "test"}
    result = evaluate.evaluate_workdir(finished_run)
    assert val[result["step"]] == max(val.values())
    assert result["top1"] == pytest.approx(test[result["step"]])  # reported, never chosen on
    assert result["why"] == (f"the best validation accuracy of the run ({max(val.values()):.4f})")
    assert f"  checkpoint      {result['why']}" in evaluate.report(result)


def test_checkpoints_rank_by_validation_accuracy_and_by_test_only_without_it(tmp_path):
    """Validation best at step 1, test best at step 2: step 1 is the best. A run without a
    validation split (and every run from before them) records test accuracy only."""
    with_val = [(1, {VAL_METRIC: 0.9, TEST_METRIC: 0.5}), (2, {VAL_METRIC: 0.8, TEST_METRIC: 0.7})]
    test_only = [(1, {TEST_METRIC: 0.5}), (2, {TEST_METRIC: 0.7})]
    for name, saved, best in [("val", with_val, 1), ("old", test_only, 2)]:
        ckpts = Checkpoints(tmp_path / name, keep=1)
        try:
            for step, recorded in saved:
                ckpts.save(step, {"w": np.zeros(2, np.float32)}, {}, {}, recorded)
            assert ckpts.best_step() == best
        finally:
            ckpts.close()


@pytest.mark.slow
def test_without_validation_nothing_chooses_and_older_runs_resume_as_they_were(
    digits_data_dir, tmp_path
):
    """--val-fraction 0: every training image is trained on and the best checkpoint is the
    latest (the test split chooses nothing). A run from before validation splits (its
    config.json without val_fraction, its data without validation figures) goes on as it
    did: every training image, the best checkpoint chosen on test accuracy."""
    workdir = tmp_path / "old"
    common = dict(
        arch="lenet5", batch_size=128, data_dir=str(digits_data_dir), workdir=str(workdir)
    )
    lines: list[str] = []
    train(TrainConfig(**common, epochs=1, val_fraction=0.0, progress=False), out=lines.append)
    assert "the best checkpoint is the latest (nothing is chosen on the test split)" in (
        "\n".join(lines)
    )
    config_path = workdir / "config.json"
    stored = json.loads(config_path.read_text())
    assert stored["best_checkpoint_by"] == "latest" and stored["data"]["num_train"] == 1437
    assert RunDir(workdir).why_checkpoint(11) == (
        "the latest: the run has no validation split to choose one by"
    )
    for key in ("val_fraction", "best_checkpoint_by", "epoch_plan"):
        del stored[key]
    for key in ("num_val", "val_source"):
        del stored["data"][key]
    config_path.write_text(json.dumps(stored))

    lines.clear()
    train(TrainConfig(workdir=str(workdir), epochs=2), out=lines.append)
    assert "resuming     from step 11" in "\n".join(lines)  # 1,437 // 128: no images held out
    assert any("no validation split (--val-fraction 0)" in line for line in lines)
    assert [r["split"] for r in metrics.read(workdir)] == ["train", "test"] * 2
    assert json.loads(config_path.read_text())["best_checkpoint_by"] == "test_accuracy"
    assert (
        RunDir(workdir)
        .why_checkpoint(RunDir(workdir).restore_variables()[0])
        .startswith("the best test accuracy of the run")
    )

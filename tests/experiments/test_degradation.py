"""experiments/degradation.py: the smoke run trains through the library and reports honestly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import degradation
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
BATCH, STEPS = 256, 5  # --smoke: an epoch of the 1,293 training digits, remainder dropped


def metrics_lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def assert_count(value: float) -> None:
    assert value == pytest.approx(round(value), abs=1e-6) and value >= 0, value


@pytest.mark.slow
def test_smoke_trains_both_nets_and_writes_the_page(run_experiment):
    record, out = run_experiment("degradation")
    data = record["data"]
    assert record["size"] == "smoke"
    assert [r["arch"] for r in data["runs"]] == ["plain20", "resnet20"]
    assert data["recipe"]["batch_size"] == BATCH and data["recipe"]["epochs"] == 1
    for run in data["runs"]:
        assert run["params"] == 269_722  # option-A shortcuts add no parameters
        # The trainer's own log of this run, read here as plain JSON lines (not through the
        # script's `curves`): one epoch, then one evaluation.
        log = metrics_lines(out.parent / "work" / f"{run['arch']}-seed0")
        (train,) = [r for r in log if r["split"] == "train"]
        (test,) = [r for r in log if r["split"] == "test"]
        assert train["epoch"] == test["epoch"] == 1 and train["step"] == test["step"] == STEPS
        assert run["curves"]["step"] == [STEPS]
        assert run["final_train_error"] == pytest.approx(1 - train["accuracy"], abs=1e-12)
        assert run["final_train_loss"] == pytest.approx(train["loss"], rel=1e-12)
        assert run["final_test_error"] == pytest.approx(1 - test["accuracy"], abs=1e-12)
        # Errors are counts of examples: STEPS full batches seen, the 360 test digits.
        assert_count(run["final_train_error"] * STEPS * BATCH)
        assert_count(run["final_test_error"] * 360)
        assert 0 < STEPS * BATCH / train["images_per_sec"] < run["seconds"]  # the epoch's time
    page = (out / "degradation.md").read_text()
    assert "![" in page and (out / "degradation.png").stat().st_size > 10_000
    # The full setting was not run: its measured column stays empty, the anchors are labelled
    # with their source, and no figure without one is shown.
    assert "| network | He et al. 2016, Table 6 (%) | measured, --full (%) |" in page
    assert "| resnet110 | 6.43 |  |" in page and "| plain56 |  |  |" in page
    assert "Deep Residual Learning for Image Recognition, Table 6" in page
    assert "reproduction" not in page
    assert "--smoke" in page and "Measured" in page


def test_verdict_follows_the_measurements():
    def errors(train, test=0.1):
        return {"final_train_error": train, "final_test_error": test}

    held = degradation.verdict(
        {
            "plain20": errors(0.05),
            "plain56": errors(0.09),
            "resnet20": errors(0.05),
            "resnet56": errors(0.03),
        },
        (20, 56),
    )
    assert all("it held" in line for line in held)
    failed = degradation.verdict(
        {
            "plain20": errors(0.05),
            "plain56": errors(0.01),
            "resnet20": errors(0.05),
            "resnet56": errors(0.08),
        },
        (20, 56),
    )
    assert all("did not hold" in line for line in failed)
    # Equal training errors: the plain claim (higher) fails, the residual one (no higher)
    # holds, and neither sentence calls an equal error "lower".
    equal = degradation.verdict(
        {arch: errors(0.0008) for arch in ("plain20", "plain56", "resnet20", "resnet56")},
        (20, 56),
    )
    assert equal == [
        "- plain-56 ended with the same training error as plain-20 (0.08% vs 0.08%; test 10.00%"
        " vs 10.00%): the claim expects a higher one, so on this point it did not hold.",
        "- resnet-56 ended with the same training error as resnet-20 (0.08% vs 0.08%; test "
        "10.00% vs 10.00%): the claim expects one no higher, so on this point it held.",
    ]


def test_every_number_in_the_full_table_has_a_source():
    """The paper's column is He et al.'s Table 6 exactly (ResNets only: it has no plain-net
    figures); the other column is this script's own --full run; nothing else is shown."""
    headers, rows = degradation.full_table({})
    assert headers == ["network", "He et al. 2016, Table 6 (%)", "measured, --full (%)"]
    assert [r[0] for r in rows] == degradation.arch_names((20, 56, 110))
    paper = {r[0]: r[1] for r in rows if r[1]}
    assert paper == {"resnet20": "8.75", "resnet56": "6.97", "resnet110": "6.43"}
    assert all(r[2] == "" for r in rows)  # not run: empty, never estimated
    _, rows = degradation.full_table({"plain56": {"final_test_error": 0.1234}})
    assert [r[2] for r in rows if r[2]] == ["12.34"] and rows[1][0] == "plain56"


def test_full_recipe_is_he_et_al():
    full = degradation.recipe_for("full")
    assert full.dataset == "cifar10" and full.batch_size == 128 and full.lr == 0.1
    assert full.epochs * (50_000 // 128) == 63_960  # ~64k iterations
    config = degradation.recipe_for("full").config("resnet56", 0, ROOT / "x", None)
    assert config.lr * config.batch_size / 256 == pytest.approx(0.1)  # trainer scales --lr
    assert config.schedule == "step" and config.weight_decay == 1e-4
    assert config.warmup_epochs == 0.0 and config.label_smoothing == 0.0


@pytest.mark.parametrize("argv", [["--smoke", "--full"], ["--seeds", "0"]])
def test_bad_arguments_are_one_line_and_exit_2(argv, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "degradation.py"), *argv, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("degradation*"))

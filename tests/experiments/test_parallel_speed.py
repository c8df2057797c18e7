"""experiments/parallel_speed.py: every method computes the same convolution, times are real."""

import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import parallel_speed  # noqa: E402


def test_positions_of_the_course_example():
    assert parallel_speed.FULL_POSITIONS == 9_998**2 == 99_960_004
    assert parallel_speed.positions(500) == 498**2


def test_python_and_numpy_agree_with_a_hand_computed_output():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    kernel = np.zeros((3, 3), np.float32)
    kernel[1, 2] = 2.0  # out[r, c] = 2 * image[r + 1, c + 2]
    expected = 2.0 * image[1:3, 2:4]
    np.testing.assert_array_equal(parallel_speed.conv_numpy(image, kernel), expected)
    by_hand = parallel_speed.conv_python(image.tolist(), kernel.tolist())
    np.testing.assert_array_equal(np.asarray(by_hand), expected)


def test_busy_threads_counts_threads_with_a_real_share():
    before = {"1": 0, "2": 0, "3": 0}
    assert parallel_speed.busy_threads(before, {"1": 50, "2": 48, "3": 1}) == 2
    assert parallel_speed.busy_threads(before, {"1": 100, "2": 2, "3": 1}) == 1
    assert parallel_speed.busy_threads(before, {"1": 3, "2": 2, "3": 1}) is None  # too short


def test_smoke_run(run_experiment):
    record, out = run_experiment("parallel_speed")
    data = record["data"]
    assert record["size"] == "smoke"
    assert data["full_positions"] == 9_998**2
    assert data["positions_measured"] == 498**2
    rows = {row["key"]: row for row in data["rows"]}
    cpu = ["python", "numpy"] + [
        f"{mode}/{op}"
        for mode in ("one_core", "all_cores", "eigen_flag")
        for op in ("conv", "slices")
    ]
    for key in cpu:
        row = rows[key]
        # Every method gives the pure-Python loop's output on the crop (float32 rounding).
        assert row["max_abs_diff"] < 1e-4, (key, row["max_abs_diff"])
        assert math.isfinite(row["full_s"]) and row["full_s"] > 0
        assert row["extrapolated"]  # a 500 x 500 image, scaled up to 9,998^2 positions
        # The extrapolation is linear in the positions.
        assert math.isclose(row["full_s"], row["measured_s"] / row["positions_measured"] * 9_998**2)
        assert math.isclose(row["speedup_vs_python"], rows["python"]["full_s"] / row["full_s"])
    assert rows["python"]["max_abs_diff"] == 0.0
    assert rows["python"]["positions_measured"] == 22**2  # the 24 x 24 crop
    # The pinned child really was limited to one core, the others saw them all.
    children = data["children"]
    assert len(children["one_core"]["affinity"]) == 1
    assert len(children["all_cores"]["affinity"]) == data["cores"]
    # (after `import flaxcnn` has appended its own CPU defaults: flaxcnn/xla_flags.py)
    assert "--xla_cpu_multi_thread_eigen=false" in children["eigen_flag"]["xla_flags"].split()
    assert "--xla_cpu_multi_thread_eigen=false" not in children["all_cores"]["xla_flags"]
    if data["accelerator"] is None:
        assert "full_s" not in rows["accel/conv"]  # an empty row, never an estimate
    page = (out / "parallel_speed.md").read_text()
    assert "EXTRAPOLATED" in page
    assert "Full setting (not run)" in page
    assert (out / "parallel_speed.png").stat().st_size > 10_000

"""experiments/parallel_speed.py: every method computes the same convolution, times are real."""

import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import parallel_speed  # noqa: E402

CROPS = (12, 24)  # the pure-Python loop's crops at --smoke


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


@pytest.mark.slow
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
    # The times are real: each median is the median of the calls timed (2 at --smoke), the
    # row reports it, and the run as a whole took longer than every timed call together.
    reps = data["reps"]
    assert reps == 2
    timed = {}  # (numpy's calls are not in the record, only their median)
    for crop, python in zip(CROPS, data["python_crops"], strict=True):
        assert python["crop"] == crop and len(python["times_s"]) == reps
        assert python["median_s"] == statistics.median(python["times_s"])
        assert python["per_position_s"] == python["median_s"] / (crop - 2) ** 2
        timed[f"python{crop}"] = python
    for mode, child in data["children"].items():
        for op, result in child["results"].items():
            assert len(result["times_s"]) == reps and result["first_call_s"] > 0, (mode, op)
            assert result["median_s"] == statistics.median(result["times_s"]), (mode, op)
            timed[f"{mode}/{op}"] = result
    every_call = sum(sum(r["times_s"]) + r.get("first_call_s", 0) for r in timed.values())
    assert 0 < every_call < record["seconds"]
    assert rows["python"]["measured_s"] == data["python_crops"][-1]["median_s"]
    for key in cpu:
        row = rows[key]
        # Every method gives the pure-Python loop's output on the crop (float32 rounding).
        assert row["max_abs_diff"] < 1e-4, (key, row["max_abs_diff"])
        if key in timed:
            assert row["measured_s"] == timed[key]["median_s"], key
        assert row["measured_s"] > 0
        assert row["extrapolated"]  # a 500 x 500 image, scaled up to 9,998^2 positions
        if key != "python":
            assert row["positions_measured"] == 498**2, key
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


def table(times: dict[str, tuple[float, int | None]]) -> list[dict]:
    """Rows as `summarise` makes them, from {key: (seconds for 9,998^2 positions, threads)}."""
    labels = {key: (label, kind) for key, label, kind in parallel_speed.METHODS}
    python, numpy_s = times["python"][0], times["numpy"][0]
    return [
        {
            "key": key,
            "method": labels[key][0],
            "kind": labels[key][1],
            "full_s": seconds,
            "busy_threads": threads,
            "speedup_vs_python": python / seconds,
            "speedup_vs_numpy": numpy_s / seconds,
        }
        for key, (seconds, threads) in times.items()
    ]


# The committed --quick page's times: the Eigen-flag child ran the shifted slices fastest.
QUICK = {"python": (201.0, 1), "numpy": (4.0, 1), "one_core/conv": (9.45, 1),
         "all_cores/conv": (7.95, 2), "eigen_flag/conv": (8.79, 2),
         "one_core/slices": (0.453, 1), "all_cores/slices": (0.464, 3),
         "eigen_flag/slices": (0.33, 4)}  # fmt: skip


def test_verdict_counts_every_parallel_row():
    """The speed-up the verdict reports is the best of all the rows it shows, the Eigen-flag
    child's and the GPU/TPU's included, each against the same op pinned to one core."""
    text = parallel_speed.verdict(table(QUICK), {}, 2)
    assert "with --xla_cpu_multi_thread_eigen=false made the jitted shifted slices 1.37x" in text
    assert "made conv_general_dilated 1.19x as fast (threads doing the work: 1 vs 2)" in text
    assert (
        "was 1.4x at best (the jitted shifted slices, all 2 cores with "
        "--xla_cpu_multi_thread_eigen=false), below the course's 10-100x" in text
    )
    with_gpu = table({**QUICK, "accel/conv": (0.05, None), "accel/slices": (0.02, None)})
    text = parallel_speed.verdict(with_gpu, {}, 2)
    assert "Going from 1 core to the GPU/TPU made the jitted shifted slices 22.65x as fast." in text
    assert "was 1.9e+02x at best (conv_general_dilated, the GPU/TPU), above" in text

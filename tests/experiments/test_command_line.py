"""Every experiment script: a bad argument is one line on stderr and exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "harness")
# Scripts that import jax and flaxcnn's models before they parse their arguments take 2.5-4 s
# to say no; the quick lane keeps the two that answer in under a second.
LIGHT = ("feature_maps", "parallel_speed")


def test_every_experiment_is_covered():
    assert SCRIPTS == ["bottleneck", "degradation", "feature_maps", "loss", "one_by_one",
                       "parallel_speed", "zoo"]  # fmt: skip


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in LIGHT else pytest.mark.slow) for n in SCRIPTS]
)
def test_unknown_argument_is_one_line_and_exit_2(name, tmp_path):
    proc = subprocess.run(
        [sys.executable, f"experiments/{name}.py", "--smoke", "--nope", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "--nope" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())

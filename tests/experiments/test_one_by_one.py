"""experiments/one_by_one.py: a 1x1 conv equals a per-pixel matrix product, to rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import one_by_one  # noqa: E402

# Every test here takes seconds: the smoke run (8-10 s), or compiling the four forms (3 s).
pytestmark = pytest.mark.slow

FLOAT32_TOL = 1e-5  # relative; float32's eps is 1.2e-7


@pytest.fixture
def smoke(run_experiment, once_per_run) -> dict:
    """The script run once per test run at --smoke: its JSON record, its page, its directory."""

    def make(_) -> dict:
        record, out = run_experiment("one_by_one")
        page = (out / "one_by_one.md").read_text()
        return {"data": record["data"], "page": page, "dir": str(out)}

    result = once_per_run("one_by_one-smoke", make)
    return {**result, "dir": Path(result["dir"])}


def test_differences_within_float32_tolerance(smoke):
    data = smoke["data"]
    rows32 = [r for r in data["rows"] if r["dtype"] == "float32"]
    assert {r["comparison"] for r in rows32} >= {
        "1x1 conv vs einsum",
        "1x1 conv vs matmul",
        "1x1 conv vs Dense per pixel",
        "1x1 conv vs float64 reference",
    }
    for r in rows32:
        assert r["max_rel"] < FLOAT32_TOL, r
        assert r["max_abs"] <= data["bound32"], r  # the worst-case rounding bound
    assert 0 < data["bound32"] < 1e-4


def test_float64_rows_are_float64_close(smoke):
    rows64 = [r for r in smoke["data"]["rows"] if r["dtype"] == "float64"]
    assert len(rows64) == 4
    for r in rows64:
        assert r["max_rel"] < 1e-13, r  # far below anything float32 could reach
        assert r["max_abs"] <= smoke["data"]["bound64"], r


def test_shapes_and_parameter_count(smoke):
    data = smoke["data"]
    assert data["input_shape"] == [1, 32, 32, 8]
    assert data["output_shape"] == [1, 32, 32, 4]  # spatial size kept, channels 8 -> 4
    assert data["kernel_shape"] == [1, 1, 8, 4]
    assert data["params"] == data["params_formula"] == 8 * 4 + 4
    page = smoke["page"]
    assert "The claim held as measured." in page
    assert "python experiments/one_by_one.py --full" in page
    assert (smoke["dir"] / "one_by_one.png").stat().st_size > 10_000


def test_forms_agree_directly():
    """The script's four forms on a random input, with the kernel the Conv initialised."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 6, 7))
    params = one_by_one.one_by_one(3).init(jax.random.key(4), x)
    conv = np.asarray(one_by_one.conv_apply(params, x))
    assert conv.shape == (2, 5, 6, 3)
    for fn in one_by_one.FORMS.values():
        np.testing.assert_allclose(np.asarray(fn(params, x)), conv, rtol=1e-5, atol=1e-6)
    ref = one_by_one.reference64(params, np.asarray(x))
    assert np.abs(conv - ref).max() <= one_by_one.rounding_bound(params, np.asarray(x), 2**-23)
    assert np.any(np.asarray(params["params"]["bias"]) != 0)  # the bias path is exercised
    assert jnp.asarray(1.0).dtype == jnp.float32  # x64 mode did not leak out of the script

"""experiments/loss.py: log-softmax + NLL equals one-hot softmax cross-entropy; -log p."""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import loss  # noqa: E402


def test_reference_is_softmax_cross_entropy():
    z = np.array([[0.0, 0.0], [math.log(3.0), 0.0]], np.float64)  # long double inside
    y = np.array([0, 1])
    value, grad = loss.reference(z, y)
    np.testing.assert_allclose(value, [math.log(2.0), math.log(4.0)], rtol=1e-12)
    np.testing.assert_allclose(grad, [[-0.5, 0.5], [0.75, -0.75]], rtol=1e-12)


def test_all_five_computations_agree_on_small_logits():
    """In-process, float32 only (the script's x64 switch stays in its own process)."""
    base, labels = loss.batch(32, 5)
    z = jnp.asarray(base, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    onehot = jax.nn.one_hot(y, 5, dtype=jnp.float32)
    true_value, true_grad = loss.reference(np.asarray(z), labels)
    for key in loss.METHODS:
        value, grad = loss.per_example_and_grad(key, z, y, onehot)
        np.testing.assert_allclose(value, true_value, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(32 * grad, true_grad, atol=1e-5, err_msg=key)


def test_log_of_softmax_breaks_where_log_softmax_does_not():
    z = jnp.asarray([[0.0, -200.0, 100.0]], jnp.float32)
    counts = loss.non_finite_log_probs(z)
    assert int(counts["log_softmax"]) == 0
    assert int(counts["log_of_softmax"]) >= 1  # exp(-300) underflows to 0 in float32
    assert int(counts["textbook"]) >= 1  # exp(100) overflows
    assert loss.count_share(0, 10) == "0"
    assert loss.count_share(6, 10_000_000) == "6 (6e-05%)"


@pytest.mark.slow
def test_smoke_run(run_experiment):
    record, out = run_experiment("loss")
    data = record["data"]
    assert (data["examples"], data["classes"]) == (256, 10)
    eps = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}
    for dtype in ("float32", "float64"):
        by_scale = data["results"][dtype]
        assert list(by_scale) == ["0.1", "1", "10", "30", "100", "1000"]
        for scale, r in by_scale.items():
            for key in ("cross_entropy", "nll_loss", "optax"):
                m = r[key]
                # cross_entropy computes in float32 even on float64 logits (by design).
                inner = "float32" if key == "cross_entropy" else dtype
                assert m["value_max_rel"] < 1000 * eps[inner], (dtype, scale, key, m)
                assert m["grad_max_abs"] < 1000 * eps[inner], (dtype, scale, key, m)
                assert m["loss_non_finite"] == m["grad_non_finite"] == 0
                assert math.isclose(m["mean_loss"], r["reference"]["mean_loss"], rel_tol=1e-5)
            assert r["analytic"]["grad_max_abs"] < 1000 * eps[dtype]
            assert r["overflow"]["log_softmax"] == 0  # never inf/nan
        # Small logits: the one-hot log(softmax) forms are finite and agree too.
        for key in ("log_of_softmax", "textbook"):
            assert by_scale["1"][key]["value_max_rel"] < 1000 * eps[dtype]
            assert by_scale["1"][key]["grad_max_abs"] < 1000 * eps[dtype]
        # Large logits: log(softmax) gives inf/nan, as the page says.
        big = by_scale["1000"]
        assert big["overflow"]["log_of_softmax"] > 0 and big["overflow"]["textbook"] > 0
        assert big["log_of_softmax"]["loss_non_finite"] > 0
        assert math.isnan(big["log_of_softmax"]["value_max_abs"])
        assert math.isnan(big["textbook"]["grad_max_abs"])
    # float32 overflows sooner than float64: exp(z) > 3.4e38 from z > 88.7.
    assert data["results"]["float32"]["100"]["overflow"]["exp_overflow"] > 0
    assert data["results"]["float64"]["100"]["overflow"]["exp_overflow"] == 0
    curve = {row["p"]: row for row in data["neg_log_p"]}
    expected = {1.0: 0.0, 0.5: 0.693147, 0.1: 2.302585, 0.01: 4.605170, 1e-6: 13.815511}
    assert set(curve) == set(expected)
    for p, value in expected.items():
        assert math.isclose(curve[p]["float32"], value, rel_tol=1e-6, abs_tol=1e-9)
        assert math.isclose(curve[p]["float64"], -math.log(p), rel_tol=1e-12, abs_tol=1e-15)
    page = (out / "loss.md").read_text()
    assert "The claim held as measured" in page
    assert "**nan**" in page
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "loss-neglogp.png").stat().st_size > 10_000


def test_the_figure_shows_the_first_float32_break(monkeypatch, tmp_path):
    """At scale 10 the committed --quick run found 6 of 10 million float32 log-probabilities
    inf/nan: on the right panel that point stands clearly above the unbroken ones (at 0),
    not drawn on top of them as a linear 0-100% axis draws it."""
    entries = 10_000_000
    broken = {0.1: 0, 1.0: 0, 10.0: 6, 30.0: 6_222_255, 100.0: 9_878_228, 1000.0: 9_986_697}
    stable = {key: {"grad_max_abs": 1e-7} for key in (*loss.STABLE, "analytic")}
    by_scale = {
        scale: {**stable, "overflow": {"entries": entries, "log_softmax": 0,
                                       "log_of_softmax": n, "textbook": n}}
        for scale, n in broken.items()
    }  # fmt: skip
    drawn = []
    monkeypatch.setattr(loss.harness, "save_figure", lambda figure, path: drawn.append(figure))
    loss.draw_agreement({"float32": by_scale}, tmp_path / "loss.png")
    (figure,) = drawn
    figure.canvas.draw()
    ax = figure.axes[1]
    heights = {}  # share -> its height on the panel, as a fraction of the panel's height
    for line in ax.get_lines():
        for x, y in zip(*line.get_data(), strict=True):
            _, pixel = ax.transData.transform((x, y))
            heights[y] = (pixel - ax.bbox.y0) / ax.bbox.height
    first_break, most = 100 * 6 / entries, 100 * 9_986_697 / entries
    assert {0.0, first_break, most} <= set(heights)
    assert heights[first_break] - heights[0.0] > 0.15  # a visible step up from 0
    assert heights[most] - heights[first_break] > 0.15

"""experiments/feature_maps.py: filters, feature maps, contrast and gradient through depth."""

from __future__ import annotations

import math
from pathlib import Path

import feature_maps as fm
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def finite_positive(values) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_smoke_measures_filters_and_both_stacks(run_experiment):
    record, out = run_experiment("feature_maps")
    assert record["size"] == "smoke"
    filters, depth = record["data"]["filters"], record["data"]["depth"]

    # Part 1: LeNet-5's six 5x5 filters, tuned against 16 edge directions.
    assert filters["arch"] == "lenet5" and 0 <= filters["test_accuracy"] <= 1
    assert np.asarray(filters["filters"]).shape == (6, 5, 5)
    assert 0 <= filters["example_label"] <= 9 and "example" not in filters  # pixels: PNG only
    for state in ("trained", "init"):
        tun = filters[state]["tuning"]
        assert len(tun) == 6 and all(0 <= t["selectivity"] <= 1 for t in tun)
        assert np.asarray(filters[state]["responses"]).shape == (fm.N_DIRECTIONS, 6)
        corr = np.asarray(filters[state]["map_correlation"])
        assert corr.shape == (6, 6) and np.allclose(corr, corr.T)
        off = np.abs(corr[~np.eye(6, dtype=bool)])
        assert filters[state]["mean_abs_correlation"] == pytest.approx(off.mean(), rel=1e-3)
        assert np.all(np.abs(corr) <= 1 + 1e-9)

    # Part 2: one value per residual block, finite, at init only in smoke.
    assert set(depth["nets"]) == {"plain20", "resnet20"} and depth["trained_depths"] == []
    for net in depth["nets"].values():
        assert net["blocks"] == 9 and net["trained"] is None and net["test_accuracy"] is None
        for mode in fm.BN_MODES:
            m = net["init"][mode]
            assert len(m["contrast"]) == len(m["share"]) == 9 and len(m["grad"]) == 10
            assert finite_positive(m["contrast"]) and finite_positive(m["grad"])
            assert all(0 < s <= 1 for s in m["share"])
            ratio = m["contrast"][-1] / m["contrast"][0]
            assert m["last_over_first"] == pytest.approx(ratio, rel=1e-3)  # 4 digits kept
            assert m["first_layer_grad"] == m["grad"][0]
            assert "maps" not in m
    # Without normalisation (BatchNorm at its initial running statistics) a plain stack
    # shrinks the image where the shortcuts keep it: seed-0 initialisation, deterministic.
    plain, res = (depth["nets"][a]["init"]["running"] for a in ("plain20", "resnet20"))
    assert plain["last_over_first"] < 0.5 < res["last_over_first"]

    out = out
    page = (out / "feature_maps.md").read_text()
    assert "no colour filter can be learned" in page and "--smoke" in page
    assert "| plain110 | 54 |  |  |  |  |  |  |  |" in page  # --full: not run, empty cells
    for suffix in ("filters", "maps", "contrast", "grad", "deep"):
        assert (out / f"feature_maps-{suffix}.png").stat().st_size > 10_000


def test_contrast_and_share_measure_spatial_variation():
    flat = np.full((2, 4, 4, 3), 5.0, np.float32)
    assert float(fm.spatial_contrast(flat)) == 0 and float(fm.spatial_share(flat)) == 0
    checker = np.indices((4, 4)).sum(0) % 2 * 2.0 - 1.0  # +-1, zero mean
    maps = np.repeat(checker[None, :, :, None], 2, axis=0).astype(np.float32)
    assert float(fm.spatial_contrast(maps)) == pytest.approx(1.0)
    assert float(fm.spatial_share(maps)) == pytest.approx(1.0)
    assert float(fm.spatial_share(maps + 1.0)) == pytest.approx(1 / math.sqrt(2))
    assert float(fm.spatial_share(10 * maps)) == pytest.approx(1.0)  # scale-free


def test_edge_probes_point_the_stated_way():
    probes = fm.edge_probes(8, lo=-1.0, hi=2.0)
    assert probes.shape == (fm.N_DIRECTIONS, 8, 8, 1)
    right, up = probes[0, ..., 0], probes[fm.N_DIRECTIONS // 4, ..., 0]
    assert (right[:, 4:] == 2).all() and (right[:, :4] == -1).all()  # brighter to the right
    assert (up[:4] == 2).all() and (up[4:] == -1).all()  # brighter at the top
    assert fm.edge_kind(0) == fm.edge_kind(180) == "vertical edge"
    assert fm.edge_kind(90) == fm.edge_kind(270) == "horizontal edge"
    assert fm.edge_kind(45) == fm.edge_kind(120) == "diagonal edge"
    assert fm.edge_kind(15) == "vertical edge" and fm.edge_kind(75) == "horizontal edge"


def test_tuning_finds_the_preferred_direction():
    n = fm.N_DIRECTIONS
    responses = np.ones((n, 3))
    responses[n // 4, 0] = 3.0  # filter 0: only an edge brighter upwards adds anything
    responses[:, 1] = 2.0  # filter 1: edges add nothing to flat ink
    responses[0, 2], responses[n // 2, 2] = 1.5, 1.2  # filter 2: vertical, either polarity
    dark, ink = np.array([0.5, 0.0, 1.0]), np.array([1.0, 2.0, 0.0])
    a, b, c = fm.tuning(responses, dark, ink)
    assert a["direction_deg"] == 90 and a["kind"] == "horizontal edge"
    assert a["selectivity"] == 1 and a["edge_gain"] == 3
    assert b["kind"] == "ink + no edge" and b["selectivity"] == 0
    assert c["direction_deg"] == 0 and c["kind"] == "background + vertical edge"
    assert c["excess"][n // 2] == pytest.approx(0.2) and c["selectivity"] == 1


def test_rounded_keeps_four_significant_digits():
    assert fm.rounded({"a": [1.234567e-6, 98765.4321], "b": (2, math.inf)}) == {
        "a": [1.235e-6, 98770.0],
        "b": [2, math.inf],
    }


def test_map_correlations():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 6, 6, 1))
    maps = np.concatenate([base, 2 * base + 1, -base], axis=-1)
    corr = fm.map_correlations(maps)
    assert corr == pytest.approx(np.array([[1, 1, -1], [1, 1, -1], [-1, -1, 1]]))


def test_blocks_in_data_flow_order():
    names = ["fc", "layer1_10", "layer2_0", "layer1_2", "conv1", "layer1_9", "layer3_1"]
    assert fm.block_order(names) == ["layer1_2", "layer1_9", "layer1_10", "layer2_0", "layer3_1"]
    assert [fm.blocks_in(d) for d in (20, 56, 110)] == [9, 27, 54]
    assert fm.picked_blocks(56) == [0, 8, 17, 26]


def test_probe_has_one_value_per_block():
    """Traced, not compiled (jax.eval_shape): the probe sees every block of a deep net."""
    import jax
    import jax.numpy as jnp

    from flaxcnn import models

    blocks = 54
    model = models.create("plain110", num_classes=10)
    x = jnp.zeros((2, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    shapes = jax.eval_shape(fm.make_probe(model), variables, x, jnp.zeros(2, jnp.int32))
    for mode in fm.BN_MODES:
        assert len(shapes[mode]["contrast"]) == blocks
        assert len(shapes[mode]["grad"]) == blocks + 1  # the first conv, then each block


def test_verdict_follows_the_numbers():
    def mode(ratio, share, grad):
        return {"last_over_first": ratio, "share": [share], "first_layer_grad": grad,
                "grad": [grad, 0.5]}  # fmt: skip

    def depth(plain, res):
        nets = {
            "plain56": {"init": {"batch": plain, "running": plain}, "trained": None},
            "resnet56": {"init": {"batch": res, "running": res}, "trained": None},
        }
        return {"depths": [56], "nets": nets}

    held = fm.depth_verdict(depth(mode(0.01, 0.05, 1e-4), mode(1.5, 0.6, 1.0)))
    assert len(held) == 2
    assert all("fading part of the claim held" in x and "gradient part held" in x for x in held)
    assert "almost uniform map" in held[0] and "vanished in the plain net" in held[0]
    assert "changes x0.0002 in the plain net, x2 in the residual one" in held[0]
    failed = fm.depth_verdict(depth(mode(0.6, 0.8, 1e4), mode(1.5, 0.6, 1.0)))
    assert all("did NOT hold here, the gradient part did NOT hold" in x for x in failed)
    assert all("exploded" in x for x in failed)
    summary = fm.depth_summary(depth(mode(0.01, 0.8, 5.0), mode(1.5, 0.6, 1.0)))
    assert "one in: at init, BatchNorm on batch statistics (as trained); at init without" in summary
    assert summary.endswith("residual net's in: none; not in: at init, BatchNorm on batch "
                            "statistics (as trained); at init without normalisation (BatchNorm "
                            "at its initial statistics).")  # fmt: skip

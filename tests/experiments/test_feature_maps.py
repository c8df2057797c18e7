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

    # Part 1: LeNet-5's six 5x5 filters, tuned against 24 edge directions.
    assert filters["arch"] == "lenet5" and filters["test_images"] == 360  # the whole split
    correct = filters["test_accuracy"] * 360  # a count of digits (4 significant digits kept)
    assert correct == pytest.approx(round(correct), abs=0.02) and 0 <= correct <= 360
    assert np.asarray(filters["filters"]).shape == (6, 5, 5)
    assert 0 <= filters["example_label"] <= 9 and "example" not in filters  # pixels: PNG only
    for state in ("trained", "init"):
        tun = filters[state]["tuning"]
        assert len(tun) == 6 and all(0 <= t["selectivity"] <= 1 for t in tun)
        assert np.asarray(filters[state]["responses"]).shape == (fm.N_DIRECTIONS, 6)
        corr = np.asarray(filters[state]["map_correlation"])
        # A correlation matrix: symmetric, ones on the diagonal (no filter's map is constant
        # over the 360 test digits), positive semi-definite (4 significant digits kept).
        assert corr.shape == (6, 6) and np.allclose(corr, corr.T)
        np.testing.assert_allclose(np.diag(corr), 1.0, atol=1e-3)
        assert np.linalg.eigvalsh(corr).min() > -1e-3 and np.all(np.abs(corr) <= 1 + 1e-9)
        off = np.abs(corr[~np.eye(6, dtype=bool)])
        assert filters[state]["mean_abs_correlation"] == pytest.approx(off.mean(), rel=1e-3)
        assert filters[state]["max_abs_correlation"] == pytest.approx(off.max(), rel=1e-3)

    # Part 2: one value per residual block, finite, at init only in smoke.
    assert set(depth["nets"]) == {"plain20", "resnet20"} and depth["trained_depths"] == []
    for net in depth["nets"].values():
        assert net["blocks"] == 9 and net["trained"] is None and net["test_accuracy"] is None
        for mode in fm.BN_MODES:
            m = net["init"][mode]
            assert len(m["contrast"]) == len(m["share"]) == 9 and len(m["grad"]) == 10
            assert finite_positive(m["contrast"]) and finite_positive(m["grad"])
            assert all(0 < s <= 1 for s in m["share"])
            assert "maps" not in m
            # (what make_probe and summarise compute is checked on hand-made cases below)
    # Without normalisation (BatchNorm at its initial running statistics) a plain stack
    # shrinks the image where the shortcuts keep it: seed-0 initialisation, deterministic.
    plain, res = (depth["nets"][a]["init"]["running"] for a in ("plain20", "resnet20"))
    assert plain["last_over_first"] < 0.5 < res["last_over_first"]

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


@pytest.mark.slow
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


def test_summarise_scales_by_the_input_and_picks_the_headlines():
    """Hand-made probe output: contrast relative to the input's, the ratio last/first block,
    the first layer's gradient, the maps of the first block and the end of each stage."""
    maps = [np.full((2, 2), float(i)) for i in range(9)]
    raw = {"input_contrast": 2.0, "input_share": 0.5}
    for mode, scale in zip(fm.BN_MODES, (1.0, 10.0), strict=True):
        raw[mode] = {"loss": np.float32(2.5), "contrast": [scale * c for c in (1, 3, 0.5, 4)],
                     "share": [0.25], "grad": [7.0, 1.0, 2.0], "maps": maps}  # fmt: skip
    out = fm.summarise(raw, 20)  # 9 blocks: the pictures show blocks 0, 2, 5 and 8
    assert (out["input_contrast"], out["input_share"]) == (2.0, 0.5)
    batch, running = out["batch"], out["running"]
    assert batch["contrast"] == [0.5, 1.5, 0.25, 2.0] and batch["last_over_first"] == 4.0
    assert running["contrast"] == [5.0, 15.0, 2.5, 20.0] and running["last_over_first"] == 4.0
    assert batch["first_layer_grad"] == 7.0 and batch["grad"] == [7.0, 1.0, 2.0]
    assert batch["loss"] == 2.5 and batch["share"] == [0.25]
    assert batch["maps"] == [[[v, v], [v, v]] for v in (0.0, 2.0, 5.0, 8.0)]
    raw["batch"]["contrast"] = [0.0, 1.0]
    assert fm.summarise(raw, 20)["batch"]["last_over_first"] == math.inf


@pytest.mark.slow
def test_probe_measures_what_a_direct_computation_gives():
    """make_probe on a tiny CIFAR-style ResNet (a 3x3 stem and two 2-channel blocks, 4x4
    images, random weights and statistics made here: nothing to compile for an init),
    against block outputs and gradients computed here by another route: every intermediate
    captured, plain `jax.grad` of optax's cross-entropy over the whole tree. And a property
    from first principles: with BatchNorm on batch statistics the loss does not change when
    the stem's kernel is scaled by c, so the gradient reaching it is divided by c."""
    import jax
    import optax

    from flaxcnn.models import resnet

    model = resnet.CifarResNet(
        stage_sizes=(2,), block=resnet.BasicBlock, num_filters=2, num_classes=3
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 1])
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def draw(path, leaf):  # BatchNorm scales near 1 and shifts near 0: no ReLU stays dark
        name = path[-1].key
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape)
        return (0.1 if name == "bias" else 1.0) * rng.standard_normal(leaf.shape)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    stats = jax.tree.map(lambda s: rng.uniform(0.5, 2, s.shape), shapes["batch_stats"])
    variables = {"params": params, "batch_stats": stats}
    probe = fm.make_probe(model)
    measured = probe(variables, x, y)

    blocks = ["layer1_0", "layer1_1"]  # in data-flow order

    @jax.jit
    def direct(params):
        out = {}
        for mode in fm.BN_MODES:

            def loss(params, train=mode == "batch"):
                logits, state = model.apply(
                    {"params": params, "batch_stats": stats}, x, train=train,
                    capture_intermediates=True, mutable=["intermediates", "batch_stats"],
                )  # fmt: skip
                inter = state["intermediates"]
                outputs = [inter[b]["__call__"][0] for b in blocks]
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), outputs

            out[mode] = jax.value_and_grad(loss, has_aux=True)(params)
        return out

    def norm(*trees) -> float:
        return math.sqrt(sum(float(np.sum(np.square(a))) for a in jax.tree.leaves(trees)))

    assert float(measured["input_contrast"]) == pytest.approx(x.std(axis=(1, 2)).mean(), rel=1e-5)
    for mode, ((loss, outputs), grads) in direct(params).items():
        m = measured[mode]
        expected = [norm(grads["conv1"])]  # the stem conv (no bias), then each block's two
        expected += [norm(grads[b]["conv1"], grads[b]["conv2"]) for b in blocks]
        assert min(expected) > 1e-3, (mode, expected)  # every layer gets a gradient to compare
        np.testing.assert_allclose(np.asarray(m["grad"]), expected, rtol=1e-5, err_msg=mode)
        assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-6)
        for contrast, share, out in zip(m["contrast"], m["share"], outputs, strict=True):
            out = np.asarray(out, np.float64)
            spread = out.std(axis=(1, 2))  # over positions, per image and channel
            assert float(contrast) == pytest.approx(spread.mean(), rel=1e-5), mode
            rms = math.sqrt(np.mean(np.square(out)))
            assert float(share) == pytest.approx(math.sqrt(np.mean(spread**2)) / rms, rel=1e-5)

    scaled = {"params": {**params, "conv1": {"kernel": 3 * params["conv1"]["kernel"]}},
              "batch_stats": stats}  # fmt: skip
    again, before = probe(scaled, x, y)["batch"], measured["batch"]
    assert float(again["grad"][0]) == pytest.approx(float(before["grad"][0]) / 3, rel=1e-3)
    assert float(again["loss"]) == pytest.approx(float(before["loss"]), rel=1e-4)


def mode(ratio: float, grad: float, share: float = 0.7, last_grad: float = 1.0) -> dict:
    """One BatchNorm mode's headline numbers, as `summarise` gives them."""
    return {"last_over_first": ratio, "share": [share], "first_layer_grad": grad,
            "grad": [grad, last_grad], "contrast": [1.0, ratio]}  # fmt: skip


def net(arch: str, init: dict, trained: dict | None = None, accuracy: float | None = None):
    depth = int(arch.removeprefix("plain").removeprefix("resnet"))
    return {"family": arch.rstrip("0123456789"), "depth": depth, "blocks": fm.blocks_in(depth),
            "init": {**init, "input_share": 0.99}, "trained": trained,
            "test_accuracy": accuracy}  # fmt: skip


def quick_depth(plain56_accuracy: float = 0.2167) -> dict:
    """The committed --quick run's numbers (rounded): 20 and 56 trained 4 epochs, 110 at
    init; plain56 ended at 0.217 test accuracy, about twice chance."""
    nets = {
        "plain20": net("plain20", {"batch": mode(0.98, 6.5), "running": mode(0.049, 0.0068)},
                       {"batch": mode(0.67, 0.19), "running": mode(0.75, 0.28)}, 0.7667),
        "resnet20": net("resnet20", {"batch": mode(1.7, 2.4), "running": mode(4.1, 4.3)},
                        {"batch": mode(1.5, 0.33), "running": mode(1.5, 1.2)}, 0.975),
        "plain56": net("plain56", {"batch": mode(0.76, 4169), "running": mode(0.0031, 7.8e-4)},
                       {"batch": mode(0.27, 0.010), "running": mode(0.28, 0.014)},
                       plain56_accuracy),
        "resnet56": net("resnet56", {"batch": mode(2.9, 8.7), "running": mode(1594, 2425)},
                        {"batch": mode(2.7, 0.56), "running": mode(2.8, 0.51)}, 0.9583),
        "plain110": net("plain110", {"batch": mode(0.55, 6.4e6), "running": mode(1.5e-5, 1e-5)}),
        "resnet110": net("resnet110", {"batch": mode(4.1, 27.7), "running": mode(4.3e7, 6.5e7)}),
    }  # fmt: skip
    return {"dataset": "digits", "num_classes": 10, "image_size": 16, "epochs": 4,
            "batch_size": 64, "probe_batch": 64, "depths": [20, 56, 110],
            "trained_depths": [20, 56], "picked_blocks": {}, "example_image": [[0.0]],
            "nets": nets}  # fmt: skip


def test_a_net_near_chance_is_not_called_trained():
    """plain56 at 0.217 (chance 0.1) did not clearly learn: under 3x chance it is said not
    to have learned, and the verdict on trained nets rests on the deepest pair that did."""
    depth = quick_depth()
    note = fm.accuracy_note(depth)
    assert "plain56 did not learn" in note and "3x chance" in note and "0.3" in note
    verdict = fm.depth_verdict(depth)
    trained = [line for line in verdict if line.startswith("- **after training")]
    assert len(trained) == 3  # batch and running statistics, and the pair left out
    assert all("plain20" in line and "plain56 keeps" not in line for line in trained[:2])
    assert "plain56 did not learn" in trained[2] and "56-layer pair is left out" in trained[2]
    rows = {row[0]: row for row in fm.depth_rows(depth, "batch")}
    assert rows["plain56"][2] == "0.217 (did not learn)" and rows["plain20"][2] == "0.767"
    # Where every trained net learned, nothing is left out and the 56-layer pair is judged.
    learned = quick_depth(plain56_accuracy=0.6)
    assert "Every trained net learned" in fm.accuracy_note(learned)
    trained = [x for x in fm.depth_verdict(learned) if x.startswith("- **after training")]
    assert len(trained) == 2 and all("plain56 keeps" in line for line in trained)


FILTER_TUNING = [{"kind": "vertical edge", "direction_deg": 0.0, "selectivity": 0.5,
                  "edge_gain": 3.0, "excess": [1.0, 0.0]}] * 6  # fmt: skip
FILTER_STATE = {"tuning": FILTER_TUNING, "map_correlation": np.eye(6).tolist(),
                "mean_abs_correlation": 0.0, "max_abs_correlation": 0.0}  # fmt: skip
FILTERS = {"arch": "lenet5", "epochs": 1, "test_accuracy": 0.5, "test_images": 360,
           "trained": FILTER_STATE, "init": FILTER_STATE, "example": {"label": 3}}  # fmt: skip


def render_page(tmp_path, monkeypatch, depth: dict) -> str:
    """write_page's text for these numbers (its figures are not drawn)."""
    monkeypatch.setattr(fm.harness, "save_figure", lambda figure, path: path)
    for name in ("draw_filters", "draw_maps", "draw_curves", "draw_deep_maps"):
        monkeypatch.setattr(fm, name, lambda *args: None)
    run = fm.harness.start("feature_maps", fm.__doc__, ["--smoke", "--out", str(tmp_path)])
    fm.write_page(run, fm.settings_for(run), FILTERS, depth)
    return (tmp_path / "feature_maps.md").read_text()


def test_likely_reason_only_where_the_numbers_show_it(tmp_path, monkeypatch):
    page = render_page(tmp_path / "quick", monkeypatch, quick_depth())
    (reason,) = [p for p in page.split("\n\n") if p.startswith("A likely reason")]
    # at init, 110 layers: BatchNorm kept plain110's signal while its gradient exploded;
    # without normalisation plain110 faded and resnet110's contrast grew 4.3e7-fold
    assert "cannot shrink towards zero (plain110 kept 0.55" in reason
    assert "2.31e+05x the residual net's" in reason
    assert "leaves almost nothing (plain110: 1.5e-05" in reason
    assert "growing without bound (resnet110: 4.3e+07x)" in reason
    # Numbers that show neither: with BatchNorm the plain net faded and its gradient did not
    # explode; without it, it did not fade. No mechanism is offered for what did not happen.
    depth = quick_depth()
    for arch in ("plain20", "plain56", "plain110"):
        depth["nets"][arch]["init"]["batch"] = mode(0.05, 1.0)
        depth["nets"][arch]["init"]["running"] = mode(0.5, 1.0)
    page = render_page(tmp_path / "neither", monkeypatch, depth)
    assert "A likely reason" not in page and "Yang et al." not in page
    assert "BatchNorm re-scales" not in page and "growing without bound" not in page

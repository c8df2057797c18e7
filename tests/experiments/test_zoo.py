"""experiments/zoo.py: the smoke run measures through the library; the pure parts are exact."""

from __future__ import annotations

import functools
import json

import pytest
import zoo

from flaxcnn import cli, models

# Counted by hand from the layer shapes, not by the code under test.
SIMPLE_CNN_PARAMS = (3 * 9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (
    4 * 4 * 64 * 64 + 64
) + (64 * 10 + 10)  # fmt: skip
SIMPLE_CNN_MACS = 32 * 32 * 16 * 27 + 16 * 16 * 32 * 144 + 8 * 8 * 64 * 288 + 1024 * 64 + 640
LENET5_PARAMS = (1 * 25 * 6 + 6) + (6 * 25 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (
    84 * 10 + 10
)  # fmt: skip


@pytest.mark.slow
def test_smoke_benches_and_trains_through_the_library(run_experiment, reference):
    record, out = run_experiment("zoo")
    assert record["size"] == "smoke"
    data = record["data"]
    rows = {r["arch"]: r for r in data["rows"]}
    assert data["archs"] == ["simple_cnn", "lenet5"]  # family order: simple, then lenet
    assert data["digits_native_size"] == 8
    simple, lenet = rows["simple_cnn"], rows["lenet5"]

    assert SIMPLE_CNN_PARAMS == 89_834
    assert simple["design"]["macs"] == simple["digits_macs"] == SIMPLE_CNN_MACS == 2_867_840
    assert LENET5_PARAMS == reference["other"]["lenet5_10_classes_params"] == 61_706
    assert simple["design"]["params"] == simple["bench"]["params"] == SIMPLE_CNN_PARAMS
    assert lenet["design"]["params"] == lenet["bench"]["params"] == LENET5_PARAMS
    assert simple["reference"] is None
    assert lenet["reference"] == {"params": 61_706, "source": "course", "match": True}
    # LeNet-5 at 32x32x1: conv 28*28*6*25, conv 10*10*16*150, then 400*120 + 120*84 + 84*10.
    lenet_macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert lenet["design"]["macs"] == lenet["digits_macs"] == lenet_macs == 416_520
    assert lenet["bench"]["macs_per_image"] == lenet_macs

    for row in rows.values():
        bench = row["bench"]
        # Bench and training share the trainer's input for 8x8 digits: both nets' 32x32.
        assert row["digits_input"]["image_size"] == bench["image_size"] == 32
        assert bench["batch_size"] == 8 and bench["steps"] == 1 and bench["num_classes"] == 10
        # The timings are of one another: a step of 8 images at the measured step time, and
        # the compiles, the init and the timed steps all inside the benchmark's wall time.
        step_s = bench["train_step_ms"] / 1e3
        assert bench["train_images_per_sec"] * step_s == pytest.approx(8, rel=1e-9)
        eval_s = 8 / bench["eval_images_per_sec"]
        parts = [bench[k] for k in ("init_sec", "train_compile_sec", "eval_compile_sec")]
        assert all(t > 0 for t in [*parts, step_s, eval_s])
        assert sum(parts) + step_s + eval_s < bench["wall_sec"]
        assert row["bench_skipped"] is None
        assert row["digits_params"] == row["design"]["params"]
    assert lenet["digits_input"]["in_channels"] == 1

    # Smoke trains only what costs at most 1 M multiply-adds: lenet5, not simple_cnn (2.9 M).
    assert simple["train"] is None
    assert simple["train_skipped"] == "3 M multiply-adds > 1 M"
    train = lenet["train"]
    assert lenet["train_skipped"] is None
    assert train["epochs"] == 1 and train["batch_size"] == 128
    # The trainer's own log of the run (its checkpoints were deleted, its metrics kept):
    # one epoch of 10 steps of 128 digits, then one evaluation on the 144 validation and the
    # 360 test digits.
    lines = (out.parent / "work" / "lenet5" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert [(r["split"], r["epoch"], r["step"]) for r in logged] == [
        ("train", 1, 10),
        ("val", 1, 10),
        ("test", 1, 10),
    ]
    assert train["accuracy"] == logged[2]["accuracy"] and train["loss"] == logged[2]["loss"]
    assert train["final_train_accuracy"] == logged[0]["accuracy"]
    assert train["final_train_loss"] == logged[0]["loss"]
    for accuracy, examples in ((train["accuracy"], 360), (train["final_train_accuracy"], 10 * 128)):
        assert accuracy * examples == pytest.approx(round(accuracy * examples), abs=1e-6)
    assert train["log"][-1] == f"test accuracy: {train['accuracy']:.4f}"
    assert 0 < 11 * 128 / logged[0]["images_per_sec"] < train["wall_sec"]  # the epoch's time

    page = (out / "zoo.md").read_text()
    assert "| lenet | lenet5 | 32x32x1 | 10 | 61,706 | 0.000417 | 61,706 | course | yes |" in page
    bench = lenet["bench"]
    measured = (
        f"| lenet | lenet5 | 32x32x1 | 61,706 | 0.417 | 5 | {bench['train_images_per_sec']:,.0f} | "
        f"{bench['eval_images_per_sec']:,.0f} | {bench['train_compile_sec']:.1f} | "
        f"{train['accuracy']:.3f} |"
    )
    assert measured in page
    simple_bench = simple["bench"]
    assert (  # simple_cnn was benched but not trained: its accuracy cell is empty
        f"| simple | simple_cnn | 32x32x3 | 89,834 | {SIMPLE_CNN_MACS / 1e6:.3g} | 5 | "
        f"{simple_bench['train_images_per_sec']:,.0f} | "
        f"{simple_bench['eval_images_per_sec']:,.0f} | "
        f"{simple_bench['train_compile_sec']:.1f} |  |"
    ) in page
    assert "Not trained at this size" in page and "simple_cnn (3 M multiply-adds > 1 M)" in page
    assert "accuracy part of the claim is untested" in page  # only one network trained
    assert "| lenet5 | 32x32x1 |  |  |  |  |" in page  # the full table: not run, empty
    assert "python experiments/zoo.py --full" in page
    assert (out / "zoo.png").stat().st_size > 10_000


def test_table_order_is_family_then_depth():
    order = zoo.sort_by_family(models.names())
    assert sorted(order) == models.names() and len(order) == 28
    assert order[:4] == ["simple_cnn", "lenet5", "alexnet", "vgg11"]
    assert order.index("vgg11_bn") < order.index("vgg13") < order.index("vgg19_bn")
    assert order.index("resnet18") < order.index("resnet50") < order.index("resnet152")
    assert order.index("resnet20") < order.index("resnet56") < order.index("resnet110")
    assert order.index("resnet110") < order.index("plain20")


def test_arch_option():
    assert zoo.parse_archs(None, ["a"]) == ["a"]
    assert zoo.parse_archs(["lenet5,resnet20", "lenet5"], []) == ["lenet5", "resnet20"]
    with pytest.raises(cli.UsageError, match="resnet2"):
        zoo.parse_archs(["resnet2"], [])


def test_bad_arch_is_a_usage_error_before_anything_is_written(tmp_path):
    with pytest.raises(cli.UsageError, match="unknown architecture"):
        zoo.main(["--smoke", "--arch", "nope", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_published_counts_and_their_rounding(reference):
    assert zoo.reference_params("resnet18", reference) == (11_689_512, "torchvision")
    assert zoo.reference_params("netresdeep", reference) == (159_594, "course")
    he = zoo.reference_params("resnet56", reference)
    assert he == (0.85, "He et al. 2016 (millions)")
    assert zoo.reference_params("plain20", reference) is None  # He et al. give no count
    assert zoo.reference_params("simple_cnn", reference) is None
    assert zoo.decimals(0.27) == 2 and zoo.decimals(1.7) == 1 and zoo.decimals(61706) == 0
    assert zoo.params_match(269_722, 0.27, "He et al. 2016 (millions)")
    assert zoo.params_match(1_727_962, 1.7, "He et al. 2016 (millions)")
    assert not zoo.params_match(280_000, 0.27, "He et al. 2016 (millions)")
    assert zoo.params_match(61_706, 61_706, "course")
    assert not zoo.params_match(61_707, 61_706, "course")


def test_design_point_is_torchvisions(reference):
    point = zoo.design_point("resnet18")
    assert (point["input_size"], point["in_channels"], point["num_classes"]) == (224, 3, 1000)
    assert point["params"] == reference["params"]["resnet18"]
    assert point["macs"] / 1e9 == pytest.approx(reference["gmacs"]["resnet18"], rel=0.01)
    assert zoo.design_point("resnet20")["params"] == 269_722


def test_digits_input_is_the_trainers():
    assert zoo.digits_input("resnet18", 8) == (8, {"small_stem": True})
    assert zoo.digits_input("vgg11", 8) == (32, {})  # VGG's minimum
    assert zoo.digits_input("alexnet", 8) == (63, {})
    assert zoo.digits_input("lenet5", 8) == (32, {})  # its design size


def test_skip_reasons():
    assert zoo.skip_reason(None, None, 10**12, 1000) is None
    assert zoo.skip_reason(50.0, 60, 50_000_000, 60) is None
    assert zoo.skip_reason(50.0, 60, 50_000_001, 60) == "50 M multiply-adds > 50 M"
    assert zoo.skip_reason(50.0, 60, 1, 61) == "61 layers > 60"
    assert zoo.skip_reason(1.0, 10, 3_000_000, 11) == "3 M multiply-adds > 1 M, 11 layers > 10"


@pytest.mark.slow
def test_quick_limits_fall_where_the_docstring_says():
    """--quick benches VGG-11 but not VGG-13 nor resnet101, trains resnet18, plain20 and
    googlenet but not resnet34, resnet32 or alexnet: the limits sit between their costs."""
    quick = zoo.SETTINGS["quick"]

    @functools.cache  # each network traced once, however many limits it is held against
    def cost(arch: str) -> tuple[int, int]:
        size, options = zoo.digits_input(arch, 8)
        found = zoo.digits_cost(arch, size, options, 10)  # what measure() holds to the limits
        return found["macs"], found["layers"]

    def benched(arch: str) -> bool:
        return zoo.skip_reason(quick.bench_max_mmacs, quick.max_layers, *cost(arch)) is None

    def trained(arch: str) -> bool:
        return zoo.skip_reason(quick.train_max_mmacs, quick.max_layers, *cost(arch)) is None

    assert cost("vgg11") == (272_343_040, 11)  # 8 convs + 3 dense
    assert benched("vgg11") and not benched("vgg13")
    assert cost("resnet56")[1] == 56 and benched("resnet56")
    assert cost("resnet101")[1] == 105 and not benched("resnet101")
    for arch in ("resnet18", "plain20", "netresdeep", "googlenet"):
        assert trained(arch), arch
    for arch in ("resnet34", "resnet32", "alexnet"):
        assert not trained(arch), arch


def _row(arch: str, params: int, accuracy: float | None) -> dict:
    train = None if accuracy is None else {"accuracy": accuracy}
    return {"arch": arch, "digits_params": params, "train": train}


def test_verdict_follows_the_measurements():
    settings = zoo.SETTINGS["quick"]
    held = zoo.accuracy_sentence(
        [_row("lenet5", 61_706, 0.95), _row("simple_cnn", 89_834, 0.97),
         _row("vgg11", 10**8, 0.98), _row("resnet18", 10**7, 0.90)],
        settings,
    )  # fmt: skip
    assert "the claim held" in held and "best small network" in held
    assert "was simple_cnn (89,834 parameters) at 0.970" in held
    assert "1 of the 2 larger networks trained scored more than 2 points below" in held
    failed = zoo.accuracy_sentence(
        [_row("lenet5", 61_706, 0.90), _row("vgg11", 10**8, 0.97), _row("x", 10**6, None)],
        settings,
    )
    assert "did not hold" in failed and "vgg11 beat every small network by 7.0 points" in failed
    short = zoo.accuracy_sentence(
        [_row("lenet5", 61_706, 0.5), _row("vgg11", 10**8, 0.6)], settings
    )
    assert "says nothing either way" in short
    assert "untested" in zoo.accuracy_sentence([_row("lenet5", 61_706, 0.99)], settings)


def test_cost_verdict_uses_the_rank_correlation():
    assert zoo.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert zoo.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)

    def row(arch, macs, speed):
        design = {"params": macs, "macs": macs}
        bench = {"macs_per_image": macs, "train_images_per_sec": speed}
        return {"arch": arch, "design": design, "bench": bench}

    falling = zoo.cost_sentence([row("a", 10, 900.0), row("b", 100, 90.0), row("c", 1e4, 9.0)])
    assert "-1.00: the cost part of the claim held" in falling
    assert "from 9.0 images/s (c) to 900 images/s (a), x100 apart" in falling
    assert "(x1,000)" in falling and zoo.ratio_text(1.43) == "1.4"
    flat = zoo.cost_sentence([row("a", 10, 9.0), row("b", 100, 90.0), row("c", 1e4, 900.0)])
    assert "did not hold" in flat


def test_reference_sentence_counts_matches_and_macs():
    def row(arch, match, macs=None, published=None):
        ref = {"params": 1, "source": "torchvision", "match": match}
        return {"arch": arch, "reference": ref, "design": {"macs": macs},
                "published_gmacs": published}  # fmt: skip

    text = zoo.reference_sentence(
        [row("a", True, 1.002e9, 1.0), row("b", True, 2.0e9, 2.0), row("c", False)]
    )
    assert text.startswith("2 of 3 published parameter counts match; these do NOT: c.")
    assert "for the 2 networks it lists to within 0.20% (largest difference: a)" in text


def _point(arch: str, family: str, macs: float, speed: float, accuracy: float | None = None):
    return {"arch": arch, "family": family, "digits_macs": macs,
            "bench": {"macs_per_image": macs, "train_images_per_sec": speed},
            "train": None if accuracy is None else {"accuracy": accuracy}}  # fmt: skip


def test_point_labels_neither_overlap_nor_leave_the_axes():
    """Every label in both panels of the drawn figure: no two labels' boxes intersect and
    none crosses the axes' frame, even for points on top of one another (vgg11 and
    vgg11_bn: the same multiply-adds, 14.9 and 14.0 images/s, at the right edge) or a
    crowd of six at almost the same spot."""
    from matplotlib.text import Text

    rows = [
        _point("lenet5", "lenet", 416_520, 2209.9, 0.93),
        _point("simple_cnn", "simple", 2_867_840, 860.6, 0.93),
        _point("alexnet", "alexnet", 94_089_920, 31.2),
        _point("vgg11", "vgg", 272_343_040, 14.9),
        _point("vgg11_bn", "vgg", 272_343_040, 14.0),
    ]
    rows += [
        _point(f"net{i}", "resnet_cifar", 60e6 * (1 + i / 500), 80 + i / 2, 0.97 - i / 1000)
        for i in range(6)
    ]
    figure = zoo.figure(rows, zoo.SETTINGS["quick"])
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for ax, named in zip(figure.axes, (11, 8), strict=True):
        frame = ax.get_window_extent(renderer)
        boxes = {text.get_text(): Text.get_window_extent(text, renderer) for text in ax.texts}
        assert len(boxes) == named
        for name, box in boxes.items():
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1
            assert inside and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
            for other, second in boxes.items():
                assert name == other or not box.overlaps(second), (name, other)

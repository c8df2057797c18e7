"""experiments/bottleneck.py: the course's exact figures and GoogLeNet's own counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flaxcnn import models
from flaxcnn.models import inception, summary

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import bottleneck  # noqa: E402


@pytest.fixture
def smoke(run_experiment, once_per_run) -> dict:
    """The script run once per test run at --smoke: its JSON record, its page, its directory."""

    def make(_) -> dict:
        record, out = run_experiment("bottleneck")
        return {"record": record, "page": (out / "bottleneck.md").read_text(), "dir": str(out)}

    result = once_per_run("bottleneck-smoke", make)
    return {**result, "dir": Path(result["dir"])}


@pytest.mark.slow
def test_course_figures_exact(smoke):
    course = smoke["record"]["data"]["course"]
    assert course["direct"]["macs"] == 160_563_200
    assert course["bottleneck"]["macs"] == 13_246_464
    assert course["direct"]["formula_macs"] == 160_563_200
    assert course["bottleneck"]["formula_macs"] == 13_246_464
    assert course["direct"]["params"] == 5 * 5 * 256 * 32
    assert course["bottleneck"]["params"] == 256 * 16 + 5 * 5 * 16 * 32
    assert course["macs_ratio"] == pytest.approx(160_563_200 / 13_246_464)
    page = smoke["page"]
    assert "160,563,200" in page and "13,246,464" in page
    assert "The claim held as counted." in page


@pytest.mark.slow
def test_xla_counts_only_valid_taps(smoke):
    """XLA's flops are 2 x the MACs over the taps inside the unpadded input, exactly."""
    for kind in ("direct", "bottleneck"):
        entry = smoke["record"]["data"]["course"][kind]
        if entry["xla_flops"] is None:
            pytest.skip("this backend gives no flop count")
        assert entry["xla_flops"] == entry["xla_flops_valid_taps_formula"]
        assert 0.9 < entry["xla_flops_over_2macs"] < 1.0
    assert smoke["record"]["data"]["course"]["direct"]["xla_flops"] == 294_191_104


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
@pytest.mark.slow
def test_googlenet_modules_match_the_models_own_counts(smoke, variant):
    result = smoke["record"]["data"]["googlenet"][variant]
    net = models.create("googlenet", paper_5x5=result["paper_5x5"])
    rows = {r.path: r for r in summary.layer_table(net, (1, 224, 224, 3), depth=1)}
    assert list(result["modules"]) == list(inception.INCEPTION_CONFIGS)
    for name, m in result["modules"].items():
        assert m["module_bottleneck_macs"] == rows[name].macs, name
        assert m["module_bottleneck_params"] == rows[name].params, name
        assert m["formula_agrees"] and m["network_agrees"], name
        assert m["b3_direct_macs"] > m["b3_bottleneck_macs"], name
        assert m["b5_direct_macs"] > m["b5_bottleneck_macs"], name
        assert m["module_direct_params"] > m["module_bottleneck_params"], name
    assert result["network_macs"] == sum(r.macs for r in rows.values())
    assert result["network_without_reductions_macs"] > result["network_macs"]


@pytest.mark.slow
def test_module_inputs_and_a_hand_count(smoke):
    modules = smoke["record"]["data"]["googlenet"]["paper"]["modules"]
    assert modules["inception3a"]["input"] == [28, 28, 192]
    assert modules["inception4a"]["input"] == [14, 14, 480]
    assert modules["inception5b"]["input"] == [7, 7, 832]
    # 4a's 5x5 branch without its reduction: 14*14*48 outputs x 5*5*480 taps.
    assert modules["inception4a"]["b5_direct_macs"] == 14 * 14 * 48 * 5 * 5 * 480
    assert modules["inception4a"]["b5_bottleneck_macs"] == 14 * 14 * (16 * 480 + 48 * 25 * 16)


@pytest.mark.slow
def test_page_has_full_section_with_empty_timing(smoke):
    page = smoke["page"]
    assert "python experiments/bottleneck.py --full" in page
    assert "| course example | 256 |  |  |  |" in page
    assert (smoke["dir"] / "bottleneck.png").stat().st_size > 10_000


def test_valid_taps():
    assert bottleneck.valid_taps(28, 5) == 134
    assert bottleneck.valid_taps(28, 1) == 28
    assert bottleneck.valid_taps(7, 3) == 7 * 3 - 2
    assert bottleneck.conv_macs(28, 28, 256, 32, 5) == 160_563_200

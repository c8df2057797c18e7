"""experiments/bench_cpu.py: the CPU table's runs, its verdicts, and the README made from it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import bench_cpu  # noqa: E402

from flaxcnn import cli  # noqa: E402

HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "torchvision"))


def bench_json(arch, size, batch, ours, torch=None, loop=None, util=0.25, channels=3, options=None):
    """What `python -m flaxcnn.bench --json` writes for one network (the keys read here)."""
    result = {
        "arch": arch,
        "image_size": size,
        "in_channels": channels,
        "model_options": options or {},
        "batch_size": batch,
        "train_images_per_sec": ours,
        "train_utilisation": util,
        "runs": [{"train_images_per_sec": ours * f} for f in (0.9, 1.0, 1.1)],
        "peak": {"flops_per_sec": 190e9, "matrix_size": 2048},
    }
    if torch is not None:
        result.update(
            reference="torch",
            torch_train_images_per_sec=torch,
            train_ratio_to_torch=ours / torch,
            eval_ratio_to_torch=1.5,
            torch={"torch_version": "2.14.1", "threads": 2,
                   "runs": [{"train_images_per_sec": torch}] * 3},
        )  # fmt: skip
    if loop is not None:
        result.update(loop_ratio_to_step=loop, loop_images_per_sec=ours * loop)
    return {"results": [result], "load_average_at_start": 0.3}


def record(net, bench, error=None):
    """A run as `bench_one` records it."""
    return {"network": {"arch": net.arch, "image_size": net.image_size,
                        "batch_size": net.batch_size, "loop": net.loop},
            "command": f"python -m flaxcnn.bench --arch {net.arch}", "exit_code": 1 if error else 0,
            "wall_sec": 1.0, "error": error, "stdout": "", "bench": bench}  # fmt: skip


LENET, RESNET20, RESNET18, RESNET50 = bench_cpu.TARGETS
STEM = {"small_stem": True}
# The README's figures of 2026-11-29, as the benchmark would have written them.
BENCH = [
    (LENET, bench_json("lenet5", 32, 128, 6001, 11467, 0.61, 0.07, channels=1)),
    (RESNET20, bench_json("resnet20", 32, 128, 214, 366, 1.11, 0.24)),
    (RESNET18, bench_json("resnet18", 32, 64, 38, 49, None, 0.47, options=STEM)),
    (RESNET50, bench_json("resnet50", 32, 32, 18.2, 18.2, None, 0.55, options=STEM)),
]
ROWS = [bench_cpu.row_of(record(net, bench)) for net, bench in BENCH]


def test_quick_measures_the_four_targets_of_issue_24_each_in_one_run():
    quick = bench_cpu.SETTINGS["quick"]
    assert quick.repeats == 5
    commands = [bench_cpu.shown(bench_cpu.bench_command(n, quick, Path("x.json")))
                for n in quick.networks]  # fmt: skip
    common = "--steps 10 --dtype float32 --reference torch --repeats 5"
    assert commands == [
        f"python -m flaxcnn.bench --arch lenet5 --image-size 32 --batch-size 128 {common} "
        "--loop --json x.json",
        f"python -m flaxcnn.bench --arch resnet20 --image-size 32 --batch-size 128 {common} "
        "--loop --json x.json",
        f"python -m flaxcnn.bench --arch resnet18 --image-size 32 --batch-size 64 {common} "
        "--json x.json",
        f"python -m flaxcnn.bench --arch resnet50 --image-size 32 --batch-size 32 {common} "
        "--json x.json",
    ]
    smoke = bench_cpu.SETTINGS["smoke"]
    assert len(smoke.networks) == 1 and smoke.steps == 1 and smoke.repeats == 1


def test_the_table_reads_the_benchmark_figures_as_the_readme_prints_them():
    assert [row["label"] for row in ROWS] == [
        "LeNet-5 (32x32x1, 128)", "ResNet-20 (32x32, 128)",
        "ResNet-18, small stem (32x32, 64)", "ResNet-50, small stem (32x32, 32)",
    ]  # fmt: skip
    assert bench_cpu.table_rows(ROWS) == [
        ["LeNet-5 (32x32x1, 128)", "6,001", "11,467", "0.52", "7%", "0.61"],
        ["ResNet-20 (32x32, 128)", "214", "366", "0.58", "24%", "1.11"],
        ["ResNet-18, small stem (32x32, 64)", "38", "49", "0.78", "47%", ""],
        ["ResNet-50, small stem (32x32, 32)", "18.2", "18.2", "1.00", "55%", ""],
    ]
    assert bench_cpu.peak_text(ROWS) == (
        "a 2048x2048 float32 matrix product measured in the same run (190 GFLOP/s here)"
    )


def test_verdicts_from_the_numbers():
    lenet, resnet20, resnet18, resnet50 = ROWS
    assert bench_cpu.verdicts(lenet) == {"train": "not met", "loop": "not met"}
    assert bench_cpu.verdicts(resnet20) == {"train": "not met", "loop": "met"}
    assert bench_cpu.verdicts(resnet18) == {"train": "not met", "loop": None}  # no loop target
    assert bench_cpu.verdicts(resnet50) == {"train": "met", "loop": None}  # 1.00 exactly
    faster = {**resnet18, "ratio": 1.02}
    assert bench_cpu.verdicts(faster)["train"] == "met"
    just_under = {**resnet50, "ratio": 0.996}  # shows as 1.00, is not 1.0
    assert bench_cpu.verdicts(just_under)["train"] == "not met"
    no_torch = bench_cpu.row_of(record(RESNET20, bench_json("resnet20", 32, 128, 214, util=0.24)))
    assert no_torch["ratio"] is None and no_torch["loop_ratio"] is None
    assert bench_cpu.verdicts(no_torch) == {"train": "not measured", "loop": "not measured"}
    assert bench_cpu.table_rows([no_torch]) == [
        ["ResNet-20 (32x32, 128)", "214", "", "", "24%", ""]
    ]
    failed = bench_cpu.row_of(record(RESNET50, None, error="error: out of memory"))
    assert failed["label"] == "ResNet-50 (32x32, 32)"
    assert bench_cpu.table_rows([failed]) == [["ResNet-50 (32x32, 32)", "", "", "", "", ""]]
    assert bench_cpu.verdicts(failed) == {"train": "not measured", "loop": None}
    assert bench_cpu.targets_summary(ROWS) == (
        "Issue 24's targets: train images/s at least 1.0x PyTorch's: met for 1 of 4 (short: "
        "LeNet-5 0.52, ResNet-20 0.58, ResNet-18 0.78); loop/step at least 0.9 for LeNet-5 "
        "and ResNet-20: met for 1 of 2 (short: LeNet-5 0.61)."
    )
    assert "ResNet-50 not measured" in bench_cpu.targets_summary([*ROWS[:3], failed])
    text = bench_cpu.verdict([*ROWS[:3], failed])
    assert text.startswith("The targets were met only in part in this run.")
    assert "ResNet-50 (32x32, 32): error: out of memory" in text
    assert bench_cpu.verdict([{**r, "ratio": 1.2, "loop_ratio": 0.95} for r in ROWS]).startswith(
        "Every target was met"
    )


def published(rows, commit="0123456789abcdef", changes=False):
    """A quick page's JSON as `harness.Page.write` makes it (the keys the README reads)."""
    return {
        "experiment": "bench_cpu",
        "size": "quick",
        "command": "python experiments/bench_cpu.py",
        "code": {"commit": commit, "uncommitted_changes": changes},
        "load_average_at_start": [0.1, 0.2, 0.3],
        "environment": {"date": "2026-12-07 15:00 UTC", "cpu": "Some Xeon", "cores": 2,
                        "memory_gib": 7.8, "devices": "1 x cpu (cpu)", "jax": "0.10.2",
                        "load_average_at_end": [2.1, 1.5, 1.0]},
        "data": {"settings": {"steps": 10, "repeats": 5}, "rows": rows},
    }  # fmt: skip


README_TEXT = "# flaxcnn\n\n### Training speed on a CPU\n\n{block}\n\nOn a VM like this one...\n"


def test_the_readme_block_is_made_from_the_json_alone():
    block = bench_cpu.readme_block(published(ROWS))
    assert block == bench_cpu.readme_block(published(ROWS))  # a pure function
    lines = block.splitlines()
    assert lines[0] == bench_cpu.BEGIN and lines[-1] == bench_cpu.END
    prose = [line for line in lines[1:-1] if not line.startswith("|")]
    assert max(len(line) for line in prose) <= bench_cpu.README_WIDTH
    paragraphs = "\n".join(lines[1:-1]).split("\n\n")
    intro, _, after = (" ".join(p.splitlines()) for p in paragraphs)
    assert intro.startswith(
        "Measured 2026-12-07 15:00 UTC on Some Xeon (2 cores, 7.8 GiB; jax devices: 1 x cpu "
        "(cpu); jax 0.10.2, torch 2.14.1 with its 2 threads) at commit 0123456789, load "
        "average 0.1 at the start and 2.1 at the end; float32, synthetic data."
    )
    assert "--steps 10 --reference torch --repeats 5" in intro
    assert "with `--loop` for LeNet-5 and ResNet-20" in intro
    assert intro.endswith("[its page](experiments/results/bench_cpu.md):")
    assert lines[lines.index("") + 1 : lines.index("") + 7] == [
        "| network (input, batch)            | flaxcnn img/s | PyTorch img/s | ratio | "
        "utilisation | loop / step |",
        "|-----------------------------------|--------------:|--------------:|------:|"
        "------------:|------------:|",
        "| LeNet-5 (32x32x1, 128)            |         6,001 |        11,467 |  0.52 |"
        "          7% |        0.61 |",
        "| ResNet-20 (32x32, 128)            |           214 |           366 |  0.58 |"
        "         24% |        1.11 |",
        "| ResNet-18, small stem (32x32, 64) |            38 |            49 |  0.78 |"
        "         47% |             |",
        "| ResNet-50, small stem (32x32, 32) |          18.2 |          18.2 |  1.00 |"
        "         55% |             |",
    ]
    assert after.startswith(
        "Utilisation is against a 2048x2048 float32 matrix product measured in the same run "
        "(190 GFLOP/s here). Issue 24's targets: train images/s at least 1.0x PyTorch's: met "
        "for 1 of 4"
    )
    dirty = " ".join(bench_cpu.readme_block(published(ROWS, changes=True)).splitlines())
    assert "at commit 0123456789 with uncommitted changes," in dirty


def test_the_readme_block_is_replaced_exactly(tmp_path, capsys):
    old = README_TEXT.format(block=f"{bench_cpu.BEGIN}\nhand-copied figures\n{bench_cpu.END}")
    block = bench_cpu.readme_block(published(ROWS))
    new = bench_cpu.replace_block(old, block)
    assert new == README_TEXT.format(block=block)
    assert bench_cpu.current_block(new) == block
    assert bench_cpu.replace_block(new, block) == new
    readme, source = tmp_path / "README.md", tmp_path / "bench_cpu.json"
    readme.write_text(old)
    source.write_text(json.dumps(published(ROWS)))
    assert bench_cpu.update_readme(readme, source)
    assert readme.read_text() == new
    assert not bench_cpu.update_readme(readme, source)  # already in sync: left alone
    assert "already matches" in capsys.readouterr().out
    for broken in ("no markers", f"{bench_cpu.BEGIN}\n{bench_cpu.END}\n{bench_cpu.END}",
                   f"{bench_cpu.END}\n{bench_cpu.BEGIN}"):  # fmt: skip
        with pytest.raises(cli.UsageError):
            bench_cpu.replace_block(broken, block)
    with pytest.raises(cli.UsageError, match="does not exist"):
        bench_cpu.read_published(tmp_path / "missing.json")
    source.write_text(json.dumps({**published(ROWS), "size": "full"}))
    with pytest.raises(cli.UsageError, match="quick page"):
        bench_cpu.read_published(source)


def test_the_readme_has_one_generated_block():
    block = bench_cpu.current_block((ROOT / "README.md").read_text())
    assert "| network (input, batch)" in block


def test_the_readme_table_is_generated_from_the_committed_json():
    if not bench_cpu.PUBLISHED.exists():
        pytest.skip("experiments/results/bench_cpu.json is not committed yet (the main "
                    "session publishes it on an idle machine)")  # fmt: skip
    record = json.loads(bench_cpu.PUBLISHED.read_text())
    readme = (ROOT / "README.md").read_text()
    assert bench_cpu.current_block(readme) == bench_cpu.readme_block(record), (
        "README.md's CPU table differs from experiments/results/bench_cpu.json: run "
        "python experiments/bench_cpu.py --readme"
    )


def test_without_torch_it_says_so_and_measures_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_cpu.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(cli.UsageError, match="torch and torchvision not installed"):
        bench_cpu.main(["--smoke", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "bench_cpu.json").exists()


@pytest.mark.parametrize("argv", [["--readme", "--full"], ["--readme", "--publish"]])
def test_bad_input_is_one_line_and_exit_2(argv, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_cpu.py"), *argv],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="the smoke run measures against torch, not installed")
def test_smoke_run(run_experiment):
    record, out = run_experiment("bench_cpu")
    data = record["data"]
    assert record["size"] == "smoke"
    (run,) = data["runs"]
    assert run["exit_code"] == 0, run["error"]
    assert run["command"].startswith("python -m flaxcnn.bench --arch lenet5 --image-size 32 ")
    assert "--reference torch --repeats 1" in run["command"] and "--loop" in run["command"]
    (result,) = run["bench"]["results"]
    (row,) = data["rows"]
    # The row's figures are the benchmark's own, and the ratio is theirs over torch's.
    assert row["train_images_per_sec"] == result["train_images_per_sec"] > 0
    assert row["torch_train_images_per_sec"] == result["torch_train_images_per_sec"] > 0
    assert row["ratio"] == pytest.approx(
        result["train_images_per_sec"] / result["torch_train_images_per_sec"]
    )
    assert row["loop_ratio"] == result["loop_ratio_to_step"] > 0
    assert row["peak_flops_per_sec"] == result["peak"]["flops_per_sec"] > 0
    assert row["verdicts"] == bench_cpu.verdicts(row)
    assert row["verdicts"]["train"] in ("met", "not met")
    page = (out / "bench_cpu.md").read_text()
    assert "## The targets (issue 24)" in page and run["command"] in page
    assert "| network (input, batch) | flaxcnn img/s | PyTorch img/s |" in page
    assert (out / "bench_cpu.png").stat().st_size > 5_000
    # The README's block can be made from any page's JSON, this one's too.
    assert "| LeNet-5 (32x32x1, 16) " in bench_cpu.readme_block(record)

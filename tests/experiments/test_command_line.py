"""Every experiment script: a bad argument is one line on stderr and exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
    p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem not in ("harness", "run_all")
)
# Scripts that import jax and flaxcnn's models before they parse their arguments take 2.5-4 s
# to say no; the quick lane keeps the five that answer in under a second.
LIGHT = ("bench_cpu", "degradation", "feature_maps", "parallel_speed", "small_data")
# Scripts whose quick page has yet to be measured on an idle machine and committed, though
# run_all lists them already. Remove a name here when its page is committed.
UNPUBLISHED: tuple[str, ...] = ()


def test_every_experiment_is_covered():
    assert SCRIPTS == ["bench_cpu", "bottleneck", "degradation", "feature_maps", "loss",
                       "one_by_one", "parallel_speed", "small_data", "zoo"]  # fmt: skip


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


def test_run_all_regenerates_exactly_the_committed_quick_pages(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import run_all

    committed = {
        p.stem
        for p in (ROOT / "experiments" / "results").glob("*.json")
        if json.loads(p.read_text())["size"] == "quick"
    }
    assert not committed & set(UNPUBLISHED)  # published: take it out of UNPUBLISHED
    assert set(run_all.EXPERIMENTS) == committed | set(UNPUBLISHED) == set(SCRIPTS)
    assert run_all.main(["--dry-run", "zoo", "loss"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "+ python experiments/zoo.py --quick --publish",
        "+ python experiments/loss.py --quick --publish",
    ]
    with pytest.raises(SystemExit) as stop:
        run_all.main(["nope"])
    assert stop.value.code == 2 and "unknown experiment 'nope'" in capsys.readouterr().err


def test_scripts_write_into_the_checkout_only_when_asked_to_publish(tmp_path, monkeypatch, capsys):
    """Without --out or --publish a script writes under runs/experiments (of the current
    directory); --publish writes the committed pages; --smoke --publish is refused."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import harness

    monkeypatch.chdir(tmp_path)
    assert harness.start("loss", None, ["--quick"]).out == Path("runs/experiments/results")
    assert harness.start("loss", None, ["--smoke"]).out == Path("runs/experiments/smoke")
    published = harness.start("loss", None, ["--publish"])
    assert published.out == ROOT / "experiments" / "results"
    assert published.command == "python experiments/loss.py"  # as the page shows it
    with pytest.raises(SystemExit) as stop:
        harness.start("loss", None, ["--smoke", "--publish"])
    assert stop.value.code == 2 and "--publish" in capsys.readouterr().err


def test_a_page_names_the_commit_it_was_measured_at(tmp_path, monkeypatch):
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode:
        pytest.skip("not a git checkout")
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    sys.path.insert(0, str(ROOT / "experiments"))
    import harness

    run = harness.start("loss", None, ["--smoke", "--out", str(tmp_path)])
    expected = {"commit": head.stdout.strip(), "uncommitted_changes": harness.changed(changed)}
    assert run.code == expected
    page = harness.Page(run, "Title", claim="a claim")
    page.write(data={"x": 1})
    record = json.loads((tmp_path / "loss.json").read_text())
    assert record["code"] == run.code
    assert len(record["load_average_at_start"]) == 3
    text = (tmp_path / "loss.md").read_text()
    assert f"Code: commit {head.stdout.strip()[:10]}" in text
    assert ("with uncommitted changes" in text) == harness.changed(changed)


def test_pages_already_published_are_not_changes_to_the_code():
    """run_all.py publishes the pages one after another: a page written before is an output,
    while any other tracked file changed (or renamed into place) is a change to the code."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import harness

    pages = " M experiments/results/loss.md\n M experiments/results/loss.png\n"
    assert not harness.changed("") and not harness.changed(pages)
    assert not harness.changed(pages.strip())  # as code_version reads it: stripped
    assert harness.changed(pages + " M flaxcnn/training/loop.py\n")
    assert harness.changed("M  experiments/zoo.py\n")
    assert harness.changed("R  experiments/results/x.md -> experiments/x.py\n")
    assert not harness.changed('R  a.md -> "experiments/results/with space.md"\n')

"""What every experiment shares: its three sizes, where its results go, and the line that
says where, when and how a result was measured.

An experiment script reads like this:

    run = harness.start("degradation", __doc__, argv)       # --smoke | --quick | --full
    ... measure, with flaxcnn's public functions ...
    page = harness.Page(run, "Degradation", claim="...")
    page.table(["network", "test error"], rows)
    page.figure(harness.save_figure(figure, run.path(".png")), "the four curves")
    page.text("The claim held: ...")
    page.write(data={"rows": rows})                          # NAME.md + NAME.json

Every size writes under `runs/experiments/` (`results/`, or `smoke/` for `--smoke`) unless
`--out` says otherwise, so running a script never changes a checkout. `--publish` writes the
committed pages in `experiments/results/` instead (full results go to `NAME-full.*` beside
the quick ones, so a quick run never overwrites them); `experiments/run_all.py` does that
for every committed page. Each page records the commit it was measured at (and whether the
tree had uncommitted changes), the machine, and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flaxcnn import cli

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIZES = ("smoke", "quick", "full")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PUBLISHED_DIR = "experiments/results"  # RESULTS as git status names it, from the root
SCRATCH = Path("runs") / "experiments"
NOT_RUN = ""  # a table cell that was not measured stays empty, never estimated


@dataclasses.dataclass(frozen=True)
class Run:
    """One invocation of an experiment: its size, where it writes, how to repeat it."""

    name: str
    size: str
    out: Path  # the results page, its figures and its JSON
    workdir: Path  # scratch space for training runs (checkpoints, metrics)
    data_dir: str | None
    command: str
    args: argparse.Namespace
    started: float = dataclasses.field(default_factory=time.time)
    code: dict[str, Any] = dataclasses.field(default_factory=lambda: code_version())
    load_at_start: list[float] = dataclasses.field(default_factory=lambda: load_average())

    @property
    def smoke(self) -> bool:
        return self.size == "smoke"

    @property
    def full(self) -> bool:
        return self.size == "full"

    def path(self, suffix: str) -> Path:
        """A results file: `NAME<suffix>` (quick, smoke) or `NAME-full<suffix>` (full)."""
        stem = f"{self.name}-full" if self.full else self.name
        return self.out / f"{stem}{suffix}"

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        """The value for this run's size: `run.pick(smoke=2, quick=20, full=164)`."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.size]

    def train_workdir(self, label: str) -> Path:
        """A fresh directory for one training run of this experiment."""
        path = self.workdir / label
        if path.exists():
            shutil.rmtree(path)  # a rerun trains from scratch; the trainer would resume
        return path


def build_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog=f"python experiments/{name}.py",
        description=(description or "").strip().splitlines()[0] if description else None,
    )
    size = parser.add_mutually_exclusive_group()
    for value, text in (
        ("smoke", "seconds: the test suite runs it so the script cannot rot"),
        ("quick", "minutes on a 2-core laptop; its results are committed (the default)"),
        ("full", "the paper-scale setting, for a GPU/TPU or a long CPU run"),
    ):
        size.add_argument(f"--{value}", dest="size", action="store_const", const=value, help=text)
    parser.set_defaults(size="quick")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--out",
        default=None,
        help="directory for the results page, figures and JSON (default: "
        "runs/experiments/results, or runs/experiments/smoke for --smoke)",
    )
    where.add_argument(
        "--publish",
        action="store_true",
        help="write the committed page in experiments/results (quick and full sizes)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="scratch directory for training runs (default: runs/experiments/NAME-SIZE)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="where prepared data sets live (as flaxcnn.train)"
    )
    return parser


def start(
    name: str,
    description: str | None,
    argv: Sequence[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Run:
    """Parse the command line (bad input: one line, exit 2) and make the output directory."""
    # absl warnings (tfds's OpenCV hint, orbax's notes) would bury the experiment's output.
    logging.getLogger("absl").setLevel(logging.ERROR)
    parser = build_parser(name, description)
    if add_arguments is not None:
        add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.publish and args.size == "smoke":
        parser.error("--publish writes the committed pages: give --quick or --full")
    default_out = SCRATCH / ("smoke" if args.size == "smoke" else "results")
    out = RESULTS if args.publish else Path(args.out) if args.out else default_out
    workdir = Path(args.workdir) if args.workdir else SCRATCH / f"{name}-{args.size}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        cli.fail(f"cannot create --out {out}: {e.strerror or e}")
    if not os.access(out, os.W_OK | os.X_OK):
        cli.fail(f"--out {out} is not writable")
    shown = [a for a in argv if a not in ("--quick", "--publish")]
    if args.size != "quick" and f"--{args.size}" not in shown:
        shown.insert(0, f"--{args.size}")
    command = shlex.join(["python", f"experiments/{name}.py", *shown])
    return Run(name, args.size, out, workdir, args.data_dir, command, args)


def environment() -> dict[str, Any]:
    """The machine and the software versions, as a results page reports them."""
    import flax
    import jax
    import numpy

    device = jax.devices()[0]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "devices": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
        # Timings depend on what else ran: a load above the core count slows them down.
        "load_average_1min": round(os.getloadavg()[0], 1),
    }


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(x, 1) for x in os.getloadavg()]


def code_version() -> dict[str, Any]:
    """The commit of the checkout the experiment runs from, and whether its tracked files
    differed from it (read when the run starts, before it writes anything)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(HERE), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "uncommitted_changes": None if status is None else changed(status)}


def changed(porcelain: str) -> bool:
    """Whether `git status --porcelain` shows a tracked file changed other than a published
    page: `run_all.py` publishes one page after another, and the pages it already wrote are
    outputs of the committed code, not changes to it."""
    # Each line: a two-letter status, a space, the path ("old -> new" for a rename); the
    # status may start with a space, which a stripped output has lost.
    lines = [line.strip() for line in porcelain.splitlines() if line.strip()]
    paths = [line.split(maxsplit=1)[1].split(" -> ")[-1] for line in lines]
    return any(not p.strip('"').startswith(f"{PUBLISHED_DIR}/") for p in paths)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * size / 2**30, 1)


def provenance(run: Run, env: dict[str, Any]) -> str:
    minutes = (time.time() - run.started) / 60
    memory = f", {env['memory_gib']:g} GiB" if env.get("memory_gib") else ""
    load = env.get("load_average_1min")
    busy = (
        f" The machine was also running other jobs (load average {load:g} on "
        f"{env['cores']} cores at the end), so times here are slower than on an idle machine."
        if load is not None and env["cores"] and load > env["cores"] + 0.5
        else ""
    )
    commit = run.code.get("commit")
    code = (
        f" Code: commit {commit[:10]}"
        + (" with uncommitted changes" if run.code.get("uncommitted_changes") else "")
        + "."
        if commit
        else " Code: not a git checkout."
    )
    start_load = run.load_at_start[0] if run.load_at_start else None
    loads = (
        f" Load average (1 min) {start_load:g} at the start, {load:g} at the end."
        if start_load is not None and load is not None
        else ""
    )
    return (
        f"Measured {env['date']} on {env['cpu']} ({env['cores']} cores{memory}; jax devices: "
        f"{env['devices']}), Python {env['python']}, jax {env['jax']}, flax {env['flax']}, "
        f"with `{run.command}` ({minutes:.1f} min, {run.size} size).{code}{loads}{busy}"
    )


def cell(value: Any, fmt: str = "") -> str:
    """A table cell: empty when not measured (None), else `format(value, fmt)`."""
    if value is None:
        return NOT_RUN
    return format(value, fmt) if fmt else str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def text(v: Any) -> str:
        return NOT_RUN if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no pyplot): see `flaxcnn.plot.new_figure`."""
    from flaxcnn import plot  # matplotlib: only for a script's figures, not its child processes

    return plot.new_figure(width, height)


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a PNG atomically (a crash never leaves half a figure)."""
    from flaxcnn import plot

    return plot.save_png(figure, path)


class Page:
    """A results page: the claim, where and how it was measured, tables, figures, verdict."""

    def __init__(self, run: Run, title: str, claim: str):
        self.run = run
        self.title = title
        self.claim = claim
        self.blocks: list[str] = []

    def text(self, markdown: str) -> None:
        self.blocks.append(markdown.strip())

    def heading(self, title: str) -> None:
        self.blocks.append(f"## {title}")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(markdown_table(headers, rows))

    def figure(self, path: Path, caption: str) -> None:
        relative = os.path.relpath(path, self.run.out)
        self.blocks.append(f"![{caption}]({relative})\n\n*{caption}*")

    def render(self, env: dict[str, Any]) -> str:
        parts = [
            f"# {self.title}",
            f"**Claim.** {self.claim}",
            f"**How this was measured.** {provenance(self.run, env)}",
            *self.blocks,
        ]
        return "\n\n".join(parts) + "\n"

    def write(self, data: dict[str, Any] | None = None) -> Path:
        """Write `NAME.md` (and `NAME.json` with `data` and the environment), atomically."""
        env = environment()
        page = self.run.path(".md")
        write_atomic(page, self.render(env))
        record = {
            "experiment": self.run.name,
            "size": self.run.size,
            "command": self.run.command,
            "code": self.run.code,
            "load_average_at_start": self.run.load_at_start,
            "environment": {**env, "load_average_at_end": load_average()},
            "seconds": round(time.time() - self.run.started, 1),
            "data": data or {},
        }
        write_atomic(self.run.path(".json"), json.dumps(record, indent=2, default=float) + "\n")
        print(f"wrote {page}")
        return page


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main_guard(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Run `main`: bad input (UsageError) is one line and exit 2, as in flaxcnn's CLIs."""
    try:
        main(None)
    except cli.UsageError as e:
        cli.fail(str(e))

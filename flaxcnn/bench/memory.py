"""`python -m flaxcnn.bench.memory`: the memory check's estimate against measured peaks.

    python -m flaxcnn.bench.memory                            # the calibration set
    python -m flaxcnn.bench.memory --config vgg11:224:16 --config resnet18:128:64:bfloat16

Each configuration (`ARCH:IMAGE_SIZE:BATCH[:DTYPE[:STRATEGY]]`) runs on the CPU in a
fresh Python process that does what the trainer does, on synthetic data: the train state
from `training.build` with the trainer's default optimizer (SGD), the initial state kept
while training as `training.loop` keeps it, the steps from `training.parallel.make`,
`--steps` train steps on a new host batch each, then one eval step. Its peak resident
memory (`getrusage`'s `ru_maxrss`) less its resident memory before anything was built
(after the trainer's checks, where the estimate is compared with the memory available)
is the measured figure; it includes what XLA's compiler and runtime take, which XLA's own
analysis of the compiled step (argument, output and temporary bytes, printed beside it)
leaves out. The estimate is `training.memory.estimate`, as the trainer's check computes
it. The constants of `training.memory` were fitted to this table; the README holds the
last one measured. Peaks are memory, not time, yet they move by tens of MiB between runs.
Accelerators are not measured here. `--from-json` recomputes the estimates for peaks
recorded with `--json`, measuring nothing (after a change of the constants).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from flaxcnn import cli

# The calibration set: every family, small and large sizes and batches (two batches at
# one size for several, which gives the growth per image), bfloat16, shard_map. The
# constants of `training.memory` were fitted to the first; the second checks them.
FITTED_CONFIGS = (
    "lenet5:32:128",
    "lenet5:32:1024",
    "simple_cnn:32:128",
    "netresdeep:32:128",
    "resnet20:32:128",
    "resnet20:32:512",
    "resnet56:32:128",
    "resnet56:32:512",
    "plain56:32:128",
    "resnet18:32:64",
    "resnet18:128:64",
    "resnet18:128:64:bfloat16",
    "resnet18:128:64:float32:shard_map",
    "resnet18:224:32",
    "resnet34:32:128",
    "resnet34:128:32",
    "resnet50:128:16",
    "resnet50:224:8",
    "resnet50:224:32",
    "vgg11:32:128",
    "vgg11:64:32",
    "vgg11:64:32:bfloat16",
    "vgg11:64:32:float32:shard_map",
    "vgg11:224:16",
    "vgg11_bn:64:32",
    "vgg16:128:16",
    "vgg16:224:16",
    "alexnet:64:128",
    "alexnet:128:64",
    "alexnet:224:16",
    "googlenet:64:64:bfloat16",
    "googlenet:96:32",
    "googlenet:128:16",
    "googlenet:224:8",
    "googlenet:224:32",
)
CHECK_CONFIGS = (
    "lenet5:32:256",
    "resnet110:32:128",
    "resnet34:64:64:bfloat16",
    "resnet101:64:16",
    "vgg13_bn:128:16",
    "alexnet:96:32",
    "googlenet:160:16",
)
DEFAULT_CONFIGS = FITTED_CONFIGS + CHECK_CONFIGS
STEPS = 3
TIMEOUT_SEC = 1800  # one configuration; VGG-11 at 224x224 takes about a minute on 2 cores


@dataclasses.dataclass(frozen=True)
class Config:
    arch: str
    image_size: int
    batch_size: int
    dtype: str = "float32"
    strategy: str = "pmap"

    @classmethod
    def parse(cls, text: str) -> Config:
        """`ARCH:IMAGE_SIZE:BATCH[:DTYPE[:STRATEGY]]`; raises `cli.UsageError`."""
        parts = text.split(":")
        if not 3 <= len(parts) <= 5 or not all(parts):
            raise cli.UsageError(
                f"--config {text!r}: expected ARCH:IMAGE_SIZE:BATCH[:DTYPE[:STRATEGY]]"
            )
        try:
            size, batch = int(parts[1]), int(parts[2])
        except ValueError:
            message = f"--config {text!r}: the size and batch must be integers"
            raise cli.UsageError(message) from None
        return cls(parts[0], size, batch, *parts[3:])

    def text(self) -> str:
        """As `parse` reads it, defaults left out."""
        parts = [self.arch, str(self.image_size), str(self.batch_size)]
        if (self.dtype, self.strategy) != ("float32", "pmap"):
            parts.append(self.dtype)
        if self.strategy != "pmap":
            parts.append(self.strategy)
        return ":".join(parts)

    def label(self) -> str:
        extra = [x for x in (self.dtype, self.strategy) if x not in ("float32", "pmap")]
        return " ".join([f"{self.arch} {self.image_size}px/{self.batch_size}", *extra])


def plan(config: Config, steps: int = STEPS) -> Any:
    """The benchmark's `Plan`: the network as the trainer builds it, every argument checked
    (raises `cli.UsageError`), and the memory check passed."""
    from flaxcnn.bench import planning

    return planning.plan(
        config.arch,
        image_size=config.image_size,
        batch_size=config.batch_size,
        dtype=config.dtype,
        parallel=config.strategy,
        steps=steps,
    )


def _peak_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _resident_bytes() -> int:
    """This process's resident memory now: /proc/self/statm, else the peak so far.

    The check runs when the process already holds this much (and MemAvailable already
    leaves it out), so a run needs its peak less this. Not less the peak so far: the
    check's traces free memory that building then reuses (LeNet-5 measured 90 MiB so,
    196 MiB from the resident memory).
    """
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _peak_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure(config: Config, steps: int = STEPS) -> dict[str, Any]:
    """Run `config` as the trainer would in this process; the peak memory it added.

    Meaningful only in a fresh process (`run_child`): the peak is the process's.
    """
    import jax

    from flaxcnn.bench import planning
    from flaxcnn.training import parallel
    from flaxcnn.training.build import create_train_state

    p = plan(config, steps)
    host = planning.synthetic_batch(p)
    before = _resident_bytes()
    tx = planning.optimizer_settings(p.batch_size, steps).build()[0]
    state = create_train_state(p.network, tx, planning.SEED)  # the trainer keeps it: so do we
    par = parallel.make(config.strategy)
    dstate = par.put_state(state)
    train = {k: v for k, v in host.items() if k != "mask"}
    metrics = None
    for _ in range(steps):
        dstate, metrics = par.train_step(dstate, par.put_batch(train))
    jax.block_until_ready(metrics)
    jax.block_until_ready(par.eval_step(dstate, par.put_batch(host)))
    peak = _peak_bytes() - before
    analysis = par.train_step.lower(dstate, par.put_batch(train)).compile().memory_analysis()
    xla = None
    if analysis is not None:
        xla = (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    devices = jax.local_device_count()
    return {"peak_bytes": peak, "xla_step_bytes": xla, "params": p.params, "devices": devices}


def run_child(config: Config, steps: int = STEPS) -> dict[str, Any]:
    """`measure` in a fresh process on the CPU backend."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    spec = json.dumps(dataclasses.asdict(config))
    out = subprocess.run(
        [sys.executable, "-m", "flaxcnn.bench.memory", "--child", spec, "--steps", str(steps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_SEC,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{config.label()}: the measuring process failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(config: Config, measured: dict[str, Any]) -> dict[str, Any]:
    """One line of the table: the estimate beside the measured peak."""
    from flaxcnn.training import memory

    p = plan(config)
    needed = memory.estimate(
        p.network,
        config.batch_size // measured["devices"],
        "sgd",
        p.params,
        strategy=config.strategy,
        platform="cpu",
        devices=measured["devices"],
    )
    return {
        **dataclasses.asdict(config),
        **measured,
        "estimate_bytes": needed.total,
        "estimate": needed.describe(),
        "ratio": needed.total / measured["peak_bytes"],
    }


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:,.0f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table and the worst ratios."""
    lines = [
        "| configuration | measured peak MiB | estimate MiB | estimate/measured | XLA step MiB "
        "| fitted |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        label = Config(r["arch"], r["image_size"], r["batch_size"], r["dtype"], r["strategy"])
        lines.append(
            f"| {label.label()} | {_mib(r['peak_bytes'])} | {_mib(r['estimate_bytes'])} "
            f"| {r['ratio']:.2f} | {_mib(r.get('xla_step_bytes'))} "
            f"| {'yes' if label.text() in FITTED_CONFIGS else 'no'} |"
        )
    if rows:
        low = min(rows, key=lambda r: r["ratio"])
        high = max(rows, key=lambda r: r["ratio"])
        lines.append("")
        lines.append(
            f"estimate/measured from {low['ratio']:.2f} ({low['arch']}) "
            f"to {high['ratio']:.2f} ({high['arch']})"
        )
    return lines


def _read_recorded(path: Path) -> tuple[list[str], list[tuple[Config, dict[str, Any]]]]:
    """The header and the (configuration, measured figures) that `--json` wrote; raises
    `cli.UsageError` for anything else."""
    fields = [f.name for f in dataclasses.fields(Config)]
    try:
        recorded = json.loads(path.read_text())
        lines = [str(line) for line in recorded["header"]]
        rows = [(Config(*(r[f] for f in fields)), r) for r in recorded["rows"]]
        for _, r in rows:
            r["peak_bytes"], r["devices"] = int(r["peak_bytes"]), int(r["devices"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise cli.UsageError(f"--from-json {path}: not a file --json wrote ({e})") from None
    return lines, rows


def header() -> list[str]:
    """Where and when: the machine, the versions, the commit."""
    import jax
    import jaxlib

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    today = datetime.date.today().isoformat()
    return [
        f"{today}, commit {commit}, {platform.node()}: {os.cpu_count()} cores, "
        f"{platform.machine()}, Python {platform.python_version()}, jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}, CPU backend, {STEPS} train steps + 1 eval step",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.bench.memory",
        description="Peak memory of the trainer's train step, measured in a fresh process per "
        "configuration, beside the estimate the trainer checks before it builds anything.",
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="ARCH:SIZE:BATCH[:DTYPE[:STRATEGY]]",
        help="a configuration to measure, repeatable (default: the calibration set, about "
        "an hour on 2 cores, up to 7 GiB)",
    )
    parser.add_argument(
        "--steps", type=int, default=STEPS, help="train steps (default: %(default)s)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this file")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: the table again for the peaks in PATH (written by --json), "
        "with the estimate as it is now (after changing its constants)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        config = Config(**json.loads(args.child))
        print(json.dumps(measure(config, args.steps)))
        return
    if args.from_json:
        try:
            lines, recorded = _read_recorded(Path(args.from_json))
            rows = [row(config, measured) for config, measured in recorded]
        except cli.UsageError as e:
            cli.fail(str(e))
        for line in [*lines, "", *table(rows)]:
            print(line)
        return
    try:
        if args.steps < 1:
            raise cli.UsageError(f"--steps must be a positive integer, got {args.steps}")
        configs = [Config.parse(c) for c in (args.config or DEFAULT_CONFIGS)]
        for config in configs:  # every configuration checked before the first is measured
            plan(config)
        if args.json:
            from flaxcnn.bench.planning import check_writable

            check_writable(Path(args.json))
    except cli.UsageError as e:
        cli.fail(str(e))
    rows = []
    for config in configs:
        try:
            rows.append(row(config, run_child(config, args.steps)))
        except cli.UsageError as e:  # the trainer's own checks, e.g. a size too small
            cli.fail(str(e))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            cli.fail(str(e), code=1)
        print(
            f"{config.label()}: measured {_mib(rows[-1]['peak_bytes'])} MiB, "
            f"estimated {rows[-1]['estimate']}",
            file=sys.stderr,
            flush=True,
        )
    for line in [*header(), "", *table(rows)]:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header(), "rows": rows}, indent=1))


if __name__ == "__main__":
    cli.run_main(main)

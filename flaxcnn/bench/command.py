"""`python -m flaxcnn.bench`: compile time, throughput and FLOP/s of the train and eval steps.

    python -m flaxcnn.bench --arch resnet20 --arch resnet34 --image-size 32 --json bench.json
    python -m flaxcnn.bench --arch resnet20 --reference torch     # against PyTorch
    python -m flaxcnn.bench --arch lenet5 --loop                   # against the trainer's loop

What is measured, and how: `timing`. `--repeats N` times the steps N times and reports the
median run. `--reference torch` alternates those runs with the same network's in PyTorch
(`torch_twins`), and `--loop` compares the pure step with the trainer's whole loop on the
digits (`loop`). Every architecture is planned and checked (`planning`) before the first
one is compiled; the table's rows (`table`) are printed as they come.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

import jax

from flaxcnn import cli, models
from flaxcnn.bench import flops
from flaxcnn.bench.planning import (
    DTYPES,
    REFERENCES,
    STRATEGIES,
    Plan,
    check_reference,
    check_repeats,
    check_writable,
    loop_module,
    prepare_job,
)
from flaxcnn.bench.table import (
    busy_note,
    flops_unit,
    footer_lines,
    format_row,
    header_lines,
    table_columns,
)
from flaxcnn.bench.timing import measure
from flaxcnn.training.rundir import write_json_atomic

DEFAULT_ARCHS = ("lenet5", "resnet20", "resnet34")
REFERENCE_REPEATS = 3  # the default --repeats with a --reference


def parse_archs(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated --arch values, in order, without repeats."""
    archs = [a.strip() for v in values or [",".join(DEFAULT_ARCHS)] for a in v.split(",")]
    archs = list(dict.fromkeys(a for a in archs if a))
    if not archs:
        raise cli.UsageError(f"--arch {','.join(values or [])!r} names no architecture")
    return archs


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.bench",
        description="Compile time, steady-state images/second and FLOP/s of the train and eval "
        "steps, on synthetic data, with parameter counts and multiply-adds per image; "
        "optionally against PyTorch (--reference torch) or the trainer's loop (--loop).",
    )
    parser.add_argument(
        "--arch",
        action="append",
        metavar="ARCH[,ARCH...]",
        help=f"architecture(s), repeatable or comma-separated (default: {','.join(DEFAULT_ARCHS)})",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="square input side (default: each model's design size; at most "
        f"{models.SMALL_INPUT_MAX} on a larger design uses its small-input stem, marked *)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=128, help="global batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps after warm-up (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="compute dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--parallel",
        choices=STRATEGIES,
        default="pmap",
        help="data-parallel strategy (default: %(default)s)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=10, help="classifier outputs (default: %(default)s)"
    )
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        help="also time the same network in this framework (torchvision's or a hand-built "
        "twin with the same parameter count, the same optimizer and batch), alternating runs "
        "with ours in this process; needs pip install 'flaxcnn[torch]'",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed runs per architecture, reported as their median (default: "
        f"{REFERENCE_REPEATS} with --reference, else 1)",
    )
    parser.add_argument(
        "--loop",
        action="store_true",
        help="also run the trainer's loop (data pipeline, step, logging; no evaluation, no "
        "checkpoints) on the embedded digits, and benchmark the step at the input size and "
        "batch that run resolves, for the ratio loop/step",
    )
    parser.add_argument(
        "--loop-epochs",
        type=int,
        help="epochs of the --loop run; the first compiles, the others are timed (default: 3)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> None:
    load_at_start = os.getloadavg()[0]
    args = build_parser().parse_args(argv)
    if args.repeats is None:
        args.repeats = REFERENCE_REPEATS if args.reference else 1
    if args.loop and args.loop_epochs is None:
        args.loop_epochs = loop_module().DEFAULT_EPOCHS
    settings = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "dtype": args.dtype,
        "parallel": args.parallel,
        "num_classes": args.num_classes,
    }
    with contextlib.ExitStack() as stack:
        try:  # every architecture is checked before the first one is compiled
            check_repeats(args.repeats)
            if args.json:
                check_writable(Path(args.json))
            root = stack.enter_context(loop_module().scratch()) if args.loop else None
            jobs = [
                prepare_job(arch, settings, None, root, args.loop_epochs)
                for arch in parse_archs(args.arch)
            ]
            check_reference(args.reference, [p for p, _ in jobs])
        except cli.UsageError as e:
            cli.fail(str(e))
        results = run_jobs(args, jobs)
    note = busy_note(load_at_start, os.cpu_count())
    if note:
        print(note)
    if args.json:
        write_results(Path(args.json), args, settings, results, load_at_start)


def run_jobs(args: argparse.Namespace, jobs: list[tuple[Plan, Any]]) -> list[dict[str, Any]]:
    """Measure each job, printing the table as the rows come."""
    peak = flops.peak(args.dtype)  # first, so that the table can choose its unit
    unit = flops_unit(peak["flops_per_sec"])
    columns = table_columns(unit, args.reference, args.loop)
    for line in header_lines(args, columns):
        print(line, flush=True)
    results = []
    for p, setup in jobs:
        result = measure(p, setup, args.repeats, args.reference)
        results.append(result)
        print(format_row([c.fmt(result) for c in columns], columns), flush=True)
    for line in footer_lines(results, peak, unit):
        print(line)
    return results


def write_results(
    path: Path,
    args: argparse.Namespace,
    settings: dict[str, Any],
    results: list[dict],
    load_at_start: float,
) -> None:
    device = jax.devices()[0]
    write_json_atomic(
        path,
        {
            "jax_version": jax.__version__,
            "device_kind": device.device_kind,
            "platform": device.platform,
            "device_count": jax.device_count(),
            "settings": {
                **settings,
                "repeats": args.repeats,
                "reference": args.reference,
                "loop": args.loop,
                "loop_epochs": args.loop_epochs,
            },
            "peak": flops.peak(args.dtype),
            "load_average_at_start": load_at_start,  # other work on the machine, roughly
            "results": results,
        },
    )

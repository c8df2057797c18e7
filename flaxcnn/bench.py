"""`python -m flaxcnn.bench`: compile time and throughput of the train and eval steps.

    python -m flaxcnn.bench --arch resnet20 --arch resnet34 --image-size 32 --json bench.json

Speed targets live here, not in timed unit tests. Each architecture runs the trainer's own
pieces on synthetic data (random normal images, random labels, fixed seed; no data set):
the network and train state from `training.build` (the trainer's builder) with the
trainer's default optimizer, and the steps from `training.parallel.make`. Measured:

* init: building the state (its jit compile included) and placing it on the devices;
* compile: the first train (eval) step call, compile included;
* throughput: global-batch images per second over `steps` calls after one warm-up call,
  with `jax.block_until_ready` on either side of the timed loop. One batch is placed on
  the devices once and reused, so the figures are the steps' alone, without the input
  pipeline (see `python -m flaxcnn.data.bench` for that);
* the model: trainable parameters and forward multiply-adds per image (no compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxcnn import cli, models
from flaxcnn.models import summary
from flaxcnn.training import optim, parallel, steps
from flaxcnn.training.build import Network, create_train_state
from flaxcnn.training.config import TrainConfig
from flaxcnn.training.resolve import get_spec
from flaxcnn.training.rundir import write_json_atomic

DEFAULT_ARCHS = ("lenet5", "resnet20", "resnet34")
DTYPES = ("float32", "bfloat16")
STRATEGIES = parallel.STRATEGIES
WARMUP_STEPS = 1  # untimed calls after the compiling one
SEED = 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """One validated benchmark: everything resolved, nothing compiled yet."""

    network: Network
    batch_size: int
    steps: int
    parallel: str
    params: int
    macs: int

    @property
    def arch(self) -> str:
        return self.network.arch


def plan(
    arch: str,
    *,
    image_size: int | None = None,
    batch_size: int = 128,
    steps: int = 10,
    dtype: str = "float32",
    parallel: str = "pmap",
    num_classes: int = 10,
) -> Plan:
    """Check every argument and resolve the input size; raises `cli.UsageError`.

    Without `image_size`, the model's design size; sizes of at most
    `models.SMALL_INPUT_MAX` on a network designed for larger ones use its small-input
    options (ResNet's small stem), exactly as the trainer chooses them.
    """
    for name, value in [
        ("image_size", image_size),
        ("batch_size", batch_size),
        ("steps", steps),
        ("num_classes", num_classes),
    ]:
        if value is not None and not (isinstance(value, int) and value > 0):
            raise cli.UsageError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value}"
            )
    if dtype not in DTYPES:
        raise cli.UsageError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if parallel not in STRATEGIES:
        raise cli.UsageError(
            f"unknown parallel strategy {parallel!r}; choose from {', '.join(STRATEGIES)}"
        )
    spec = get_spec(arch)
    devices = jax.device_count()
    if batch_size % devices:
        raise cli.UsageError(
            f"--batch-size {batch_size} does not divide evenly over {devices} devices"
        )
    size, options = models.resolve_input(spec, spec.input_size, image_size)
    if not options and size < spec.min_size:
        raise cli.UsageError(f"{arch} needs --image-size of at least {spec.min_size}, got {size}")
    network = Network(
        arch=arch,
        num_classes=num_classes,
        image_size=size,
        in_channels=spec.in_channels,
        dtype=dtype,
        options=options,
    )
    model = network.create()
    try:  # abstract evaluation only: the models check their minimum input size here
        params = summary.count_params(model, network.input_shape())
        macs = summary.total_macs(model, network.input_shape())
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    return Plan(network, batch_size, steps, parallel, params, macs)


def synthetic_batch(p: Plan, seed: int = SEED) -> dict[str, np.ndarray]:
    """This process's share of one global batch: normal images, uniform labels, all real."""
    rng = np.random.default_rng(seed)
    n = p.batch_size // jax.process_count()
    return {
        "image": rng.standard_normal(p.network.input_shape(n), dtype=np.float32),
        "label": rng.integers(0, p.network.num_classes, size=n, dtype=np.int32),
        "mask": np.ones(n, dtype=bool),
    }


def make_optimizer(batch_size: int, total_steps: int):
    """The trainer's default optimizer, learning rate, schedule and weight decay."""
    settings = optim.OptimizerSettings.from_config(
        TrainConfig(),
        batch_size=batch_size,
        total_steps=total_steps,
        warmup_steps=1,  # the trainer warms up over an epoch; a step here
    )
    return settings.build()[0]


def device_batch(par: parallel.DataParallel, host: dict[str, np.ndarray]) -> dict[str, Any]:
    """The batch placed on the devices once, so that no timed call copies it again.

    `PmapParallel.put_batch` leaves host arrays (pmap copies them on every call); an
    identity pmap gives them exactly the sharding the step takes, as `put_state` does.
    """
    batch = par.put_batch(host)
    if isinstance(par, parallel.PmapParallel):
        batch = jax.pmap(lambda b: b, axis_name=steps.AXIS)(batch)
    return jax.block_until_ready(batch)


def _timed(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run(p: Plan) -> dict[str, Any]:
    """Compile and time the train and eval steps of a validated plan."""
    total_steps = 1 + WARMUP_STEPS + p.steps
    tx = make_optimizer(p.batch_size, total_steps)
    par = parallel.make(p.parallel)

    def init():
        return par.put_state(create_train_state(p.network, tx, SEED))

    dstate, init_sec = _timed(init)
    batch = device_batch(par, synthetic_batch(p))
    train_batch = {k: v for k, v in batch.items() if k != "mask"}

    (dstate, _), train_compile_sec = _timed(par.train_step, dstate, train_batch)
    for _ in range(WARMUP_STEPS):
        dstate, _ = par.train_step(dstate, train_batch)
    jax.block_until_ready(dstate)
    start = time.perf_counter()
    for _ in range(p.steps):
        dstate, metrics = par.train_step(dstate, train_batch)
    jax.block_until_ready((dstate, metrics))
    train_sec = time.perf_counter() - start
    last = par.get_metrics(metrics)  # a NaN check: the same batch repeats, no learning curve

    _, eval_compile_sec = _timed(par.eval_step, dstate, batch)
    for _ in range(WARMUP_STEPS):
        jax.block_until_ready(par.eval_step(dstate, batch))
    start = time.perf_counter()
    outs = [par.eval_step(dstate, batch) for _ in range(p.steps)]
    jax.block_until_ready(outs)
    eval_sec = time.perf_counter() - start

    images = p.steps * p.batch_size
    device = jax.devices()[0]
    net = p.network
    return {
        "arch": net.arch,
        "image_size": net.image_size,
        "in_channels": net.in_channels,
        "model_options": net.options,
        "num_classes": net.num_classes,
        "batch_size": p.batch_size,
        "per_device_batch": p.batch_size // jax.device_count(),
        "steps": p.steps,
        "warmup_steps": WARMUP_STEPS,
        "dtype": net.dtype,
        "parallel": p.parallel,
        "params": p.params,
        "macs_per_image": p.macs,
        "gmacs_per_image": p.macs / 1e9,
        "init_sec": init_sec,
        "train_compile_sec": train_compile_sec,
        "train_step_ms": 1e3 * train_sec / p.steps,
        "train_images_per_sec": images / train_sec,
        "train_loss": last["loss"] / last["count"],
        "eval_compile_sec": eval_compile_sec,
        "eval_images_per_sec": images / eval_sec,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
    }


def benchmark(arch: str, **settings: Any) -> dict[str, Any]:
    """Benchmark one architecture with the settings of `plan` (image_size, batch_size,
    steps, dtype, parallel, num_classes); bad arguments raise `cli.UsageError`."""
    return run(plan(arch, **settings))


COLUMNS = [  # header, width, format of a result
    ("arch", 10, lambda r: r["arch"]),
    ("input", 11, lambda r: f"{r['image_size']}x{r['image_size']}x{r['in_channels']}"
     + ("*" if r["model_options"] else "")),
    ("params", 11, lambda r: f"{r['params']:,}"),
    ("GMACs", 8, lambda r: f"{r['gmacs_per_image']:.3g}"),
    ("init s", 7, lambda r: f"{r['init_sec']:.2f}"),
    ("compile s", 9, lambda r: f"{r['train_compile_sec']:.2f}"),
    ("step ms", 9, lambda r: f"{r['train_step_ms']:.1f}"),
    ("train img/s", 11, lambda r: f"{r['train_images_per_sec']:,.0f}"),
    ("eval img/s", 11, lambda r: f"{r['eval_images_per_sec']:,.0f}"),
]  # fmt: skip


def format_row(cells: list[str]) -> str:
    parts = [
        c.ljust(w) if i < 2 else c.rjust(w)
        for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS, strict=True))
    ]
    return "  ".join(parts).rstrip()


def header_lines(args: argparse.Namespace) -> list[str]:
    device = jax.devices()[0]
    return [
        f"flaxcnn.bench: jax {jax.__version__}, {jax.device_count()} x {device.device_kind} "
        f"({device.platform}), {args.parallel}, {args.dtype}, global batch {args.batch_size}, "
        f"{args.steps} timed steps, synthetic data",
        format_row([h for h, _, _ in COLUMNS]),
    ]


def parse_archs(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated --arch values, in order, without repeats."""
    archs = [a.strip() for v in values or [",".join(DEFAULT_ARCHS)] for a in v.split(",")]
    return list(dict.fromkeys(a for a in archs if a))


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.bench",
        description="Compile time and steady-state images/second of the train and eval steps, "
        "on synthetic data, with parameter counts and multiply-adds per image.",
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
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = {
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "dtype": args.dtype,
        "parallel": args.parallel,
        "num_classes": args.num_classes,
    }
    try:  # every architecture is checked before the first one is compiled
        plans = [plan(arch, **settings) for arch in parse_archs(args.arch)]
    except cli.UsageError as e:
        cli.fail(str(e))
    for line in header_lines(args):
        print(line, flush=True)
    results = []
    for p in plans:
        result = run(p)
        results.append(result)
        print(format_row([fmt(result) for _, _, fmt in COLUMNS]), flush=True)
    if any(r["model_options"] for r in results):
        print("* small-input options: " + "; ".join(
            f"{r['arch']} {r['model_options']}" for r in results if r["model_options"]
        ))  # fmt: skip
    if args.json:
        device = jax.devices()[0]
        write_json_atomic(
            Path(args.json),
            {
                "jax_version": jax.__version__,
                "device_kind": device.device_kind,
                "platform": device.platform,
                "device_count": jax.device_count(),
                "settings": settings,
                "results": results,
            },
        )


if __name__ == "__main__":
    sys.exit(main())

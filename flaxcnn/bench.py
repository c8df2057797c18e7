"""`python -m flaxcnn.bench`: compile time, throughput and FLOP/s of the train and eval steps.

    python -m flaxcnn.bench --arch resnet20 --arch resnet34 --image-size 32 --json bench.json
    python -m flaxcnn.bench --arch resnet20 --reference torch     # against PyTorch
    python -m flaxcnn.bench --arch lenet5 --loop                   # against the trainer's loop

Speed targets live here, not in timed unit tests. Each architecture runs the trainer's own
pieces on synthetic data (random normal images, random labels, fixed seed; no data set):
the network and train state from `training.build` (the trainer's builder) with the
trainer's default optimizer, and the steps from `training.parallel.make`. Measured:

* init: building the state (its jit compile included) and placing it on the devices;
* compile: lowering and compiling the train (eval) step and its first call;
* throughput: global-batch images per second over `steps` calls after one warm-up call,
  with `jax.block_until_ready` on either side of the timed loop. One batch is placed on
  the devices once and reused, so the figures are the steps' alone, without the input
  pipeline (see `python -m flaxcnn.data.bench` for that, and `--loop` below);
* FLOP/s: XLA's FLOPs of the compiled step over the measured step time, and as a fraction
  of the peak of a large matrix product measured in the same run (`bench_flops`);
* the model: trainable parameters and forward multiply-adds per image (no compile).

`--repeats N` times the steps N times and reports the median run. `--reference torch`
alternates those runs with the same network's in PyTorch (`bench_torch`), and `--loop`
compares the pure step with the trainer's whole loop on the digits (`bench_loop`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import jax
import numpy as np

from flaxcnn import bench_flops, cli, models
from flaxcnn.models import summary
from flaxcnn.training import memory, optim, parallel, steps
from flaxcnn.training.build import Network, create_train_state
from flaxcnn.training.config import TrainConfig
from flaxcnn.training.resolve import get_spec
from flaxcnn.training.rundir import write_json_atomic

DEFAULT_ARCHS = ("lenet5", "resnet20", "resnet34")
DTYPES = ("float32", "bfloat16")
STRATEGIES = parallel.STRATEGIES
WARMUP_STEPS = 1  # untimed calls after the compiling one
SEED = 0
REFERENCES = ("torch",)
REFERENCE_REPEATS = 3  # the default --repeats with a --reference
TORCH_MISSING = "torch and torchvision are not installed: pip install 'flaxcnn[torch]'"


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
        # What cannot fit is refused as the trainer refuses it, before any real work.
        memory.check_fits(
            network, batch_size // devices, TrainConfig().optimizer, params, strategy=parallel
        )
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


def optimizer_settings(batch_size: int, total_steps: int) -> optim.OptimizerSettings:
    """The trainer's default optimizer, learning rate, schedule and weight decay."""
    return optim.OptimizerSettings.from_config(
        TrainConfig(),
        batch_size=batch_size,
        total_steps=total_steps,
        warmup_steps=1,  # the trainer warms up over an epoch; a step here
    )


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


def run_figures(images: int, train_sec: float, eval_sec: float, loss: float) -> dict[str, float]:
    """One timed run's numbers: the same keys for ours and for a reference."""
    return {
        "train_sec": train_sec,
        "train_images_per_sec": images / train_sec,
        "eval_sec": eval_sec,
        "eval_images_per_sec": images / eval_sec,
        "train_loss": loss,
    }


def median_sec(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


class OurSteps:
    """Our train state, optimizer and one batch on the devices; the compiled steps, timed."""

    def __init__(self, p: Plan, total_steps: int):
        self.p = p
        self.settings = optimizer_settings(p.batch_size, total_steps)
        tx = self.settings.build()[0]
        self.par = parallel.make(p.parallel)
        self.state, self.init_sec = _timed(
            lambda: self.par.put_state(create_train_state(p.network, tx, SEED))
        )
        self.batch = device_batch(self.par, synthetic_batch(p))
        self.train_batch = {k: v for k, v in self.batch.items() if k != "mask"}

    def _train(self, calls: int) -> Any:
        metrics = None
        for _ in range(calls):
            self.state, metrics = self.par.train_step(self.state, self.train_batch)
        return jax.block_until_ready((self.state, metrics))[1]

    def _eval(self, calls: int) -> None:
        jax.block_until_ready([self.par.eval_step(self.state, self.batch) for _ in range(calls)])

    def warm_up(self) -> dict[str, Any]:
        """Compile both steps (XLA's FLOPs on the way), call each once, then warm up."""
        par, devices = self.par, jax.device_count()
        start = time.perf_counter()
        train_flops = bench_flops.lower_and_compile(par.train_step, self.state, self.train_batch)
        self._train(1)  # jax reuses the executable just compiled
        train_compile_sec = time.perf_counter() - start
        self._train(WARMUP_STEPS)
        start = time.perf_counter()
        eval_flops = bench_flops.lower_and_compile(par.eval_step, self.state, self.batch)
        self._eval(1)
        eval_compile_sec = time.perf_counter() - start
        self._eval(WARMUP_STEPS)
        return {
            "init_sec": self.init_sec,
            "train_compile_sec": train_compile_sec,
            "eval_compile_sec": eval_compile_sec,
            "train_flops_per_step": _times(train_flops, devices),
            "eval_flops_per_step": _times(eval_flops, devices),
            "train_flops_per_step_per_device": train_flops,
            "eval_flops_per_step_per_device": eval_flops,
        }

    def timed_run(self) -> dict[str, float]:
        """`steps` train steps, then `steps` eval steps, each timed as a whole."""
        start = time.perf_counter()
        metrics = self._train(self.p.steps)
        train_sec = time.perf_counter() - start
        start = time.perf_counter()
        self._eval(self.p.steps)
        eval_sec = time.perf_counter() - start
        last = self.par.get_metrics(metrics)  # a NaN check: the batch repeats, no learning curve
        images = self.p.steps * self.p.batch_size
        return run_figures(images, train_sec, eval_sec, last["loss"] / last["count"])


def _times(flops: float | None, n: int) -> float | None:
    return None if flops is None else flops * n


def reference_module(name: str) -> ModuleType:
    """The reference's module (`bench_torch`), imported only when asked for.

    Raises `cli.UsageError` for an unknown reference or where torch is missing.
    """
    if name not in REFERENCES:
        raise cli.UsageError(f"unknown reference {name!r}; choose from {', '.join(REFERENCES)}")
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError:
        raise cli.UsageError(TORCH_MISSING) from None
    from flaxcnn import bench_torch

    return bench_torch


def check_repeats(repeats: int) -> None:
    if not (isinstance(repeats, int) and repeats > 0):
        raise cli.UsageError(f"--repeats must be a positive integer, got {repeats}")


def run(p: Plan, repeats: int = 1, reference: str | None = None) -> dict[str, Any]:
    """Compile and time the train and eval steps of a validated plan, `repeats` times,
    alternating with the `reference` framework's twin (checked beforehand: `check_reference`)."""
    check_repeats(repeats)
    ours = OurSteps(p, total_steps=1 + WARMUP_STEPS + p.steps * repeats)
    compiled = ours.warm_up()
    twin, twin_first = None, {}
    if reference is not None:
        module = reference_module(reference)
        twin = module.TorchSteps(p.network, p.params, synthetic_batch(p), p.steps, ours.settings)
        twin_first = twin.warm_up()
    runs, twin_runs = [], []
    for _ in range(repeats):  # alternated, so that a slow spell of the machine hits both
        runs.append(ours.timed_run())
        if twin is not None:
            twin_runs.append(twin.timed_run())
    result = describe(p, compiled, runs)
    if twin is not None:
        result.update(reference_figures(reference, result, twin, twin_first, twin_runs))
    return result


def describe(p: Plan, compiled: dict[str, Any], runs: list[dict[str, float]]) -> dict[str, Any]:
    """The result of one architecture: settings, medians of the runs, FLOP/s, the machine."""
    images = p.steps * p.batch_size
    train_sec, eval_sec = median_sec(runs, "train_sec"), median_sec(runs, "eval_sec")
    peak = bench_flops.peak(p.network.dtype)
    train_rate = bench_flops.rate(compiled["train_flops_per_step"], train_sec / p.steps)
    eval_rate = bench_flops.rate(compiled["eval_flops_per_step"], eval_sec / p.steps)
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
        "repeats": len(runs),
        "dtype": net.dtype,
        "parallel": p.parallel,
        "params": p.params,
        "macs_per_image": p.macs,
        "gmacs_per_image": p.macs / 1e9,
        "init_sec": compiled["init_sec"],
        "train_compile_sec": compiled["train_compile_sec"],
        "train_step_ms": 1e3 * train_sec / p.steps,
        "train_images_per_sec": images / train_sec,
        "train_loss": runs[-1]["train_loss"],
        "eval_compile_sec": compiled["eval_compile_sec"],
        "eval_images_per_sec": images / eval_sec,
        **{k: v for k, v in compiled.items() if "flops" in k},
        "flops_source": "XLA cost_analysis() of the compiled step: one device's program, "
        "times the device count",
        "train_flops_per_sec": train_rate,
        "eval_flops_per_sec": eval_rate,
        "peak_flops_per_sec": peak["flops_per_sec"],
        "peak": peak,
        "train_utilisation": bench_flops.ratio(train_rate, peak["flops_per_sec"]),
        "eval_utilisation": bench_flops.ratio(eval_rate, peak["flops_per_sec"]),
        "runs": runs,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax_version": jax.__version__,
        "load_average": os.getloadavg(),  # other work on the machine skews every figure
    }


def reference_figures(
    name: str, ours: dict[str, Any], twin: Any, first: dict[str, float], runs: list[dict]
) -> dict[str, Any]:
    """The twin's medians, its every run, and ours over its (train and eval images/s)."""
    images = ours["steps"] * ours["batch_size"]
    train = images / median_sec(runs, "train_sec")
    evals = images / median_sec(runs, "eval_sec")
    return {
        "reference": name,
        f"{name}_train_images_per_sec": train,
        f"{name}_eval_images_per_sec": evals,
        f"train_ratio_to_{name}": ours["train_images_per_sec"] / train,
        f"eval_ratio_to_{name}": ours["eval_images_per_sec"] / evals,
        name: {**twin.info(), **first, "runs": runs},
    }


def check_reference(reference: str | None, p: Plan) -> None:
    """The reference exists for `p`'s network, with exactly its parameter count."""
    if reference is not None:
        reference_module(reference).check_twin(p.network, p.params)


def loop_module() -> ModuleType:
    """`bench_loop`, imported when asked for: it loads the trainer (orbax, the data layer)."""
    from flaxcnn import bench_loop

    return bench_loop


def prepare_job(
    arch: str,
    settings: dict[str, Any],
    reference: str | None = None,
    loop_root: Path | None = None,
    loop_epochs: int | None = None,
) -> tuple[Plan, Any]:
    """The validated plan of `arch`, and with `loop_root` the trainer's setup on the digits,
    whose input size and batch the plan then takes; raises `cli.UsageError`."""
    setup = None
    if loop_epochs is not None and loop_root is None:
        raise cli.UsageError("--loop-epochs goes with --loop")
    if loop_root is not None:
        bench_loop = loop_module()
        epochs = bench_loop.DEFAULT_EPOCHS if loop_epochs is None else loop_epochs
        loop_settings = {k: v for k, v in settings.items() if k != "steps"}
        setup = bench_loop.setup(arch, loop_root, epochs=epochs, **loop_settings)
        settings = {**settings, "image_size": setup.network.image_size}
    p = plan(arch, **settings)
    if setup is not None:
        loop_module().check_same(setup, p.network, p.batch_size)
    check_reference(reference, p)
    return p, setup


def measure(p: Plan, setup: Any, repeats: int = 1, reference: str | None = None) -> dict:
    """`run`, then with a loop `setup` the trainer's loop against the step."""
    result = run(p, repeats, reference)
    if setup is not None:
        result.update(loop_module().run(setup, result["train_images_per_sec"]))
    return result


def benchmark(
    arch: str,
    *,
    repeats: int = 1,
    reference: str | None = None,
    loop: bool = False,
    loop_epochs: int | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Benchmark one architecture with the settings of `plan` (image_size, batch_size,
    steps, dtype, parallel, num_classes): `repeats` timed runs, alternated with those of a
    `reference` ("torch"); with `loop`, also the trainer's loop on the digits, at the input
    size and batch it resolves there. Bad arguments raise `cli.UsageError`."""
    check_repeats(repeats)
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(loop_module().scratch()) if loop else None
        p, setup = prepare_job(arch, settings, reference, root, loop_epochs)
        return measure(p, setup, repeats, reference)


class Column(NamedTuple):
    header: str
    width: int
    fmt: Callable[[dict[str, Any]], str]


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


COLUMNS = [
    Column("arch", 10, lambda r: r["arch"]),
    Column("input", 11, lambda r: f"{r['image_size']}x{r['image_size']}x{r['in_channels']}"
           + ("*" if r["model_options"] else "")),
    Column("params", 11, lambda r: f"{r['params']:,}"),
    Column("GMACs", 8, lambda r: f"{r['gmacs_per_image']:.3g}"),
    Column("init s", 7, lambda r: f"{r['init_sec']:.2f}"),
    Column("compile s", 9, lambda r: f"{r['train_compile_sec']:.2f}"),
    Column("step ms", 9, lambda r: f"{r['train_step_ms']:.1f}"),
    Column("train img/s", 11, lambda r: f"{r['train_images_per_sec']:,.0f}"),
    Column("eval img/s", 11, lambda r: f"{r['eval_images_per_sec']:,.0f}"),
]  # fmt: skip
UNITS = {"GFLOP/s": 1e9, "TFLOP/s": 1e12}


def flops_unit(peak_flops_per_sec: float) -> str:
    return "TFLOP/s" if peak_flops_per_sec >= 1e12 else "GFLOP/s"


def flops_columns(unit: str) -> list[Column]:
    scale = UNITS[unit]
    return [
        Column(f"train {unit}", 13, lambda r: _num(r["train_flops_per_sec"], ".3g", scale)),
        Column("util %", 6, lambda r: _num(r["train_utilisation"], ".1f", 0.01)),
        Column(f"eval {unit}", 12, lambda r: _num(r["eval_flops_per_sec"], ".3g", scale)),
        Column("util %", 6, lambda r: _num(r["eval_utilisation"], ".1f", 0.01)),
    ]


REFERENCE_COLUMNS = [
    Column("torch img/s", 11, lambda r: f"{r['torch_train_images_per_sec']:,.0f}"),
    Column("ours/torch", 10, lambda r: f"{r['train_ratio_to_torch']:.2f}"),
    Column("torch eval img/s", 16, lambda r: f"{r['torch_eval_images_per_sec']:,.0f}"),
    Column("ours/torch", 10, lambda r: f"{r['eval_ratio_to_torch']:.2f}"),
]
LOOP_COLUMNS = [
    Column("loop img/s", 10, lambda r: f"{r['loop_images_per_sec']:,.0f}"),
    Column("loop/step", 9, lambda r: f"{r['loop_ratio_to_step']:.2f}"),
]


def table_columns(unit: str, reference: str | None = None, loop: bool = False) -> list[Column]:
    return [
        *COLUMNS,
        *flops_columns(unit),
        *(REFERENCE_COLUMNS if reference else []),
        *(LOOP_COLUMNS if loop else []),
    ]


def format_row(cells: list[str], columns: list[Column] = COLUMNS) -> str:
    parts = [
        c.ljust(col.width) if i < 2 else c.rjust(col.width)
        for i, (c, col) in enumerate(zip(cells, columns, strict=True))
    ]
    return "  ".join(parts).rstrip()


def header_lines(args: argparse.Namespace, columns: list[Column] = COLUMNS) -> list[str]:
    device = jax.devices()[0]
    runs = f", median of {args.repeats} runs" if args.repeats > 1 else ""
    return [
        f"flaxcnn.bench: jax {jax.__version__}, {jax.device_count()} x {device.device_kind} "
        f"({device.platform}), {args.parallel}, {args.dtype}, global batch {args.batch_size}, "
        f"{args.steps} timed steps{runs}, synthetic data",
        format_row([c.header for c in columns], columns),
    ]


def busy_note(load: float, cores: int | None) -> str | None:
    """A warning when other processes were using half the cores or more as the run began."""
    if cores and load >= cores / 2:
        return (
            f"note: load average {load:.1f} on {cores} cores as the benchmark began: other "
            "work competes for the CPU and slows every figure (torch's OpenMP threads most)"
        )
    return None


def footer_lines(results: list[dict[str, Any]], peak: dict[str, Any], unit: str) -> list[str]:
    """What the table's marks and ratios mean: small-input options, the peak, the reference."""
    lines = []
    if any(r["model_options"] for r in results):
        lines.append("* small-input options: " + "; ".join(
            f"{r['arch']} {r['model_options']}" for r in results if r["model_options"]
        ))  # fmt: skip
    lines.append(
        f"FLOP/s: XLA's FLOPs per compiled step / step time; util %: of the peak "
        f"{peak['flops_per_sec'] / UNITS[unit]:.3g} {unit} ({peak['method']})"
    )
    ref = next((r for r in results if r.get("reference")), None)
    if ref is not None:
        t = ref["torch"]
        amp = ", autocast bfloat16" if t["autocast"] else ""
        lines.append(
            f"torch {t['torch_version']} (torchvision {t['torchvision_version']}) on "
            f"{t['device']}, {t['threads']} threads{amp}; "
            f"ours/torch: medians of {ref['repeats']} run(s) each, ours and torch's alternating"
        )
    loop = next((r["loop"] for r in results if "loop" in r), None)
    if loop is not None:
        timed = f"epochs 2-{loop['epochs']}" if loop["epochs"] > 2 else "epoch 2"
        lines.append(
            f"loop: the trainer on {loop['dataset']}, median images/s of {timed} "
            f"({loop['steps_per_epoch']} steps each), against the pure step at the same "
            "input size and batch"
        )
    return lines


def parse_archs(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated --arch values, in order, without repeats."""
    archs = [a.strip() for v in values or [",".join(DEFAULT_ARCHS)] for a in v.split(",")]
    archs = list(dict.fromkeys(a for a in archs if a))
    if not archs:
        raise cli.UsageError(f"--arch {','.join(values or [])!r} names no architecture")
    return archs


def check_writable(path: Path) -> None:
    """`--json PATH` can be written (checked before the benchmark runs, not after)."""
    parent = path.expanduser().absolute().parent
    if path.is_dir():
        raise cli.UsageError(f"--json {path} is a directory; name a file")
    if not parent.is_dir():
        raise cli.UsageError(f"--json {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise cli.UsageError(f"--json {path}: the directory {parent} is not writable")


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
                prepare_job(arch, settings, args.reference, root, args.loop_epochs)
                for arch in parse_archs(args.arch)
            ]
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
    peak = bench_flops.peak(args.dtype)  # first, so that the table can choose its unit
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
            "peak": bench_flops.peak(args.dtype),
            "load_average_at_start": load_at_start,  # other work on the machine, roughly
            "results": results,
        },
    )


if __name__ == "__main__":
    cli.run_main(main)

"""Timing for `flaxcnn.bench`: our compiled steps, timed, and one architecture's result.

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
  of the peak of a large matrix product measured in the same run (`flops`);
* the model: trainable parameters and forward multiply-adds per image (no compile).

`repeats` times the steps that many times and reports the median run. A `reference`
("torch") alternates those runs with the same network's in PyTorch (`torch_twins`), and
`loop` compares the pure step with the trainer's whole loop on the digits (`loop`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import jax
import numpy as np

from flaxcnn.bench import flops
from flaxcnn.bench.figures import median_sec, run_figures
from flaxcnn.bench.planning import (
    SEED,
    Plan,
    check_repeats,
    loop_module,
    optimizer_settings,
    prepare_job,
    reference_module,
    synthetic_batch,
)
from flaxcnn.training import parallel, steps
from flaxcnn.training.build import create_train_state

WARMUP_STEPS = 1  # untimed calls after the compiling one


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
        train_flops = flops.lower_and_compile(par.train_step, self.state, self.train_batch)
        self._train(1)  # jax reuses the executable just compiled
        train_compile_sec = time.perf_counter() - start
        self._train(WARMUP_STEPS)
        start = time.perf_counter()
        eval_flops = flops.lower_and_compile(par.eval_step, self.state, self.batch)
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
    peak = flops.peak(p.network.dtype)
    train_rate = flops.rate(compiled["train_flops_per_step"], train_sec / p.steps)
    eval_rate = flops.rate(compiled["eval_flops_per_step"], eval_sec / p.steps)
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
        "train_utilisation": flops.ratio(train_rate, peak["flops_per_sec"]),
        "eval_utilisation": flops.ratio(eval_rate, peak["flops_per_sec"]),
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

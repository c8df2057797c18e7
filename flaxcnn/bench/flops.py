"""FLOPs for `flaxcnn.bench`: XLA's count for a compiled step, and the peak the devices reach.

* Per step: `cost_analysis()` of the compiled step. Both strategies compile one SPMD
  program that every device runs on its slice of the batch (in jax 0.10 `jax.pmap` is
  itself `jax.jit` of `jax.shard_map`), so XLA's figure is one device's share: with 4
  devices it is a quarter of 1 device's at the same global batch (measured). The global
  figure is that times the device count. XLA counts 2 FLOPs per multiply-add of a
  convolution only where the kernel tap lies on the image, not on its zero padding, and
  adds the element-wise work, so a forward pass comes near 2 x the model's multiply-adds
  (below for padded convolutions, e.g. 0.93x for resnet20; 1.02x for LeNet-5), and a
  train step near 3x its forward pass.
* Peak: a square matrix product in the compute dtype, jitted and run on every local device
  at once (`jax.pmap`), 2 n^3 FLOPs per device per call; the median of `PEAK_CALLS` calls.
  `n` doubles from `PEAK_START_SIZE` until one call takes `MIN_PEAK_CALL_SEC`, so that a
  call's fixed costs (dispatch, synchronisation) do not count; where even `PEAK_MAX_SIZE`
  is quicker, each timing spans enough calls dispatched back to back.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

PEAK_START_SIZE = 1024
PEAK_MAX_SIZE = 16384  # 1 GiB per float32 matrix
MIN_PEAK_CALL_SEC = 0.05
PEAK_CALLS = 5


def compiled_flops(compiled: Any) -> float | None:
    """One device's FLOPs per call of a compiled computation; None where XLA does not say."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def lower_and_compile(fn: Any, *args: Any) -> float | None:
    """Compile `fn` for `args` ahead of time; its per-device FLOPs.

    jax caches the executable, so the next call of `fn` with arguments of these shapes
    runs it without compiling again: the compile is not paid twice.
    """
    return compiled_flops(fn.lower(*args).compile())


def _operands(n: int, dtype: str) -> tuple[jax.Array, jax.Array]:
    """Two random n x n matrices on every local device, made there (no host copy)."""
    normal = jax.pmap(lambda k: jax.random.normal(k, (n, n), jnp.dtype(dtype)))
    devices = jax.local_device_count()
    return normal(jax.random.split(jax.random.key(1), devices)), normal(
        jax.random.split(jax.random.key(2), devices)
    )


@functools.cache
def _matmul():
    return jax.pmap(jnp.matmul)


def _call_sec(a: jax.Array, b: jax.Array, calls: int = 1) -> float:
    """Seconds per call, over `calls` calls dispatched back to back."""
    start = time.perf_counter()
    for _ in range(calls):
        out = _matmul()(a, b)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def _size_and_calls(dtype: str) -> tuple[int, int, jax.Array, jax.Array]:
    """The matrix side at which one call takes MIN_PEAK_CALL_SEC (at most PEAK_MAX_SIZE),
    and how many calls a timing must span to take as long (1 but on the fastest devices)."""
    n = PEAK_START_SIZE
    while True:
        a, b = _operands(n, dtype)
        _call_sec(a, b)  # compiles
        sec = _call_sec(a, b)
        if sec >= MIN_PEAK_CALL_SEC or n >= PEAK_MAX_SIZE:
            return n, math.ceil(MIN_PEAK_CALL_SEC / sec), a, b
        n *= 2


@functools.cache
def peak(dtype: str) -> dict[str, Any]:
    """The devices' matrix-product FLOP/s in `dtype` (once per process and dtype)."""
    n, calls, a, b = _size_and_calls(dtype)
    times = [_call_sec(a, b, calls) for _ in range(PEAK_CALLS)]
    median = statistics.median(times)
    flops = 2 * n**3 * jax.device_count()
    timed = "calls" if calls == 1 else f"timings of {calls} calls each"
    return {
        "flops_per_sec": flops / median,
        "method": f"jax.pmap(jnp.matmul) of two {n}x{n} {dtype} matrices on each of "
        f"{jax.device_count()} device(s) at once, 2*n^3 FLOPs per device, median of "
        f"{PEAK_CALLS} {timed}",
        "matrix_size": n,
        "dtype": dtype,
        "devices": jax.device_count(),
        "flops_per_call": flops,
        "calls_per_timing": calls,
        "call_sec_median": median,
        "call_sec": times,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
    }


def rate(flops: float | None, seconds: float) -> float | None:
    return None if flops is None else flops / seconds


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b

"""Parallel hardware and convolution: how much faster is a 3x3 convolution of a big image?

The course's claim: parallel hardware makes convolution 10-100x faster. Its example is a
10,000 x 10,000 image and a 3x3 kernel, i.e. 9,998 x 9,998 output positions ("valid"), each
a sum of 9 products, every one independent of the others.

Measured: that convolution (float32, the same random image and kernel everywhere)

* as a pure-Python loop over the output positions and the 9 kernel entries, on a central
  crop (timed on two crop sizes to check the cost per position is constant) and extrapolated
  linearly to 9,998^2 positions -- the page says so;
* as vectorised numpy: the sum of the 9 shifted slices of the image times the weights (one
  thread, SIMD);
* with XLA, `jax.lax.conv_general_dilated` under `jax.jit`, and, for comparison, the same
  9 shifted slices written in jax.numpy under `jax.jit` (XLA fuses them into one loop), in
  child processes, because XLA's CPU thread pool is sized when jax starts: one child pinned
  to one core with `os.sched_setaffinity` before jax is imported (what `taskset -c 0` does),
  one on all the cores allowed, and one with the often-quoted flag
  `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` (to show whether it limits XLA to one
  thread with this jax). Each child reports which of its threads did the work (CPU time per
  thread, from /proc), so the thread counts are measured rather than assumed;
* on a GPU/TPU when jax has one (empty cells otherwise).

Times are medians over a few calls after a warm-up call (compile included there), with
`block_until_ready`. Every method's output is checked against the pure-Python loop on the
central crop (max abs difference), taken from the timed full-size computation.

Sizes: `--smoke` a 500 x 500 image and tiny crops (seconds; the timings are extrapolated);
`--quick` the full 10,000 x 10,000 image (400 MB in float32), Python crops of 100 and 300,
3 timed calls; `--full` the same image, Python crops of 100 and 500, 5 timed calls (the
accelerator, when present, is measured at every size).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import numpy as np

NAME = "parallel_speed"
SEED = 0
FULL_SIDE = 10_000
KERNEL = 3
FULL_POSITIONS = (FULL_SIDE - KERNEL + 1) ** 2  # 9,998^2 = 99,960,004
FLAG = "--xla_cpu_multi_thread_eigen=false"
MIN_TICKS = 20
CHANNELS = 16  # the many-channel convolution, for comparison
MARKER = "RESULT "
# The child processes: pin first (before anything can start jax), then import this file.
CHILD = (
    "import json, os, sys\n"
    "spec = json.loads(sys.argv[1])\n"
    "if spec['cores'] is not None:\n"
    "    os.sched_setaffinity(0, spec['cores'])\n"
    "sys.path.insert(0, spec['dir'])\n"
    "import parallel_speed\n"
    "parallel_speed.child(spec)\n"
)


# --- the data --------------------------------------------------------------------------


def make_image(side: int) -> np.ndarray:
    """The test image: standard normal float32, the same in every process for a seed."""
    return np.random.default_rng(SEED).standard_normal((side, side), dtype=np.float32)


def make_kernel() -> np.ndarray:
    """The 3x3 float32 kernel (random, so no entry is special)."""
    return np.random.default_rng(SEED + 1).standard_normal((KERNEL, KERNEL), dtype=np.float32)


def positions(side: int) -> int:
    """Output positions of a 'valid' 3x3 convolution of a side x side image."""
    return (side - KERNEL + 1) ** 2


def crop_origin(side: int, crop: int) -> int:
    """Top-left corner of the central crop (the same row and column)."""
    return (side - crop) // 2


# --- the methods -----------------------------------------------------------------------


def conv_python(image: list[list[float]], kernel: list[list[float]]) -> list[list[float]]:
    """The textbook loop: for each output position, the sum of 9 products (one thread)."""
    rows, cols, size = len(image), len(image[0]), len(kernel)
    out = []
    for r in range(rows - size + 1):
        row = []
        for c in range(cols - size + 1):
            acc = 0.0
            for i in range(size):
                for j in range(size):
                    acc += kernel[i][j] * image[r + i][c + j]
            row.append(acc)
        out.append(row)
    return out


def conv_numpy(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Vectorised: the sum of the 9 shifted slices times their weights (one thread, SIMD)."""
    size = kernel.shape[0]
    rows, cols = image.shape[0] - size + 1, image.shape[1] - size + 1
    out = np.zeros((rows, cols), dtype=image.dtype)
    for i in range(size):
        for j in range(size):
            out += kernel[i, j] * image[i : i + rows, j : j + cols]
    return out


def xla_functions() -> dict[str, Callable[[Any, Any], Any]]:
    """The jitted XLA versions (jax imported here, so a child can pin itself first)."""
    import jax

    def conv(image: jax.Array, kernel: jax.Array) -> jax.Array:
        out = jax.lax.conv_general_dilated(
            image[None, :, :, None],
            kernel[:, :, None, None],
            window_strides=(1, 1),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return out[0, :, :, 0]

    def slices(image: jax.Array, kernel: jax.Array) -> jax.Array:
        size = kernel.shape[0]
        rows, cols = image.shape[0] - size + 1, image.shape[1] - size + 1
        terms = [
            kernel[i, j] * image[i : i + rows, j : j + cols]
            for i in range(size)
            for j in range(size)
        ]
        return sum(terms[1:], terms[0])  # XLA fuses the 9 products and adds into one loop

    return {"conv": jax.jit(conv), "slices": jax.jit(slices)}


# --- timing ----------------------------------------------------------------------------


def median_time(call: Callable[[], Any], reps: int) -> tuple[float, list[float]]:
    """Median wall time of `reps` calls of `call` (the caller warms up first)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def thread_cpu_ticks() -> dict[str, int]:
    """CPU time (clock ticks, user + system) of each thread of this process, from /proc."""
    ticks = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return ticks
    for tid in tids:
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def busy_threads(before: dict[str, int], after: dict[str, int], share: float = 0.1) -> int | None:
    """Threads that did at least `share` of the work between two snapshots."""
    if not after:
        return None
    deltas = [after[t] - before.get(t, 0) for t in after]
    total = sum(deltas)
    if total < MIN_TICKS:  # too little CPU time to attribute (clock ticks are 10 ms)
        return None
    return sum(d >= share * total for d in deltas)


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_python(image: np.ndarray, crop: int, reps: int) -> dict[str, Any]:
    """The pure-Python loop on the central crop x crop of the image."""
    side = image.shape[0]
    origin = crop_origin(side, crop)
    block = image[origin : origin + crop, origin : origin + crop].tolist()
    kernel = make_kernel().tolist()
    out = conv_python(block, kernel)  # warm-up, and the reference output
    median, times = median_time(lambda: conv_python(block, kernel), reps)
    return {
        "crop": crop,
        "positions": positions(crop),
        "median_s": median,
        "times_s": times,
        "per_position_s": median / positions(crop),
        "output": np.asarray(out, dtype=np.float64),
    }


def crop_of(output: np.ndarray, side: int, crop: int) -> np.ndarray:
    """The part of a full output that the central crop's valid convolution produces."""
    origin = crop_origin(side, crop)
    n = crop - KERNEL + 1
    return np.asarray(output[origin : origin + n, origin : origin + n], dtype=np.float64)


def time_numpy(image: np.ndarray, crop: int, reps: int) -> dict[str, Any]:
    """Vectorised numpy on the whole image, with its central crop kept for the check."""
    side, kernel = image.shape[0], make_kernel()
    out = conv_numpy(image, kernel)  # warm-up
    part = crop_of(out, side, crop)
    del out
    median, times = median_time(lambda: conv_numpy(image, kernel), reps)
    return {"positions": positions(side), "median_s": median, "times_s": times, "crop": part}


def time_jitted(fn: Callable[..., Any], args: Sequence[Any], reps: int) -> dict[str, Any]:
    """Warm up (compile) then time a jitted function; say which threads did the work."""
    start = time.perf_counter()
    out = fn(*args).block_until_ready()  # compile + first call
    first = time.perf_counter() - start
    ticks, cpu, wall = thread_cpu_ticks(), process_cpu_seconds(), time.perf_counter()
    median, times = median_time(lambda: fn(*args).block_until_ready(), reps)
    wall = time.perf_counter() - wall
    return {
        "median_s": median,
        "times_s": times,
        "first_call_s": first,
        "busy_threads": busy_threads(ticks, thread_cpu_ticks()),
        "cpu_per_wall": (process_cpu_seconds() - cpu) / wall,
        "output": out,
    }


def time_xla(side: int, crop: int, reps: int, device: Any = None) -> dict[str, dict[str, Any]]:
    """Both XLA versions on the whole image, on `device` (default: jax's first device)."""
    import jax

    image = jax.device_put(make_image(side), device)
    kernel = jax.device_put(make_kernel(), device)
    results = {}
    for name, fn in xla_functions().items():
        result = time_jitted(fn, (image, kernel), reps)
        result["crop"] = crop_of(np.asarray(result.pop("output")), side, crop)
        result["positions"] = positions(side)
        result["macs"] = positions(side) * KERNEL**2
        results[name] = result
    return results


def time_conv_channels(side: int, channels: int, reps: int, device: Any = None) -> dict:
    """conv_general_dilated with many channels: the shape XLA's convolution is built for."""
    import jax

    rng = np.random.default_rng(SEED + 2)
    image = jax.device_put(rng.standard_normal((1, side, side, channels), np.float32), device)
    shape = (KERNEL, KERNEL, channels, channels)
    kernel = jax.device_put(rng.standard_normal(shape, np.float32), device)
    fn = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )
    result = time_jitted(fn, (image, kernel), reps)
    del result["output"]
    result["positions"] = positions(side)
    result["macs"] = positions(side) * KERNEL**2 * channels**2
    result["channels"] = channels
    return result


# --- the child processes ---------------------------------------------------------------


def child(spec: dict[str, Any]) -> None:
    """In a fresh process: time the XLA versions on CPU and print the result as JSON."""
    import jax

    cpu = jax.devices("cpu")[0]
    results = time_xla(spec["side"], spec["crop"], spec["reps"], cpu)
    side = spec["side"] // 8  # 1/64 of the positions, 256x the multiply-adds per position
    results[f"conv{CHANNELS}"] = time_conv_channels(side, CHANNELS, spec["reps"], cpu)
    for name, result in results.items():
        if "crop" in result:
            np.save(Path(spec["tmp"]) / f"{spec['mode']}-{name}.npy", result.pop("crop"))
    record = {
        "results": results,
        "affinity": sorted(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(MARKER + json.dumps(record), flush=True)


def child_modes() -> list[dict[str, Any]]:
    """One core (pinned), all cores, and all cores with the Eigen flag."""
    allowed = sorted(os.sched_getaffinity(0))
    return [
        {"mode": "one_core", "cores": allowed[:1], "xla_flags": ""},
        {"mode": "all_cores", "cores": None, "xla_flags": ""},
        {"mode": "eigen_flag", "cores": None, "xla_flags": FLAG},
    ]


def run_child(mode: dict[str, Any], side: int, crop: int, reps: int, tmp: Path) -> dict:
    """Start one child with its pinning and XLA_FLAGS; return its record and crops."""
    spec = {**mode, "side": side, "crop": crop, "reps": reps, "tmp": str(tmp)}
    spec["dir"] = str(Path(__file__).resolve().parent)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": mode["xla_flags"]}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"XLA child {mode['mode']} failed:\n{done.stderr[-3000:]}")
    record = json.loads(lines[-1][len(MARKER) :])
    for name, result in record["results"].items():
        saved = tmp / f"{mode['mode']}-{name}.npy"
        if saved.exists():
            result["crop"] = np.load(saved)
    return record


def accelerator() -> Any:
    """jax's first GPU/TPU device, or None on a CPU-only machine."""
    import jax

    devices = [d for d in jax.devices() if d.platform != "cpu"]
    return devices[0] if devices else None


# --- the page --------------------------------------------------------------------------

METHODS = [
    # key, label, kind
    ("python", "pure-Python loop (1 thread)", "python"),
    ("numpy", "numpy, 9 shifted slices (1 thread, SIMD)", "numpy"),
    ("one_core/conv", "XLA conv_general_dilated, pinned to 1 core", "xla"),
    ("all_cores/conv", "XLA conv_general_dilated, all cores", "xla"),
    ("eigen_flag/conv", f"XLA conv_general_dilated, all cores, {FLAG}", "xla"),
    ("one_core/slices", "XLA jit of the 9 shifted slices, pinned to 1 core", "xla"),
    ("all_cores/slices", "XLA jit of the 9 shifted slices, all cores", "xla"),
    ("eigen_flag/slices", f"XLA jit of the 9 shifted slices, all cores, {FLAG}", "xla"),
    ("accel/conv", "XLA conv_general_dilated on the GPU/TPU", "accel"),
    ("accel/slices", "XLA jit of the 9 shifted slices on the GPU/TPU", "accel"),
]


def summarise(measured: dict[str, dict[str, Any]], reference: np.ndarray) -> list[dict]:
    """One row per method: time for 9,998^2 positions, speed-ups, agreement on the crop."""
    rows = []
    for key, label, kind in METHODS:
        m = measured.get(key)
        row: dict[str, Any] = {"key": key, "method": label, "kind": kind}
        if m is None:
            rows.append(row)
            continue
        row["positions_measured"] = m["positions"]
        row["measured_s"] = m["median_s"]
        row["extrapolated"] = m["positions"] != FULL_POSITIONS
        row["full_s"] = m["median_s"] / m["positions"] * FULL_POSITIONS
        # Host threads say nothing about a GPU/TPU; Python and numpy run on one thread.
        row["busy_threads"] = {"python": 1, "numpy": 1, "accel": None}.get(
            kind, m.get("busy_threads")
        )
        row["max_abs_diff"] = float(np.max(np.abs(m["crop"] - reference)))
        rows.append(row)
    by_key = {r["key"]: r for r in rows}
    for row in rows:
        for base in ("python", "numpy"):
            if "full_s" in row and "full_s" in by_key[base]:
                row[f"speedup_vs_{base}"] = by_key[base]["full_s"] / row["full_s"]
    return rows


def seconds(value: float | None) -> str:
    if value is None:
        return harness.NOT_RUN
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def table_rows(rows: list[dict]) -> list[list[Any]]:
    out = []
    for r in rows:
        if "full_s" not in r:
            out.append([r["method"], *[harness.NOT_RUN] * 5])
            continue
        how = (
            f"extrapolated from {r['positions_measured']:,}"
            if r["extrapolated"]
            else "measured on all"
        )
        out.append(
            [
                r["method"],
                harness.cell(r["busy_threads"]),
                f"{seconds(r['full_s'])} ({how})",
                f"{r['speedup_vs_python']:,.0f}x",
                f"{r['speedup_vs_numpy']:.2g}x",
                f"{r['max_abs_diff']:.1e}",
            ]
        )
    return out


HEADERS = [
    "method",
    "threads doing the work (measured)",
    "time for 9,998^2 positions, s",
    "speed-up vs pure Python",
    "speed-up vs numpy",
    "max abs diff vs pure Python on the crop",
]
COLOURS = {"python": "tab:red", "numpy": "tab:orange", "xla": "tab:blue", "accel": "tab:green"}
LEGEND = {"python": "pure Python", "numpy": "numpy", "xla": "XLA on CPU", "accel": "XLA on GPU/TPU"}


def draw(rows: list[dict], path: Path) -> Path:
    """Horizontal bars, log time axis; hatched bars are extrapolated from a smaller run."""
    from matplotlib.patches import Patch  # here: the child processes never draw

    shown = [r for r in rows if "full_s" in r]
    figure = harness.new_figure(10, 0.45 * len(shown) + 1.6)
    ax = figure.add_subplot(1, 1, 1)
    y = np.arange(len(shown))[::-1]
    for yi, r in zip(y, shown, strict=True):
        ax.barh(
            yi,
            r["full_s"],
            color=COLOURS[r["kind"]],
            hatch="//" if r["extrapolated"] else None,
            edgecolor="black",
            linewidth=0.5,
        )
        ax.text(
            r["full_s"] * 1.1,
            yi,
            f"{seconds(r['full_s'])} s  ({r['speedup_vs_python']:,.0f}x Python, "
            f"{r['speedup_vs_numpy']:.2g}x numpy)",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(y, [r["method"].replace(f", {FLAG}", ",\n" + FLAG) for r in shown], fontsize=8)
    ax.set_xscale("log")
    longest = max(r["full_s"] for r in shown)
    ax.set_xlim(min(r["full_s"] for r in shown) / 3, longest * 60)
    ax.set_xlabel("time for the 9,998 x 9,998-position 3x3 convolution, seconds (log scale)")
    kinds = {r["kind"] for r in shown}
    handles = [Patch(color=COLOURS[k], label=LEGEND[k]) for k in COLOURS if k in kinds]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="extrapolated"))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.grid(axis="x", which="major", alpha=0.3)
    return harness.save_figure(figure, path)


PARALLEL = {  # the settings that run an op in parallel, compared with the same op on 1 core
    "all_cores": "all {cores} cores",
    "eigen_flag": f"all {{cores}} cores with {FLAG}",
    "accel": "the GPU/TPU",
}


def ratio_sentence(one: dict | None, many: dict | None, what: str, where: str) -> str | None:
    """How much a parallel setting (`where`) sped up one XLA op over the pinned core."""
    if not one or not many or "full_s" not in one or "full_s" not in many:
        return None
    threads = (
        ""
        if many["kind"] == "accel"
        else f" (threads doing the work: {harness.cell(one['busy_threads']) or 'too short to tell'}"
        f" vs {harness.cell(many['busy_threads']) or 'too short to tell'})"
    )
    return (
        f"Going from 1 core to {where} made {what} "
        f"{one['full_s'] / many['full_s']:.2f}x as fast{threads}."
    )


def parallel_gains(rows: list[dict], cores: int) -> list[tuple[str, str, float]]:
    """(sentence, setting, speed-up) for every parallel row measured (every CPU setting with
    more than one core, and the GPU/TPU) against the same op pinned to one core."""
    r = {row["key"]: row for row in rows}
    gains = []
    for op, what in (("conv", "conv_general_dilated"), ("slices", "the jitted shifted slices")):
        one = r.get(f"one_core/{op}")
        for mode, where in PARALLEL.items():
            many = r.get(f"{mode}/{op}")
            sentence = ratio_sentence(one, many, what, where.format(cores=cores))
            if sentence:
                gains.append(
                    (
                        sentence,
                        f"{what}, {where.format(cores=cores)}",
                        one["full_s"] / many["full_s"],
                    )
                )
    return gains


def verdict(rows: list[dict], children: dict[str, dict], cores: int) -> str:
    """The plain sentences, from the measured numbers: every row of the table counts."""
    r = {row["key"]: row for row in rows}
    cpu = [row for row in rows if row["kind"] in ("numpy", "xla") and "full_s" in row]
    best = min(cpu, key=lambda row: row["full_s"])
    parts = [
        f"As measured on this {cores}-core CPU, the fastest CPU method ({best['method']}) "
        f"was {best['speedup_vs_python']:,.0f}x as fast as the pure-Python loop and "
        f"{best['speedup_vs_numpy']:.2g}x as fast as single-threaded numpy."
    ]
    gains = parallel_gains(rows, cores)
    parts += [sentence for sentence, _, _ in gains]
    if gains:
        _, setting, top = max(gains, key=lambda gain: gain[2])
        accel = any("GPU/TPU" in setting for _, setting, _ in gains)
        parts.append(
            "So the parallel speed-up itself (every parallel setting measured against the same "
            f"op pinned to one core) was {top:.2g}x at best ({setting}), "
            + ("below" if top < 10 else "within" if top <= 100 else "above")
            + " the course's 10-100x, on this "
            + ("hardware." if accel else "CPU.")
            + (
                " Every parallel setting was slower than one core here, most likely because "
                "other work on the shared machine held the cores (see the load average above) "
                "and a multi-threaded op waits for its slowest thread."
                if top < 1
                else ""
            )
        )
    fused = r.get("one_core/slices")
    if fused and "full_s" in fused and fused["speedup_vs_numpy"] > 1:
        parts.append(
            f"Even on one core the fused XLA slices were {fused['speedup_vs_numpy']:.2g}x as "
            "fast as numpy, which makes 9 passes over the image (one temporary array "
            "per term) where XLA's fused loop makes one: memory traffic, not arithmetic, "
            "bounds this convolution."
        )
    conv = r.get("all_cores/conv")
    many = children.get("all_cores", {}).get("results", {})
    if conv and "full_s" in conv and conv["speedup_vs_numpy"] < 1 and "conv" in many:
        rate = many["conv"]["macs"] / many["conv"]["median_s"]
        wide = many[f"conv{CHANNELS}"]
        wide_rate = wide["macs"] / wide["median_s"]
        parts.append(
            "XLA's convolution op was slower than numpy on this one-channel image: it ran at "
            f"{rate / 1e9:.2g} G multiply-adds/s, against {wide_rate / 1e9:.2g} G/s for a "
            f"{CHANNELS}-in, {CHANNELS}-out-channel convolution on the same cores: the slowness is "
            "the op's one-channel case, not the cores. Written as shifted slices, XLA fuses the "
            "9 products into one loop."
        )
    flag, one = r.get("eigen_flag/conv", {}), r.get("one_core/conv", {})
    if (flag.get("busy_threads") or 0) > 1 and one.get("busy_threads") == 1:
        parts.append(
            f"The flag {FLAG} did not make XLA single-threaded with this jax "
            f"({flag['busy_threads']} threads did the work); pinning the process to one core "
            "before jax starts (os.sched_setaffinity, as taskset does) did."
        )
    return " ".join(parts)


MECHANISMS = {
    "one_core": "os.sched_setaffinity to 1 core before importing jax",
    "all_cores": "default",
    "eigen_flag": f"XLA_FLAGS={FLAG}",
}
CHILD_HEADERS = [
    "child",
    "mechanism",
    "cores allowed",
    "op",
    "threads doing the work",
    "CPU s per wall s",
    "G multiply-adds/s",
    "first call (compile + one run), s",
    "peak memory, GiB",
]


def child_rows(children: dict[str, dict]) -> list[list[Any]]:
    """One row per child process and op: the evidence for the thread counts."""
    ops = {"conv": "conv, 1 channel", "slices": "shifted slices, 1 channel"}
    ops[f"conv{CHANNELS}"] = f"conv, {CHANNELS} in / {CHANNELS} out channels"
    return [
        [
            mode,
            MECHANISMS[mode],
            len(record["affinity"]),
            ops[op],
            harness.cell(result["busy_threads"]),
            f"{result['cpu_per_wall']:.2f}",
            f"{result['macs'] / result['median_s'] / 1e9:.3g}",
            f"{result['first_call_s']:.2f}",
            f"{record['peak_rss_gib']:.2f}",
        ]
        for mode, record in children.items()
        for op, result in record["results"].items()
    ]


def main(argv: Sequence[str] | None = None) -> None:
    run = harness.start(NAME, __doc__, argv)
    side = run.pick(smoke=500, quick=FULL_SIDE, full=FULL_SIDE)
    crops = run.pick(smoke=(12, 24), quick=(100, 300), full=(100, 500))
    reps = run.pick(smoke=2, quick=3, full=5)
    check = crops[-1]  # the crop every method is checked on (the larger Python crop)
    cores = len(os.sched_getaffinity(0))

    image = make_image(side)
    python = [time_python(image, crop, reps) for crop in crops]
    reference = python[-1]["output"]
    measured: dict[str, dict[str, Any]] = {"python": {**python[-1], "crop": reference}}
    print(f"pure Python: {python[-1]['per_position_s'] * 1e6:.2f} us per position", flush=True)
    measured["numpy"] = time_numpy(image, check, reps)
    del image  # the children make their own copy
    print(f"numpy: {measured['numpy']['median_s']:.3f} s", flush=True)

    children = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in child_modes():
            record = run_child(mode, side, check, reps, Path(tmp))
            children[mode["mode"]] = record
            for op, result in record["results"].items():
                measured[f"{mode['mode']}/{op}"] = result
                print(f"XLA {mode['mode']} {op}: {result['median_s']:.3f} s", flush=True)

    device = accelerator()
    if device is not None:
        for op, result in time_xla(side, check, reps, device).items():
            measured[f"accel/{op}"] = result

    rows = summarise(measured, reference)
    page = harness.Page(
        run,
        "Parallel hardware and the 3x3 convolution of a 10,000 x 10,000 image",
        claim="Parallel hardware makes convolution 10-100x faster; the example is a "
        "10,000 x 10,000 image convolved with a 3x3 kernel: 9,998 x 9,998 = "
        f"{FULL_POSITIONS:,} output positions, each independent of the others.",
    )
    page.text(
        f"Image {side:,} x {side:,} float32 ({positions(side):,} output positions), 3x3 "
        f"kernel, 'valid'; median of {reps} timed calls after a warm-up call. The pure-Python "
        f"loop ran on central crops of {crops[0]} and {crops[-1]} pixels "
        f"({python[0]['per_position_s'] * 1e6:.2f} and "
        f"{python[-1]['per_position_s'] * 1e6:.2f} microseconds per position; the "
        "extrapolation assumes a constant cost per position and uses the larger crop's); its "
        "time for 9,998^2 positions is EXTRAPOLATED, "
        "not measured"
        + (
            ", and so are all the others at this size."
            if side != FULL_SIDE
            else ". numpy and XLA ran on the whole 10,000 x 10,000 image."
        )
        + f" The machine has {cores} cores available to this process."
    )
    page.table(HEADERS, table_rows(rows))
    figure = draw(rows, run.path(".png"))
    page.figure(
        figure,
        "Time for the whole 9,998^2-position convolution, log scale (hatched: extrapolated "
        "from a crop); labels give the speed-up over the pure-Python loop and over numpy.",
    )
    page.heading("How XLA was limited to one thread")
    page.text(
        "XLA sizes its CPU thread pool when jax starts, so each XLA setting ran in its own "
        "child process. 'threads doing the work' counts the threads that used at least 10% of "
        "the process's CPU time during the timed calls (per-thread CPU time from /proc; empty "
        f"when the calls used under {MIN_TICKS} clock ticks, too little to tell); 'CPU s per "
        "wall s' above 1 means more than one core was busy at once (it stays below the thread "
        "count when other work on the machine takes the cores). The "
        f"{CHANNELS}-channel convolution ran on a {side // 8:,} x {side // 8:,} image, for "
        "comparison only."
    )
    page.table(CHILD_HEADERS, child_rows(children))
    page.heading("Did the claim hold?")
    page.text(
        verdict(rows, children, cores)
        + " The course's 10-100x is about parallel hardware -- a GPU's thousands of lanes, "
        f"or many cores -- not about a {cores}-core CPU: here the threads can give at most "
        f"{cores}x, and most of the speed-up over the Python loop comes from vectorisation "
        "(compiled loops and SIMD lanes doing several products per instruction), which "
        "single-threaded numpy already has. Timings on a shared machine are noisy."
        + (
            ""
            if device is not None
            else " No GPU/TPU was available, so the accelerator rows are empty."
        )
    )
    if not run.full:
        page.heading("Full setting (not run)")
        page.text(
            "`python experiments/parallel_speed.py --full` (same image, Python crops of 100 "
            "and 500, 5 timed calls; the GPU/TPU rows where jax has one). Not run here:"
        )
        page.table(HEADERS, [[label, *[harness.NOT_RUN] * 5] for _, label, _ in METHODS])
    page.write(
        data={
            "side": side,
            "positions_measured": positions(side),
            "full_positions": FULL_POSITIONS,
            "python_crops": [{k: v for k, v in p.items() if k != "output"} for p in python],
            "reps": reps,
            "cores": cores,
            "rows": rows,
            "children": {
                mode: {
                    **{k: v for k, v in record.items() if k != "results"},
                    "results": {
                        op: {k: v for k, v in res.items() if k != "crop"}
                        for op, res in record["results"].items()
                    },
                }
                for mode, record in children.items()
            },
            "accelerator": None if device is None else str(device.device_kind),
        }
    )


if __name__ == "__main__":
    harness.main_guard(main)

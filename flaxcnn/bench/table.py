"""The table `python -m flaxcnn.bench` prints: its columns, header and footer lines."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


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

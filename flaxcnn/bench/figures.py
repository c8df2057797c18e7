"""One timed run's figures, the same keys for ours (`timing`) and for a reference
(`torch_twins`), and their median over several runs."""

from __future__ import annotations

import statistics


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

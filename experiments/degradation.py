"""Degradation: a deeper plain network trains worse, a deeper residual one at least as well.

He et al. (2016, Fig. 1 and Fig. 6) found that stacking more layers onto a plain network
(conv -> BN -> ReLU, no shortcuts) *raises* its training error: the deeper net is harder
to optimise, not overfitting. Adding identity shortcuts (`out + x`) removes the problem:
the deeper residual net trains at least as well (He et al. report lower training and test
error for it).

Measured here: plain-20, plain-56, ResNet-20 and ResNet-56 (and the 110-layer pair in
--full), trained with one recipe through `flaxcnn.training.train`; the training loss and
the training and test error of each, against the step.

    python experiments/degradation.py --smoke   # seconds: 20-layer pair, one epoch, 8x8
    python experiments/degradation.py           # --quick: digits at their own 8x8 (CPU minutes)
    python experiments/degradation.py --full    # cifar10, He et al.'s recipe (a GPU/TPU)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import harness

from flaxcnn import cli  # jax, flax and matplotlib load where used: a bad argument is refused fast

# He et al. 2016, Table 6 (CIFAR-10 test error, %); the "measured" column beside it is
# filled only by a --full run. (No other published or reproduced figures are shown: a
# number on the page needs a source the page can name.)
PAPER_TABLE6 = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97,
                "resnet110": 6.43}  # fmt: skip
PAPER = "He et al. (2016), Deep Residual Learning for Image Recognition, Table 6"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training setting; --full is He et al.'s CIFAR-10 recipe."""

    dataset: str
    image_size: int | None
    depths: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float  # for this batch size (the trainer's --lr is per 256 and scaled)
    weight_decay: float
    warmup_epochs: float
    # Batches over which BatchNorm statistics are recomputed before each evaluation; None:
    # the trainer's default. Only --smoke sets it (0), to save each net a compile.
    precise_bn: int | None = None

    def config(self, arch: str, seed: int, workdir: Path, data_dir: str | None):
        from flaxcnn.training import TrainConfig

        return TrainConfig(
            arch=arch,
            dataset=self.dataset,
            data_dir=data_dir,
            image_size=self.image_size,
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr * 256 / self.batch_size,
            schedule="step",  # x0.1 at 50% and 75%: 32k and 48k of 64k iterations
            # He et al. warm up only the 110-layer net (lr 0.01 for 400 iterations).
            warmup_epochs=self.warmup_epochs if arch.endswith("110") else 0.0,
            weight_decay=self.weight_decay,
            label_smoothing=0.0,  # He et al. train on the plain targets
            seed=seed,
            workdir=str(workdir),
            progress=False,
            **({} if self.precise_bn is None else {"precise_bn": self.precise_bn}),
        )


def recipe_for(size: str) -> Recipe:
    if size == "smoke":  # 5 steps: what costs is compiling, once per net and function
        return Recipe("digits", 8, (20,), epochs=1, batch_size=256, lr=0.1,
                      weight_decay=1e-4, warmup_epochs=0.0, precise_bn=0)  # fmt: skip
    if size == "quick":  # at 8x8 a step costs ~1/16 of 32x32's: 3,600 steps in ~25 minutes
        return Recipe("digits", 8, (20, 56), epochs=180, batch_size=64, lr=0.05,
                      weight_decay=1e-4, warmup_epochs=0.0)  # fmt: skip
    # 164 epochs x 390 steps = 63,960 iterations of batch 128 (the paper: 64k).
    return Recipe("cifar10", None, (20, 56, 110), epochs=164, batch_size=128, lr=0.1,
                  weight_decay=1e-4, warmup_epochs=1.0)  # fmt: skip


def arch_names(depths: Sequence[int]) -> list[str]:
    return [f"{kind}{d}" for kind in ("plain", "resnet") for d in depths]


def curves(workdir: Path) -> dict[str, list[float]]:
    """Per-epoch step, training loss, and training and test error of one run."""
    from flaxcnn import plot

    records = plot.read_run(workdir)
    train = {r["epoch"]: r for r in records if r["split"] == "train"}
    test = {r["epoch"]: r for r in records if r["split"] == "test"}
    epochs = sorted(train)
    return {
        "step": [train[e]["step"] for e in epochs],
        "train_loss": [train[e]["loss"] for e in epochs],
        "train_error": [1 - train[e]["accuracy"] for e in epochs],
        "test_error": [1 - test[e]["accuracy"] if e in test else math.nan for e in epochs],
    }


def train_one(recipe: Recipe, arch: str, seed: int, run: harness.Run) -> dict[str, Any]:
    from flaxcnn.training import train

    workdir = run.train_workdir(f"{arch}-seed{seed}")
    start = time.perf_counter()
    test = train(recipe.config(arch, seed, workdir, run.data_dir), out=lambda line: None)
    seconds = time.perf_counter() - start
    c = curves(workdir)
    return {
        "arch": arch,
        "seed": seed,
        "params": count_params(arch, recipe),
        "seconds": seconds,
        "final_train_loss": c["train_loss"][-1],
        # The last epoch's running training error, as He et al. plot it (augmented inputs,
        # BatchNorm in training mode), and the test error of the final weights.
        "final_train_error": c["train_error"][-1],
        "final_test_error": 1 - test["accuracy"],
        "curves": c,
    }


def count_params(arch: str, recipe: Recipe) -> int:
    from flaxcnn import models
    from flaxcnn.models import summary

    size = recipe.image_size or 32
    return summary.count_params(models.create(arch, num_classes=10), (1, size, size, 3))


def draw(results: Sequence[dict[str, Any]], title: str):
    """Training loss (left), error (right; solid train, dashed test) against the step."""
    figure = harness.new_figure(12, 4.8)
    loss_ax, err_ax = figure.subplots(1, 2)
    palette = {"plain": ("#f4a261", "#c1121f", "#6a040f"),
               "resnet": ("#90e0ef", "#0077b6", "#03045e")}  # fmt: skip
    depths = sorted({int("".join(filter(str.isdigit, r["arch"]))) for r in results})
    for r in results:
        kind = "plain" if r["arch"].startswith("plain") else "resnet"
        depth = int("".join(filter(str.isdigit, r["arch"])))
        color = palette[kind][depths.index(depth) + (3 - len(depths))]
        label = f"{kind}-{depth}" + (f" (seed {r['seed']})" if r["seed"] else "")
        c = r["curves"]
        loss_ax.plot(c["step"], c["train_loss"], "-", color=color, label=label)
        err_ax.plot(c["step"], [100 * e for e in c["train_error"]], "-", color=color,
                    label=f"{label} train")  # fmt: skip
        err_ax.plot(c["step"], [100 * e for e in c["test_error"]], "--", color=color,
                    label=f"{label} test")  # fmt: skip
    loss_ax.set(title="training loss", xlabel="step", ylabel="cross-entropy", yscale="log")
    err_ax.set(title="error (solid: train, dashed: test)", xlabel="step", ylabel="error (%)")
    for ax in (loss_ax, err_ax):
        ax.grid(alpha=0.3)
    err_ax.legend(fontsize="small", ncols=2)
    figure.suptitle(title)
    return figure


def verdict(by_arch: dict[str, dict[str, float]], depths: Sequence[int]) -> list[str]:
    """Plain sentences on the claim, from the measured final training errors."""
    if len(depths) < 2:
        return ["- Only one depth was trained at this size, so there is nothing to compare."]
    shallow, deep = depths[0], depths[-1]
    lines = []
    # He et al.: the deeper plain net trains worse; the deeper residual net at least as well.
    for kind, claim in (("plain", "a higher one"), ("resnet", "one no higher")):
        a, b = by_arch[f"{kind}{shallow}"], by_arch[f"{kind}{deep}"]
        deeper, shallower = b["final_train_error"], a["final_train_error"]
        if deeper > shallower:
            observed = f"a higher training error than {kind}-{shallow}"
        elif deeper < shallower:
            observed = f"a lower training error than {kind}-{shallow}"
        else:
            observed = f"the same training error as {kind}-{shallow}"
        held = deeper > shallower if kind == "plain" else deeper <= shallower
        lines.append(
            f"- {kind}-{deep} ended with {observed} "
            f"({100 * deeper:.2f}% vs {100 * shallower:.2f}%; "
            f"test {100 * b['final_test_error']:.2f}% vs {100 * a['final_test_error']:.2f}%): "
            f"the claim expects {claim}, so on this point it "
            f"{'held' if held else 'did not hold'}."
        )
    return lines


def mean_over_seeds(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for arch in dict.fromkeys(r["arch"] for r in results):
        rs = [r for r in results if r["arch"] == arch]
        out[arch] = {
            k: sum(r[k] for r in rs) / len(rs)
            for k in ("final_train_loss", "final_train_error", "final_test_error", "seconds")
        }
        out[arch]["params"] = rs[0]["params"]
        out[arch]["seeds"] = len(rs)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=1, help="seeds per network (default 1)")


def main(argv: Sequence[str] | None = None) -> None:
    run = harness.start("degradation", __doc__, argv, add_arguments)
    if run.args.seeds < 1:
        raise cli.UsageError(f"--seeds must be positive, got {run.args.seeds}")
    recipe = recipe_for(run.size)
    archs = arch_names(recipe.depths)
    results = []
    for seed in range(run.args.seeds):
        for arch in archs:
            print(f"training {arch} (seed {seed}) on {recipe.dataset} ...", flush=True)
            results.append(train_one(recipe, arch, seed, run))
            r = results[-1]
            print(f"  {arch}: train error {100 * r['final_train_error']:.2f}%, test error "
                  f"{100 * r['final_test_error']:.2f}%, {r['seconds']:.0f} s")  # fmt: skip
    by_arch = mean_over_seeds(results)

    size = recipe.image_size or "native"
    setting = (
        f"{recipe.dataset} at {size}x{size}, {recipe.epochs} epoch(s) of batch {recipe.batch_size} "
        f"(lr {recipe.lr:g} for that batch, x0.1 at 50% and 75% of the steps), SGD with Nesterov "
        f"momentum 0.9, weight decay {recipe.weight_decay:g} on kernels, the trainer's "
        f"augmentation (random crops from a zero-padded image; no flip for digits), "
        f"{run.args.seeds} seed(s)"
    )
    figure = draw(results, f"plain vs residual nets on {recipe.dataset} ({run.size} size)")
    png = harness.save_figure(figure, run.path(".png"))

    page = harness.Page(
        run,
        "Degradation: deeper plain nets train worse, deeper residual nets at least as well",
        "stacking more plain layers raises the training error (an optimisation problem, not "
        "overfitting); identity shortcuts remove it, so the deeper residual net trains at least "
        "as well: a training error no higher than the shallower one's (He et al. 2016, Fig. 1 "
        "and 6).",
    )
    page.text(f"**Setting.** {setting}.")
    page.table(
        [
            "network",
            "parameters",
            "final train loss",
            "final train error (%)",
            "final test error (%)",
            "train time (s)",
        ],
        [
            [
                arch,
                f"{m['params']:,}",
                f"{m['final_train_loss']:.4f}",
                f"{100 * m['final_train_error']:.2f}",
                f"{100 * m['final_test_error']:.2f}",
                f"{m['seconds']:.0f}",
            ]
            for arch, m in by_arch.items()
        ],
    )
    page.figure(png, "Training loss and error against the step (one point per epoch).")
    page.heading("Did the claim hold?")
    page.text("\n".join(verdict(by_arch, recipe.depths)))
    page.text(
        "The training error is the running error over each epoch's augmented batches with "
        "BatchNorm in training mode, as in He et al.'s curves; the test error is that of "
        "the final weights. One seed per network unless `--seeds` says otherwise, so small "
        "differences are within seed-to-seed noise."
    )
    page.text(
        f"Every network gets the same budget: {recipe.epochs} epoch(s), "
        f"{results[0]['curves']['step'][-1]} steps of batch {recipe.batch_size}; He et al. "
        "compare nets trained for 64k steps. A short budget shows how fast each net starts "
        "to fit, and a deeper net, plain or residual, may not have converged at its end: "
        "the curves say whether its loss was still falling."
    )
    page.heading("Full setting (CIFAR-10, He et al.'s recipe)")
    ran = "" if run.full else " It needs a GPU/TPU (hours); not run here, so the measured "
    ran += "" if run.full else "column is empty."
    page.text(
        f"`python experiments/degradation.py --full --seeds 5` trains plain and residual "
        f"20/56/110 on cifar10 (50k train / 10k test images; He et al. chose 64k iterations "
        f"on a 45k/5k split, then trained on all 50k): {_describe(recipe_for('full'))}.{ran}"
    )
    page.text(
        f"CIFAR-10 test error (%): the paper's column is {PAPER} (it gives no plain-net "
        "figures there); the measured one is this script's --full run (the mean over its "
        "seeds)."
    )
    page.table(*full_table(by_arch if run.full else {}))
    page.write(data={"setting": setting, "recipe": dataclasses.asdict(recipe),
                     "by_arch": by_arch, "runs": results})  # fmt: skip


def full_table(measured: dict[str, dict[str, float]]) -> tuple[list[str], list[list[str]]]:
    """The full setting's table: He et al.'s Table 6 beside the --full run's test errors
    (`measured`, by network; empty cells where it has none)."""
    headers = ["network", "He et al. 2016, Table 6 (%)", "measured, --full (%)"]
    rows = [
        [
            a,
            harness.cell(PAPER_TABLE6.get(a), ".2f"),
            harness.cell(100 * measured[a]["final_test_error"] if a in measured else None, ".2f"),
        ]
        for a in arch_names((20, 56, 110))
    ]
    return headers, rows


def _describe(recipe: Recipe) -> str:
    return (
        f"{recipe.epochs} epochs x 390 steps of batch {recipe.batch_size}, lr {recipe.lr:g} "
        f"x0.1 at 50% and 75%, weight decay {recipe.weight_decay:g}, momentum 0.9 (Nesterov), "
        f"4-pixel pad + crop + flip, a 1-epoch warmup for the 110-layer nets"
    )


if __name__ == "__main__":
    harness.main_guard(main)

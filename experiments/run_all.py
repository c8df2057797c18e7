"""Regenerate every committed results page: each experiment at its quick size, published.

    python experiments/run_all.py              # all of them, one after the other
    python experiments/run_all.py zoo loss     # some of them
    python experiments/run_all.py --dry-run    # the commands only

Run it from the repository's root on an idle machine (the pages report times) after the
code an experiment measures changed; each page then names the commit it was measured at.
The experiments run one at a time, each in its own process, so that none shares the
machine with another; the first failure stops the rest with its exit code.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Every experiment with a committed quick page (experiments/results/NAME.md), cheapest first.
EXPERIMENTS = (
    "one_by_one",
    "loss",
    "bottleneck",
    "parallel_speed",
    "zoo",
    "feature_maps",
    "bench_cpu",
    "small_data",
    "degradation",
)


def commands(names: Sequence[str], data_dir: str | None = None) -> list[list[str]]:
    extra = ["--data-dir", data_dir] if data_dir else []
    return [
        [sys.executable, f"experiments/{name}.py", "--quick", "--publish", *extra] for name in names
    ]


def main(argv: Sequence[str] | None = None) -> int:
    # flaxcnn's parser: bad input is one line and exit 2, as in every command here.
    sys.path.insert(0, str(ROOT))
    from flaxcnn import cli

    parser = cli.ArgumentParser(
        prog="python experiments/run_all.py", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"experiments to run (default: all: "
        f"{', '.join(EXPERIMENTS)})",
    )  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="where prepared data sets live")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment {unknown[0]!r}; choose from {', '.join(EXPERIMENTS)}")
    for command in commands(args.names or EXPERIMENTS, args.data_dir):
        shown = " ".join(["python", *command[1:]])
        print(f"+ {shown}", flush=True)
        if args.dry_run:
            continue
        began = time.monotonic()
        code = subprocess.call(command, cwd=ROOT)
        print(f"  ({(time.monotonic() - began) / 60:.1f} min, exit code {code})", flush=True)
        if code:
            print(
                f"error: {shown} failed (exit code {code}); the rest were not run", file=sys.stderr
            )
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

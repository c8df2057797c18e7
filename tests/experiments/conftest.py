"""Running an experiment script as a user would: `python experiments/NAME.py --smoke`, in
a child process, writing into the test's temporary directory (never the committed results).

The child's XLA compiles at LLVM -O0 (`SMOKE_XLA_FLAGS`): a smoke run's compiled steps run
a handful of times, so it spends its time compiling, and the tests check that the script
runs and that its numbers hold together, which the optimisation level changes neither of.
Measured on a busy 2-core AMD EPYC: degradation --smoke 32 -> 25 s, zoo 19-21 -> 15 s; the
other scripts within noise either way.

The smoke runs that do little but compile (`COMPILE_BOUND`, and the notebook's kernel) also
turn off XLA:CPU's fusion emitters (`COMPILE_BOUND_XLA_FLAGS`): its older loop emitter
compiles the same programs in about half the time (feature_maps' resnet20 probe 6.1 -> 2.5
s). Not for the scripts that time steps or a matrix product (bench_cpu, zoo, parallel_speed):
the older emitter ran the benchmark's jnp.matmul peak 4x slower at -O0 (bench_cpu --smoke
23-24 -> 29-31 CPU s; zoo within noise). CPU seconds of --smoke, back to back on a busy
2-core AMD EPYC, jaxlib 0.10.2: feature_maps 28-30 -> 21-22, degradation 28-29 -> 22-24,
small_data 13 -> 11; the notebook test 41 -> 29 (36 at -O0 alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from flaxcnn import xla_flags

ROOT = Path(__file__).resolve().parents[2]
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"
COMPILE_BOUND = ("degradation", "feature_maps", "small_data")
# XLA aborts on a flag it does not know: only where jaxlib is known to take it. jaxlib 0.10
# does; 0.12.1 (Python 3.12 here) has the fusion emitters only and stops at the flag.
COMPILE_BOUND_XLA_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false"
    if (xla_flags._jaxlib_version() or (0, 0))[:2] == (0, 10)
    else ""
)
EXPERIMENTS = ROOT / "experiments"
sys.path.insert(0, str(EXPERIMENTS))  # so tests can import the scripts' pure functions


def smoke_flags(compile_bound: bool) -> str:
    """The XLA flags a smoke run adds: -O0, and the older emitter where it only compiles."""
    return f"{SMOKE_XLA_FLAGS} {COMPILE_BOUND_XLA_FLAGS if compile_bound else ''}".strip()


@pytest.fixture(scope="session")
def smoke_xla_flags() -> str:
    """The XLA flags of a compile-bound smoke run, for a test that starts a child of its own
    (the notebook's kernel)."""
    return smoke_flags(compile_bound=True)


@pytest.fixture(scope="session")
def run_experiment(tmp_path_factory, digits_data_dir: Path) -> Callable[..., tuple[dict, Path]]:
    """`record, out = run_experiment("NAME", *extra)`: run it with --smoke into a fresh
    directory; returns the parsed `NAME.json` and the directory holding the page and figures.
    Its training runs' workdirs (metrics.jsonl, checkpoints) are under `out.parent / "work"`.
    Fails with the script's output if it exits non-zero."""

    def run(name: str, *extra: str, timeout: float = 300) -> tuple[dict, Path]:
        tmp_path = tmp_path_factory.mktemp(name)
        out = tmp_path / "results"
        command = [sys.executable, str(EXPERIMENTS / f"{name}.py"), "--smoke", "--out", str(out),
                   "--workdir", str(tmp_path / "work"), *extra]  # fmt: skip
        smoke = smoke_flags(compile_bound=name in COMPILE_BOUND)
        flags = f"{os.environ.get('XLA_FLAGS', '')} {smoke}".strip()
        env = {**os.environ, "TFDS_DATA_DIR": str(digits_data_dir), "XLA_FLAGS": flags}
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"{name} --smoke failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads((out / f"{name}.json").read_text()), out

    return run

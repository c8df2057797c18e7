"""XLA options flaxcnn sets before JAX starts its CPU backend, because they were measured faster.

XLA reads `XLA_FLAGS` once, when JAX first opens a backend, so `import flaxcnn` appends
these to the environment variable before that (a backend already started keeps its flags;
nothing breaks). A flag the user already put in `XLA_FLAGS` is never overridden, and
`FLAXCNN_XLA_DEFAULTS=0` (or false/no/off) turns all of them off. Only CPU options are
set: GPU and TPU runs are unchanged.

* `--xla_cpu_experimental_ynn_fusion_type=` (an empty list) turns off XLA:CPU's YNNPACK
  rewrites, which jaxlib enables by default for dots and convolutions. On a 2-core Xeon
  (Sapphire Rapids class, jaxlib 0.10.2) YNNPACK's convolutions made the backward pass of
  a 3x3 convolution (64x32x32x128 -> 128) about 2x slower than XLA's own (Eigen) kernels,
  and the ResNet-18 train step (batch 64, 32x32) ran at 21 images/s with them against 30
  without; see `python -m flaxcnn.bench --help` for measuring it on your machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from importlib import metadata

# flag -> (value, the oldest jaxlib known to accept it: XLA aborts on an unknown flag)
CPU_DEFAULTS: dict[str, tuple[str, tuple[int, int]]] = {
    "xla_cpu_experimental_ynn_fusion_type": ("", (0, 9)),
}
OPT_OUT = "FLAXCNN_XLA_DEFAULTS"

# Options for a program compiled once and run once (the initialiser of the train state),
# passed to its compile alone. XLA:CPU compiles with LLVM at -O3; the initialiser, mostly
# random-number generation, compiles faster at -O2 (resnet20: 4.6 -> 1.8 s, googlenet:
# 16.6 -> 10.2 s, vgg19_bn 13.4 -> 3.6 s on a 2-core Xeon; docs/measurements.md) into the
# same bits, which tests/training/test_state.py checks. The steps, which run thousands of
# times, keep XLA's default.
CPU_COMPILE_ONCE_OPTIONS = {"xla_backend_optimization_level": 2}


def _jaxlib_version() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def defaults_to_add(xla_flags: str, jaxlib: tuple[int, int] | None) -> list[str]:
    """The `--flag=value` entries to append to `xla_flags` (none the user already set)."""
    given = _named(xla_flags)
    return [
        f"--{name}={value}"
        for name, (value, oldest) in CPU_DEFAULTS.items()
        if name not in given and jaxlib is not None and jaxlib >= oldest
    ]


def _named(xla_flags: str) -> set[str]:
    """The names of the flags in an `XLA_FLAGS` string."""
    return {entry.lstrip("-").split("=", 1)[0] for entry in xla_flags.split()}


def _opted_out(environ: Mapping[str, str]) -> bool:
    return environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")


def compile_once_options(backend: str, environ: Mapping[str, str] = os.environ) -> dict | None:
    """`compiler_options` for a program compiled once and run once: on CPU,
    `CPU_COMPILE_ONCE_OPTIONS` less any the user's XLA_FLAGS set; none when opted out."""
    if backend != "cpu" or _opted_out(environ):
        return None
    given = _named(environ.get("XLA_FLAGS", ""))
    return {k: v for k, v in CPU_COMPILE_ONCE_OPTIONS.items() if k not in given} or None


def apply(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Append flaxcnn's defaults to `XLA_FLAGS` in `environ`; returns what was added."""
    if _opted_out(environ):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = defaults_to_add(current, _jaxlib_version())
    if added:  # appended to the user's string untouched (quoted values keep their spaces)
        environ["XLA_FLAGS"] = " ".join([current, *added]) if current.strip() else " ".join(added)
    return added

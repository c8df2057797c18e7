"""What every flaxcnn command shares: one-line errors and exit code 2 for bad input."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad arguments or input: reported as one line, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_package() -> None:
    """Stop, in one line, where `flaxcnn` was imported from a folder without __init__.py
    (a data folder named flaxcnn in the current directory, say) instead of the package.

    Python makes such a folder a namespace package wherever no regular package of the name
    is found on sys.path, and setuptools' editable install (`pip install -e .`) provides
    flaxcnn through a finder asked only after sys.path (pypa/setuptools#3557): the folder
    then wins. flaxcnn's `__init__` never runs (its XLA defaults are lost) and a subfolder
    such as `data` hides the subpackage of that name, failing later with a traceback. Run as
    this module is imported, which every command does before the rest of flaxcnn."""
    package = sys.modules.get("flaxcnn")
    if package is None or getattr(package, "__file__", None) is not None:
        return  # the package itself
    folders = " and ".join(map(str, package.__path__))
    message = (
        f"{folders} (a folder without __init__.py) hides the installed flaxcnn package, "
        "as Python imports it first: run from another directory or rename that folder"
    )
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.startswith("flaxcnn."):  # python -m flaxcnn.COMMAND
        fail(message)
    raise ImportError(message)


check_package()


def check_environment() -> None:
    """One line for an environment setting that would otherwise end in pages of output
    once JAX starts (call before it does): XLA_FLAGS holding something other than flags,
    which XLA reads as the name of a file of flags and aborts on."""
    try:  # as XLA reads them: a quoted value may hold spaces
        tokens = shlex.split(os.environ.get("XLA_FLAGS", ""))
    except ValueError:  # unbalanced quotes: left to XLA
        return
    for token in tokens:
        if not token.startswith("--"):
            fail(
                f"XLA_FLAGS holds {token!r}, which is not a --flag or --flag=value (XLA would "
                "stop, reading it as a file of flags): correct or unset XLA_FLAGS"
            )


@contextlib.contextmanager
def jax_backend_errors() -> Iterator[None]:
    """JAX failing to start the platform that JAX_PLATFORMS names (cuda without a GPU,
    a misspelling) as one line saying what to change, not a page of traceback."""
    try:
        yield
    except (RuntimeError, AssertionError) as e:
        if not _backend_broken():  # JAX's devices start: the error was something else
            raise
        platforms = os.environ.get("JAX_PLATFORMS", "")
        reason = str(e).split("(set JAX_PLATFORMS")[0].strip().rstrip(":")
        fail(
            f"JAX could not start the platform JAX_PLATFORMS={platforms!r} asks for"
            + (f" ({reason})" if reason else "")
            + ": unset JAX_PLATFORMS to use what this machine has, or name one it has (cpu)"
        )


def _backend_broken() -> bool:
    """Whether JAX cannot start its devices. (Where it failed to, it also fails where
    it starts them next, with an error of its own; JAX filters its frames from the
    traceback it shows, so the error itself does not tell.)"""
    if "jax" not in sys.modules:
        return False
    try:
        sys.modules["jax"].devices()
    except (RuntimeError, AssertionError):
        return True
    return False


def run_main(main: Callable[[], object]) -> NoReturn:
    """What `python -m flaxcnn.COMMAND` runs: `main()`, with the environment checked first
    and JAX's start-up failures reported in one line."""
    check_environment()
    with jax_backend_errors():
        sys.exit(main())

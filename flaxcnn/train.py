"""`python -m flaxcnn.train --arch resnet34`: train a classic CNN, data-parallel.

A thin command line over `flaxcnn.training.train`; every flag is a `TrainConfig` field.
`python -m flaxcnn.train --workdir W` alone resumes W with the settings in its config.json.
Exit codes: 0 done; 2 bad arguments or input (one line, nothing written); 1 training
failed (the message says what to do); 128+N stopped by signal N (after saving, if it came
while training).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _stop(signum, frame):
    """SIGTERM while no step is running: before the trainer takes the signal over (starting
    up, importing, compiling, restoring) or after it gives it back. It exits at once, as
    kill -9 would, which every file the trainer writes survives (each is replaced whole or
    appended and synced); an exception raised here could land in a garbage-collection
    callback, which ignores it."""
    with contextlib.suppress(Exception):  # in the middle of a write, say
        sys.stdout.flush()  # what was printed before comes first
    os.write(1, STOPPED_OUTSIDE_TRAINING.encode())
    os._exit(128 + signum)


STOPPED_OUTSIDE_TRAINING = (
    "stopped by SIGTERM outside the training steps (nothing lost since the last checkpoint, "
    "if any): run the same command again to continue\n"
)


if __name__ == "__main__":  # at once: the imports that follow take a second or more
    signal.signal(signal.SIGTERM, _stop)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import types  # noqa: E402
import typing  # noqa: E402

from flaxcnn import cli  # noqa: E402
from flaxcnn.models import parsing  # noqa: E402
from flaxcnn.training.config import TrainConfig, flag  # noqa: E402


def _type_of(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return typing.get_origin(hint) or hint


def build_parser() -> argparse.ArgumentParser:
    # Flags not given stay out of the namespace: a resumed run takes them from its
    # config.json, and only the given ones are checked against it.
    parser = cli.ArgumentParser(
        argument_default=argparse.SUPPRESS,
        prog="python -m flaxcnn.train",
        description="Train a classic CNN with optax, jit-compiled and data-parallel over every "
        "device. Writes config.json, metrics.jsonl, TensorBoard events and checkpoints to "
        "--workdir; the last line printed is the test accuracy.",
    )
    for field in dataclasses.fields(TrainConfig):
        kind = _type_of(field)
        options = {k: v for k, v in field.metadata.items() if k not in ("help", "flag")}
        name = f"--{field.metadata.get('flag', flag(field.name))}"
        help_text = field.metadata["help"]
        if "(default" not in help_text and field.default is not None:  # said once only
            shown = field.default
            if isinstance(shown, bool):
                shown = "yes" if shown else "no"
            help_text += f" (default: {shown})"
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is dict:
            parser.add_argument(name, dest=field.name, action="append", help=help_text, **options)
        else:
            parser.add_argument(name, type=kind, help=help_text, **options)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:  # the trainer handles SIGTERM while it steps, and saves; this, the rest of the time
        previous = signal.signal(signal.SIGTERM, _stop)
    except ValueError:  # not the main thread
        previous = None
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> None:
    given = vars(build_parser().parse_args(argv))
    try:
        if "model_options" in given:
            given["model_options"] = parsing.parse_assignments(given["model_options"]) or None
    except ValueError as e:
        cli.fail(str(e))
    config = TrainConfig(**given)
    # absl warnings (orbax's notes on saves without metrics) would interleave with the
    # output; errors still show.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Imported after parsing so that --help and argument errors are instant.
    import jax

    from flaxcnn.training import Interrupted, TrainingError, train

    try:
        train(config, explicit=set(given))
    except cli.UsageError as e:
        cli.fail(str(e))
    except TrainingError as e:
        cli.fail(str(e), code=1)
    except Interrupted as e:
        if jax.process_index() == 0:
            print(e, flush=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        cli.fail("interrupted", code=130)


if __name__ == "__main__":
    cli.run_main(main)

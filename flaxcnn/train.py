"""`python -m flaxcnn.train --arch resnet34`: train a classic CNN, data-parallel.

A thin command line over `flaxcnn.training.train`; every flag is a `TrainConfig` field.
Exit codes: 0 done; 2 bad arguments or input (one line, nothing written); 1 training
failed (the message says what to do); 128+N stopped by signal N after saving.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

from flaxcnn import cli
from flaxcnn.training.config import TrainConfig, flag


def _type_of(field: dataclasses.Field) -> type:
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.train",
        description="Train a classic CNN with optax, jit-compiled and data-parallel over every "
        "device. Writes config.json, metrics.jsonl, TensorBoard events and checkpoints to "
        "--workdir; the last line printed is the test accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(TrainConfig):
        kind = _type_of(field)
        options = {k: v for k, v in field.metadata.items() if k != "help"}
        name = f"--{flag(field.name)}"
        if kind is bool:
            parser.add_argument(
                name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=field.metadata["help"],
            )
        else:
            parser.add_argument(
                name,
                type=kind,
                default=field.default,
                required=field.name == "arch",
                help=field.metadata["help"],
                **options,
            )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    # absl warnings (orbax's notes on saves without metrics, tfds's hint to install
    # OpenCV) would interleave with the progress; errors still show.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Imported after parsing so that --help and argument errors are instant.
    from flaxcnn.training import TrainingError, train

    try:
        train(config)
    except cli.UsageError as e:
        cli.fail(str(e))
    except TrainingError as e:
        cli.fail(str(e), code=1)
    except KeyboardInterrupt:
        cli.fail("interrupted", code=130)


if __name__ == "__main__":
    sys.exit(main())

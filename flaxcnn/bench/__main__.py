"""`python -m flaxcnn.bench`: runs `flaxcnn.bench.command.main`."""

from __future__ import annotations

from flaxcnn import cli
from flaxcnn.bench.command import main

if __name__ == "__main__":
    cli.run_main(main)

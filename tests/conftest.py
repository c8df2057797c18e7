"""Test-wide setup: four fake CPU devices, so multi-device code runs on any laptop."""

import json
import pathlib

import chex
import pytest

chex.set_n_cpu_devices(4)

REFERENCE = pathlib.Path(__file__).parent / "reference" / "torchvision.json"


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> pathlib.Path:
    """A data directory in which the digits were prepared once for the whole session."""
    from flaxcnn import data  # the data layer loads tfds: only for the tests that ask

    path = tmp_path_factory.mktemp("tfds")
    data.load("digits", data_dir=path)
    return path


@pytest.fixture(scope="session")
def reference() -> dict:
    """Published figures (torchvision 0.29, He et al. 2016), copied from shared/reference."""
    return json.loads(REFERENCE.read_text())

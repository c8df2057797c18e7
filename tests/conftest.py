"""Test-wide setup: four fake CPU devices, so multi-device code runs on any laptop."""

import json
import pathlib

import chex
import pytest

chex.set_n_cpu_devices(4)

REFERENCE = pathlib.Path(__file__).parent / "reference" / "torchvision.json"


@pytest.fixture(scope="session")
def reference() -> dict:
    """Published figures (torchvision 0.29, He et al. 2016), copied from shared/reference."""
    return json.loads(REFERENCE.read_text())

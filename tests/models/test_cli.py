"""`python -m flaxcnn.models`: the listing, the per-layer summary, and its errors."""

import subprocess
import sys

import pytest

from flaxcnn import models
from flaxcnn.models import __main__ as cli


def test_list_shows_every_model_with_its_parameters(capsys):
    cli.main([])
    out = capsys.readouterr().out
    for name in models.names():
        assert f"\n{name} " in out
    assert "61,706" in out  # lenet5
    assert "138,357,544" in out  # vgg16


def test_summary_rows_add_up(capsys):
    cli.main(["--summary", "lenet5"])
    out = capsys.readouterr().out
    assert "c1/conv" in out and "28x28x6" in out and "5x5x16" not in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert "61,706" in total and "416,520" in total


def test_summary_options(capsys):
    cli.main(["--summary", "vgg11_bn", "--image-size", "32", "--num-classes", "10", "--depth", "1"])
    out = capsys.readouterr().out
    assert out.startswith("vgg11_bn on 32x32x3, 10 classes")
    assert "classifier" in out and "conv8" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--summary", "resnet"], "unknown architecture 'resnet'"),
        (["--summary", "alexnet", "--image-size", "40"], "at least 63"),
        (["--summary", "vgg11", "--image-size", "0"], "must be positive"),
        (["--image-size", "32"], "need --summary"),
        (["--summary", "vgg11", "--image-size", "big"], "invalid int value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message):
    proc = subprocess.run(
        [sys.executable, "-m", "flaxcnn.models", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr

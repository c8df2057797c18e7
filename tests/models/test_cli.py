"""`python -m flaxcnn.models`: the listing, the per-layer summary, and its errors."""

import subprocess
import sys

import pytest

from flaxcnn import models
from flaxcnn.models import __main__ as cli
from flaxcnn.models import summary


def test_list_shows_every_model_with_its_parameters_and_builds_none(capsys, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the listing built a network")

    monkeypatch.setattr(models, "create", build)
    monkeypatch.setattr(summary, "init_shapes", build)
    cli.main([])
    out = capsys.readouterr().out
    for name in models.names():
        assert f"\n{name} " in out
    assert "61,706" in out  # lenet5
    assert "138,357,544" in out  # vgg16
    assert set(cli.DESIGN_PARAMS) == set(models.names())


@pytest.mark.slow  # counts every network's parameters at its design size
def test_the_listed_parameters_are_those_of_the_networks():
    for name in models.names():
        spec = models.get_spec(name)
        shape = (1, spec.input_size, spec.input_size, spec.in_channels)
        assert cli.DESIGN_PARAMS[name] == summary.count_params(models.create(name), shape), name


def test_summary_shows_every_layer_of_lenet5(capsys):
    """LeNet-5's seven layers, the two subsamplings included, with shapes and counts
    worked out by hand: a 5x5 conv has 25*c_in*c_out + c_out parameters and costs
    h_out*w_out*c_out*25*c_in multiply-adds; a dense layer n_in*n_out + n_out and n_in*n_out."""
    cli.main(["--summary", "lenet5"])
    lines = capsys.readouterr().out.splitlines()
    rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    rows = [line.split() for line in lines[rules[0] + 1 : rules[1]]]
    assert rows == [
        ["c1/conv", "Conv", "28x28x6", "156", "117,600"],  # C1: 25*6+6; 28*28*6*25
        ["MaxPool_0", "MaxPool", "14x14x6", "0", "0"],  # S2
        ["c3/conv", "Conv", "10x10x16", "2,416", "240,000"],  # C3: 25*6*16+16; 10*10*16*25*6
        ["MaxPool_1", "MaxPool", "5x5x16", "0", "0"],  # S4
        ["f5", "Dense", "120", "48,120", "48,000"],  # F5: 400*120+120; 400*120
        ["f6", "Dense", "84", "10,164", "10,080"],  # F6: 120*84+84; 120*84
        ["output", "Dense", "10", "850", "840"],  # 84*10+10; 84*10
    ]
    assert lines[rules[1] + 1].split() == ["total", "61,706", "416,520"]
    assert lines[-1] == "multiply-adds per image: 416.5 thousand"


@pytest.mark.parametrize(
    "count, words",
    [(840, "840"), (1_000, "1 thousand"), (999_960, "1 million"), (40_810_000, "40.81 million"),
     (1_814_073_344, "1.814 billion"), (15_470_000_000, "15.47 billion")],
)  # fmt: skip
def test_multiply_adds_are_shown_in_the_unit_their_size_calls_for(count, words):
    assert summary.in_words(count) == words


def test_summary_options(capsys):
    cli.main(["--summary", "vgg11_bn", "--image-size", "32", "--num-classes", "10", "--depth", "1"])
    out = capsys.readouterr().out
    assert out.startswith("vgg11_bn on 32x32x3, 10 classes")
    assert "classifier" in out and "conv8" in out


@pytest.mark.parametrize(
    "size, params, small",
    [("8", "21,282,122", True), ("224", "21,289,802", False)],  # 3x3 stem / 7x7 stem
)
def test_summary_builds_what_training_builds(capsys, size, params, small):
    cli.main(["--summary", "resnet34", "--image-size", size, "--num-classes", "10"])
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert params in total
    assert ("small-input stem: small_stem=True" in out) == small


def test_resolve_input_picks_the_small_stem_for_small_images():
    resnet, lenet, vgg = (models.get_spec(n) for n in ("resnet18", "lenet5", "vgg11"))
    assert models.resolve_input(resnet, 28, None) == (28, {"small_stem": True})
    assert models.resolve_input(resnet, 28, models.SMALL_INPUT_MAX + 1) == (65, {})
    assert models.resolve_input(resnet, 224, None) == (224, {})
    assert models.resolve_input(lenet, 8, None) == (32, {})  # its design size
    assert models.resolve_input(vgg, 8, None) == (32, {})  # the smallest it accepts
    assert models.resolve_input(vgg, 8, 40) == (40, {})


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
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    if message == "at least 63":  # in a process of its own: the path that builds a network
        proc = subprocess.run(
            [sys.executable, "-m", "flaxcnn.models", *argv], capture_output=True, text=True
        )
        code, stderr = proc.returncode, proc.stderr
    else:  # the same `main` in this process
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        code, stderr = exit_.value.code, capsys.readouterr().err
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr


def test_options_are_listed_with_defaults_and_accepted_values(capsys):
    cli.main(["--options", "lenet5"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "options of lenet5 (--model-option KEY=VALUE):"
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out[2:]}
    assert rows == {
        "activation": ["relu", "relu | tanh"],
        "c1_padding": ["0", "int"],
        "pooling": ["max", "max | avg"],
    }


def test_summary_takes_model_options_as_training_does(capsys):
    cli.main(["--summary", "lenet5", "--model-option", "c1_padding=2", "--image-size", "28"])
    out = capsys.readouterr().out
    assert "options: c1_padding=2" in out and "28x28x6" in out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--summary", "lenet5", "--model-option", "padding=2"])
    assert exit_.value.code == 2
    assert "its options are: activation, c1_padding, pooling" in capsys.readouterr().err

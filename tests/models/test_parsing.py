"""Model options given as text are typed by the module's own fields, or refused in one line."""

import pytest

from flaxcnn import models
from flaxcnn.models.parsing import parse_options, user_options


@pytest.mark.parametrize(
    "arch, raw, expected",
    [
        (
            "googlenet",
            {"aux_logits": "true", "paper_5x5": "1"},
            {"aux_logits": True, "paper_5x5": True},
        ),
        (
            "lenet5",
            {"activation": "tanh", "pooling": "avg"},
            {"activation": "tanh", "pooling": "avg"},
        ),
        ("lenet5", {"c1_padding": "2"}, {"c1_padding": 2}),
        (
            "resnet18",
            {"shortcut": "A", "scan_blocks": "no"},
            {"shortcut": "A", "scan_blocks": False},
        ),
        (
            "simple_cnn",
            {"features": "8, 16", "hidden": "32"},
            {"features": (8, 16), "hidden": (32,)},
        ),
        ("alexnet", {"dropout_rate": "0.25"}, {"dropout_rate": 0.25}),
        # Typed values (from Python) pass through the same checks.
        (
            "resnet20",
            {"scan_blocks": True, "num_filters": 8},
            {"scan_blocks": True, "num_filters": 8},
        ),
    ],
)
def test_values_are_typed_by_the_modules_fields(arch, raw, expected):
    options = parse_options(arch, raw)
    assert options == expected
    assert all(type(options[k]) is type(v) for k, v in expected.items())
    models.create(arch, num_classes=10, **options)  # the module accepts them


@pytest.mark.parametrize(
    "arch, raw, message",
    [
        (
            "lenet5",
            {"activation": "sigmoid"},
            "lenet5 option activation='sigmoid': expected one of relu, tanh",
        ),
        (
            "lenet5",
            {"act": "tanh"},
            "lenet5 has no option 'act'; its options are: activation, c1_padding, pooling",
        ),
        ("resnet20", {"num_filters": "many"}, "expected an integer"),
        ("resnet20", {"num_filters": True}, "expected an integer"),
        ("googlenet", {"aux_logits": "maybe"}, "expected true or false"),
        ("alexnet", {"dropout_rate": "half"}, "expected a number"),
        ("plain20", {"shortcut": "A"}, "plain20 has no option 'shortcut'"),
        # What the trainer sets itself is not an option.
        ("resnet20", {"num_classes": "3"}, "has no option 'num_classes'"),
        ("resnet20", {"dtype": "bfloat16"}, "has no option 'dtype'"),
    ],
)
def test_bad_options_are_refused_in_one_line(arch, raw, message):
    with pytest.raises(ValueError) as error:
        parse_options(arch, raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_every_architectures_options_can_be_listed_and_parsed_from_their_defaults():
    for arch in models.names():
        defaults = models.options(arch)
        text = {
            k: ",".join(map(str, v)) if isinstance(v, tuple) else str(defaults[k])
            for k, v in defaults.items()
            if k in user_options(arch) and v is not None
        }
        assert parse_options(arch, text) == {k: defaults[k] for k in text}, arch

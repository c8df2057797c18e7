"""`python -m flaxcnn.models`: list the architectures, or summarise one layer by layer.

python -m flaxcnn.models
python -m flaxcnn.models --summary resnet50 --image-size 224 --num-classes 1000
python -m flaxcnn.models --options googlenet
"""

from __future__ import annotations

from flaxcnn import cli, models
from flaxcnn.models import parsing, summary

# Trainable parameters of each network at its design point (input size, classes), as
# `summary.count_params` counts them: tracing every network's init to list them took 11-21 s
# on a 2-core machine. tests/models/test_cli.py checks each figure and that none is missing.
DESIGN_PARAMS = {
    "alexnet": 61_100_840,
    "googlenet": 6_624_904,
    "lenet5": 61_706,
    "netresdeep": 159_594,
    "plain20": 269_722,
    "plain32": 464_154,
    "plain44": 658_586,
    "plain56": 853_018,
    "plain110": 1_727_962,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "simple_cnn": 89_834,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
}


def design_params(name: str) -> int:
    """Trainable parameters of `name` at its design point: the figure above, or counted
    (abstractly, in seconds) for a network registered outside flaxcnn."""
    if name in DESIGN_PARAMS:
        return DESIGN_PARAMS[name]
    spec = models.get_spec(name)
    shape = (1, spec.input_size, spec.input_size, spec.in_channels)
    return summary.count_params(models.create(name), shape)


def list_models() -> str:
    """One line per architecture: name, parameters, design input, description. Builds no
    network, so that it takes no longer than importing JAX and Flax."""
    rows = [("name", "params", "input", "description")]
    for name in models.names():
        spec = models.get_spec(name)
        params = design_params(name)
        size = f"{spec.input_size}x{spec.input_size}x{spec.in_channels}"
        rows.append((name, f"{params:,}", size, spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].ljust(widths[2])}  {r[3]}"
        for r in rows
    )


def list_options(name: str) -> str:
    """The options `--model-option KEY=VALUE` (and `models.create`) accept for `name`."""
    rows = [("option", "default", "accepts"), *parsing.describe(name)]
    if len(rows) == 1:
        return f"{name} has no options"
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in rows]
    return f"options of {name} (--model-option KEY=VALUE):\n" + "\n".join(lines)


def summarise(
    name: str,
    image_size: int | None,
    num_classes: int | None,
    depth: int | None,
    given: dict | None = None,
):
    """The per-layer table of the network training would build at `image_size`.

    Small sizes get the small-input stem, as in the trainer (`models.resolve_input`), so that
    the parameter count shown is the one a run at that --image-size has.
    """
    spec = models.get_spec(name)
    size, options = models.resolve_input(spec, spec.input_size, image_size)
    if not options and size < spec.min_size:
        raise cli.UsageError(f"{name} needs --image-size of at least {spec.min_size}, got {size}")
    options = {**options, **parsing.parse_options(name, given or {})}
    model = models.create(name, num_classes=num_classes, **options)
    shape = (1, size, size, spec.in_channels)
    rows = summary.layer_table(model, shape, depth=depth)
    total = summary.count_params(model, shape)
    classes = num_classes or spec.num_classes
    title = f"{name} on {size}x{size}x{spec.in_channels}, {classes} classes (eval mode)"
    if options.get("small_stem"):
        title += (
            "\nsmall-input stem: small_stem=True (what training uses for inputs of at most "
            f"{models.SMALL_INPUT_MAX} pixels a side)"
        )
    others = {k: v for k, v in options.items() if k != "small_stem"}
    if others:
        title += "\noptions: " + ", ".join(f"{k}={v}" for k, v in others.items())
    return f"{title}\n{summary.format_table(rows, total_params=total)}"


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m flaxcnn.models",
        description="List the registered architectures with their parameter counts, "
        "or print one architecture's per-layer table (output shape, parameters, "
        "multiply-adds per image).",
    )
    parser.add_argument("--summary", metavar="ARCH", help="architecture to summarise")
    parser.add_argument(
        "--options", metavar="ARCH", help="list the options of an architecture (--model-option)"
    )
    parser.add_argument(
        "--model-option",
        action="append",
        metavar="KEY=VALUE",
        help="with --summary: an option of the architecture, as in training (repeatable)",
    )
    parser.add_argument(
        "--image-size", type=int, help="square input side (default: the design size)"
    )
    parser.add_argument("--num-classes", type=int, help="classes (default: the design's)")
    parser.add_argument(
        "--depth", type=int, help="module depth of the rows (default: every innermost layer)"
    )
    args = parser.parse_args(argv)
    for flag in ("image_size", "num_classes", "depth"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.summary is None:
        summary_flags = ("image_size", "num_classes", "depth", "model_option")
        if any(getattr(args, f) is not None for f in summary_flags):
            parser.error(
                "--image-size, --num-classes, --depth and --model-option need --summary ARCH"
            )
        try:
            print(list_options(args.options) if args.options else list_models())
        except ValueError as e:
            cli.fail(str(e))
        return
    try:
        given = parsing.parse_assignments(args.model_option)
        print(summarise(args.summary, args.image_size, args.num_classes, args.depth, given))
    except ValueError as e:
        cli.fail(str(e))


if __name__ == "__main__":
    cli.run_main(main)

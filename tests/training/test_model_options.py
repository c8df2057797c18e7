"""Every model option can be trained: `--model-option KEY=VALUE` / `TrainConfig.model_options`.

In-process runs on the prepared digits: GoogLeNet with its auxiliary classifiers (which
must receive gradients, i.e. their losses are in the objective, and must not be used in
evaluation), the paper's LeNet-5 (tanh, average pooling), a scanned ResNet; and the checks
on resume and --init-from.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from flaxcnn import evaluate
from flaxcnn.training import TrainConfig, UsageError, train
from flaxcnn.training.rundir import RunDir


def config(digits_data_dir, tmp_path, name, **settings) -> TrainConfig:
    return TrainConfig(
        data_dir=str(digits_data_dir), workdir=str(tmp_path / name), progress=False, **settings
    )


def quiet(line: str) -> None:
    pass


def test_googlenet_aux_logits_train_with_their_losses_and_evaluate_without(
    digits_data_dir, tmp_path
):
    cfg = config(
        digits_data_dir, tmp_path, "g", arch="googlenet", epochs=1, batch_size=64,
        model_options={"aux_logits": "true"}, seed=1, precise_bn=0, weight_decay=0,
    )  # fmt: skip
    lines: list[str] = []
    test = train(cfg, out=lines.append)
    assert any("options      aux_logits=True" in line for line in lines)
    saved = json.loads((tmp_path / "g" / "config.json").read_text())
    assert saved["model_options"] == {"aux_logits": True}

    # The auxiliary heads only get gradients through the auxiliary losses. Without weight
    # decay, SGD's momentum is a running sum of the gradients: it is zero for a parameter
    # that no loss reaches, and must not be for any parameter of either head.
    step, meta, trained = RunDir(tmp_path / "g").restore_variables()
    assert meta["model_options"] == {"aux_logits": True}
    assert {"aux1", "aux2"} <= set(trained["params"])
    momentum = largest_momentum(tmp_path / "g", step)
    assert set(momentum) == set(flat(trained["params"]))
    for head in ("aux1", "aux2", "fc"):
        of_head = {name: size for name, size in momentum.items() if name.startswith(f"{head}/")}
        assert of_head and min(of_head.values()) > 0, (head, of_head)

    # Evaluation uses the main classifier alone, in the trainer and in flaxcnn.evaluate.
    result = evaluate.evaluate_workdir(tmp_path / "g", step=step)
    assert result["top1"] == pytest.approx(test["accuracy"])


def flat(tree: dict) -> list[str]:
    """The leaves' paths, "layer/.../kernel"."""
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    return ["/".join(str(k.key) for k in path) for path in paths]


def largest_momentum(workdir, step: int) -> dict[str, float]:
    """Largest |momentum| of each parameter ("layer/.../kernel") in the checkpoint at
    `step`, read from the saved optimizer state (SGD's trace mirrors the parameters)."""
    ckpts = RunDir(workdir).checkpoints()
    try:
        opt_state = ckpts.manager.restore(step)["state"]["opt_state"]
    finally:
        ckpts.close()
    largest: dict[str, float] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if "trace" in keys:
            largest["/".join(keys[keys.index("trace") + 1 :])] = float(np.max(np.abs(value)))
    assert largest, "no momentum in the saved optimizer state"
    return largest


def test_lenet5_paper_variant_reaches_97_percent_on_digits(digits_data_dir, tmp_path):
    cfg = config(
        digits_data_dir, tmp_path, "l", arch="lenet5",
        model_options={"activation": "tanh", "pooling": "avg"},
    )  # fmt: skip
    test = train(cfg, out=quiet)
    assert test["accuracy"] >= 0.97, test
    saved = json.loads((tmp_path / "l" / "config.json").read_text())
    assert saved["model_options"] == {"activation": "tanh", "pooling": "avg"}


def test_scanned_resnet_trains(digits_data_dir, tmp_path):
    cfg = config(
        digits_data_dir, tmp_path, "s", arch="resnet20", image_size=8, epochs=3,
        model_options={"scan_blocks": True},
    )  # fmt: skip
    test = train(cfg, out=quiet)
    assert test["accuracy"] > 0.5, test
    _, _, variables = RunDir(tmp_path / "s").restore_variables()
    assert "layer1_rest" in variables["params"], list(variables["params"])


def test_bad_option_is_refused_before_anything_is_written(digits_data_dir, tmp_path):
    bad = config(digits_data_dir, tmp_path, "bad", arch="lenet5", model_options={"act": "tanh"})
    with pytest.raises(UsageError, match="its options are: activation, c1_padding, pooling"):
        train(bad, out=quiet)
    assert not (tmp_path / "bad").exists()


def test_options_are_checked_on_resume_and_on_init_from(digits_data_dir, tmp_path):
    first = config(
        digits_data_dir, tmp_path, "run", arch="lenet5", epochs=1,
        model_options={"activation": "tanh"},
    )  # fmt: skip
    train(first, out=quiet)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))

    other = config(
        digits_data_dir, tmp_path, "run", arch="lenet5", epochs=2,
        model_options={"activation": "relu"},
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"activation=relu contradicts the run .* activation=tanh"):
        train(other, out=quiet)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    # Resumed without options, the run keeps its own.
    train(config(digits_data_dir, tmp_path, "run", arch="lenet5", epochs=2), out=quiet)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model_options"] == {"activation": "tanh"} and saved["epochs"] == 2

    warm = config(
        digits_data_dir, tmp_path, "warm", arch="lenet5", epochs=1,
        init_from=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(UsageError, match="activation=tanh, this run has activation=relu"):
        train(warm, out=quiet)
    assert not (tmp_path / "warm").exists()
    # With the same options it starts from those weights.
    matched = TrainConfig(**{**warm.__dict__, "model_options": {"activation": "tanh"}})
    train(matched, out=quiet)


def test_model_option_flag_on_the_command_line(digits_data_dir, tmp_path, capsys, monkeypatch):
    from flaxcnn import train as cli

    monkeypatch.setenv("TFDS_DATA_DIR", str(digits_data_dir))
    for argv, message in [
        (["--model-option", "activation"], "--model-option takes KEY=VALUE, got 'activation'"),
        (["--model-option", "pooling=sum"], "pooling='sum': expected one of max, avg"),
        (["--model-option", "a=1", "--model-option", "a=2"], "--model-option a is given twice"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--arch", "lenet5", "--workdir", str(tmp_path / "w"), *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "w").exists()

    cli.main(
        ["--arch", "lenet5", "--epochs", "1", "--workdir", str(tmp_path / "ok"), "--no-progress",
         "--model-option", "pooling=avg", "--model-option", "c1_padding=0"]
    )  # fmt: skip
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["model_options"] == {"pooling": "avg", "c1_padding": 0}

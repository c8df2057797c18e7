"""Every model option can be trained: `--model-option KEY=VALUE` / `TrainConfig.model_options`.

The train step's auxiliary losses (GoogLeNet's heads must receive gradients, i.e. their
losses are in the objective, and must not be used in evaluation); in-process runs on the
prepared digits: the paper's LeNet-5 (tanh, average pooling), a scanned ResNet; and the checks
on resume and --init-from.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from flaxcnn.training import TrainConfig, UsageError, parallel, train
from flaxcnn.training.rundir import RunDir
from flaxcnn.training.state import create_state


def config(digits_data_dir, tmp_path, name, **settings) -> TrainConfig:
    return TrainConfig(
        data_dir=str(digits_data_dir), workdir=str(tmp_path / name), progress=False, **settings
    )


def quiet(line: str) -> None:
    pass


class WithAuxHeads(nn.Module):
    """GoogLeNet's interface in miniature: (logits, (aux1, aux2)) in training, logits alone
    in inference (tests/models/test_inception.py checks GoogLeNet itself keeps it)."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        logits = nn.Dense(10, name="fc")(x)
        heads = (nn.Dense(10, name="aux1")(x), nn.Dense(10, name="aux2")(x * x))
        return (logits, heads) if train or self.is_initializing() else logits


def test_the_train_step_adds_the_auxiliary_losses_and_evaluation_ignores_the_heads():
    """One step of the trainer's own train step (pmap over the session's four devices).
    Its loss is the logits' cross-entropy plus 0.3 times each head's (computed here with
    optax), and with SGD without weight decay the momentum after one step is the gradient:
    non-zero somewhere in every parameter of both heads. Evaluation scores the main
    classifier alone: heads replaced by noise change nothing."""
    model = WithAuxHeads()
    state = create_state(model, optax.sgd(0.1, momentum=0.9), (1, 4, 4, 1), seed=0)
    par = parallel.make("pmap")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 4, 4, 1)).astype(np.float32)
    batch = {"image": images, "label": np.arange(8, dtype=np.int32)}
    stepped, sums = par.train_step(par.put_state(state), par.put_batch(batch))

    logits, heads = model.apply({"params": state.params}, images, train=True)
    ce = lambda z: float(optax.softmax_cross_entropy_with_integer_labels(z, batch["label"]).sum())
    expected = ce(logits) + 0.3 * (ce(heads[0]) + ce(heads[1]))
    assert par.get_metrics(sums)["loss"] == pytest.approx(expected, rel=1e-5)
    momentum = par.get_state(stepped.opt_state)[0].trace
    largest = {name: float(np.max(np.abs(value))) for name, value in named(momentum).items()}
    assert set(largest) == set(named(state.params))
    for head in ("aux1", "aux2", "fc"):
        of_head = {name: size for name, size in largest.items() if name.startswith(f"{head}/")}
        assert of_head and min(of_head.values()) > 0, (head, of_head)

    def evaluate(state) -> dict[str, float]:
        masked = par.put_batch({**batch, "mask": np.ones(8, bool)})
        return par.get_metrics(par.eval_step(par.put_state(state), masked))

    noise = {
        head: jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), state.params[head])
        for head in ("aux1", "aux2")
    }
    scored = evaluate(state)
    assert np.isfinite(scored["loss"]) and scored["count"] == 8
    assert evaluate(state.replace(params={**state.params, **noise})) == scored


def named(tree: dict) -> dict[str, np.ndarray]:
    """The leaves by path, "layer/.../kernel"."""
    return {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.slow
def test_lenet5_paper_variant_reaches_97_percent_on_digits(digits_data_dir, tmp_path):
    """A claim about training, so the trainer's whole default schedule (30 epochs; on a
    2-core Xeon 8 epochs reached 0.942 and 12 reached 0.964). Evaluated and saved at the
    end only: neither changes what is trained, and 29 of each would take a third of the
    test's time."""
    cfg = config(
        digits_data_dir, tmp_path, "l", arch="lenet5",
        model_options={"activation": "tanh", "pooling": "avg"}, eval_every=30,
        checkpoint_every=30 * 20,  # 20 steps an epoch: the default batch of 64
    )  # fmt: skip
    test = train(cfg, out=quiet)
    assert test["accuracy"] >= 0.97, test
    saved = json.loads((tmp_path / "l" / "config.json").read_text())
    assert saved["model_options"] == {"activation": "tanh", "pooling": "avg"}


@pytest.mark.slow
def test_scanned_resnet_trains(digits_data_dir, tmp_path):
    cfg = config(
        digits_data_dir, tmp_path, "s", arch="resnet20", image_size=8, epochs=1, batch_size=32,
        model_options={"scan_blocks": True},
    )  # fmt: skip
    test = train(cfg, out=quiet)  # 40 steps
    assert test["accuracy"] > 0.5, test
    _, _, variables = RunDir(tmp_path / "s").restore_variables()
    assert "layer1_rest" in variables["params"], list(variables["params"])


def test_bad_option_is_refused_before_anything_is_written(digits_data_dir, tmp_path):
    bad = config(digits_data_dir, tmp_path, "bad", arch="lenet5", model_options={"act": "tanh"})
    with pytest.raises(UsageError, match="its options are: activation, c1_padding, pooling"):
        train(bad, out=quiet)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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

"""flaxcnn's XLA defaults: appended before JAX starts, never over a user's own flag."""

import os
import subprocess
import sys

import pytest

from flaxcnn import xla_flags

YNN = "--xla_cpu_experimental_ynn_fusion_type="
JAXLIB = xla_flags._jaxlib_version()
KNOWS_YNN = JAXLIB is not None and JAXLIB >= (0, 9)


@pytest.mark.skipif(
    not KNOWS_YNN,
    reason=f"jaxlib {JAXLIB} has no YNNPACK options, so there is nothing to append "
    "(test_jaxlib_that_does_not_know_the_flag_gets_none covers that case)",
)
def test_appended_to_existing_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    added = xla_flags.apply(env)
    assert added == [YNN]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {YNN}"


def test_user_flag_wins_and_nothing_is_repeated():
    assert xla_flags.defaults_to_add(f"{YNN}individual_dot", (0, 10)) == []
    assert xla_flags.defaults_to_add(f"--{YNN[2:]}", (0, 10)) == []
    assert xla_flags.defaults_to_add("", (0, 10)) == [YNN]


def test_jaxlib_that_does_not_know_the_flag_gets_none():
    """XLA aborts the process on an unknown flag; jaxlib 0.8 has no YNNPACK options."""
    assert xla_flags.defaults_to_add("", (0, 8)) == []
    assert xla_flags.defaults_to_add("", None) == []


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_opt_out(value):
    env = {xla_flags.OPT_OUT: value, "XLA_FLAGS": "--foo=1"}
    assert xla_flags.apply(env) == []
    assert env["XLA_FLAGS"] == "--foo=1"


def test_the_users_string_is_kept_as_written():
    env = {"XLA_FLAGS": '--xla_dump_to="/tmp/a  b"'}
    added = xla_flags.apply(env)
    assert env["XLA_FLAGS"] == " ".join(['--xla_dump_to="/tmp/a  b"', *added])


def test_import_sets_them_before_jax_starts_and_jax_runs():
    """In a fresh process: `import flaxcnn` first, then a convolution's gradient compiles."""
    code = (
        "import os, flaxcnn, jax, jax.numpy as jnp\n"
        "from jax import lax\n"
        "f = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME').sum()\n"
        "g = jax.grad(f, argnums=1)(jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3)))\n"
        "print(os.environ['XLA_FLAGS'], float(g.sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    expected = [YNN] if KNOWS_YNN else []
    assert out[:-1] == expected
    assert float(out[-1]) > 0

"""How functions are compiled on CPU and how many devices the CPU becomes (mark_jax.xla)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mark_jax import xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_dots_are_compiled_by_xla_not_handed_to_ynnpack():
  def layer(x, w):
    return jnp.tanh(x @ w)

  x, w = jnp.linspace(-1, 1, 64 * 32).reshape(64, 32), jnp.ones((32, 16)) / 32
  default = jax.jit(layer).lower(x, w).compile()
  ours = xla.jit(layer).lower(x, w).compile()
  assert "__ynn_fusion" in default.as_text()  # what the option turns off
  assert "__ynn_fusion" not in ours.as_text()
  np.testing.assert_allclose(ours(x, w), default(x, w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  "user_env, devices",
  [
    ({}, 2),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
    ({"JAX_NUM_CPU_DEVICES": "4"}, 4),
  ],
)
def test_cpu_devices_unless_the_user_chose_a_count(user_env, devices):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(user_env, JAX_PLATFORMS="cpu")
  code = "from mark_jax import xla; xla.set_cpu_devices(2); import jax; print(jax.device_count())"
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert int(result.stdout.split()[-1]) == devices

"""How many devices the host CPU becomes (mark_jax.xla)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

"""How many devices XLA makes of a host CPU.

Two XLA host devices instead of one ran a metalearning round faster on our 2-core CPU
(docs/performance.md): the mesh then runs half of the mini-tasks (and half of each
batch) on each. Results move by float rounding only.
"""

import os

import jax


def set_cpu_devices(count: int) -> None:
  """Makes XLA split the host CPU into `count` devices, before JAX starts its backends.

  Only the CPU backend is affected: GPUs and TPUs stay what they are. A device count the
  user already gave (XLA_FLAGS=--xla_force_host_platform_device_count, or
  JAX_NUM_CPU_DEVICES) wins; 0 leaves JAX's default of one device.

  Args:
    count: number of CPU devices, or 0.
  """
  user_set = (
    "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    or jax.config.jax_num_cpu_devices >= 0
  )
  if count > 0 and not user_set:
    jax.config.update("jax_num_cpu_devices", count)

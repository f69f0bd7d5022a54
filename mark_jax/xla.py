"""How MARK's functions are compiled and how many devices XLA makes of a CPU.

On the 2-core CPU of our measurements (README, "Speed"), two things made the training
steps faster without changing the math (results move by float rounding only):

- XLA's own (Eigen) matmul kernels instead of the YNNPACK library calls that XLA:CPU uses
  for dots by default: a metalearning round about 14% faster, the masks phase 15%.
- two XLA host devices instead of one: the mesh then runs half of the mini-tasks (and half
  of each batch) on each, about 10% faster per metalearning round.
"""

import os

import jax

_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def jit(fun, **kwargs):
  """jax.jit with the compiler options of the default backend (XLA's dot kernels on CPU).

  Args:
    fun: the function to compile.
    **kwargs: jax.jit's other arguments (donate_argnums, static_argnums).

  Returns:
    The jitted function.
  """
  options = _CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fun, compiler_options=options, **kwargs)


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

"""Spreading MARK over devices with jax.sharding (no pmap).

The mesh has two axes. 'mini_tasks' splits the K mini-tasks of a metalearning round;
'batch' splits the examples of a batch. A phase's batches are split over both axes (plain
data parallelism); a metalearning round puts whole mini-tasks on 'mini_tasks' and splits
each mini-task's batch over 'batch'. Parameters and the task's data are replicated. XLA
inserts the gradient all-reduces; the numbers equal a one-device run up to float rounding.

On CPU, `set_cpu_devices` makes XLA split the host into several devices: two ran a
metalearning round faster than one on our 2-core CPU (docs/performance.md), the mesh then
running half of the mini-tasks (and half of each batch) on each.
"""

import math
import os
import resource

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(mini_tasks: int, batch_sizes: dict[str, int], devices=None) -> Mesh:
  """A ('mini_tasks', 'batch') mesh over `devices` (default: all).

  The 'mini_tasks' axis gets as many devices as divide both K and the device count; the
  rest go to 'batch'.

  Args:
    mini_tasks: K, the mini-tasks of a metalearning round.
    batch_sizes: each batch size that is split over all devices, by config key.
    devices: the devices (default: all).

  Raises:
    ValueError: if a batch cannot be split evenly over the devices.
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  count = devices.size
  for key, size in batch_sizes.items():
    if size % count:
      raise ValueError(f"{key} {size} is not divisible by the {count} devices")
  task_axis = math.gcd(mini_tasks, count)
  return Mesh(devices.reshape(task_axis, count // task_axis), ("mini_tasks", "batch"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places every array of `tree` on all devices of the mesh (process-local values must agree)."""
  return jax.device_put(tree, replicated(mesh))


def shard_batch(tree, mesh: Mesh):
  """Inside jit: splits the leading (example) axis of every array over the whole mesh."""
  sharding = NamedSharding(mesh, P(("mini_tasks", "batch")))
  return jax.lax.with_sharding_constraint(tree, sharding)


def shard_mini_tasks(tree, mesh: Mesh):
  """Inside jit: mini-tasks (axis 0) over 'mini_tasks', their examples (axis 1) over 'batch'."""
  sharding = NamedSharding(mesh, P("mini_tasks", "batch"))
  return jax.lax.with_sharding_constraint(tree, sharding)


def abstract_replicated(tree, mesh: Mesh):
  """ShapeDtypeStructs of `tree` carrying the replicated sharding (for checkpoint restore)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


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


def join_processes(
  coordinator_address: str = "", num_processes: int = 0, process_id: int = 0, timeout_s: int = 120
) -> None:
  """Joins this process to the run's other processes (`jax.distributed.initialize`).

  On a Cloud TPU slice, with no arguments, every host finds the others itself. Given a
  coordinator address (processes started by hand, such as scripts/multihost_local.sh on one
  machine), it joins `num_processes` processes there as number `process_id`; on CPU their
  collectives go through gloo. A process that cannot reach the others within `timeout_s`
  fails instead of waiting for ever.
  """
  if not coordinator_address:
    jax.distributed.initialize()
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=timeout_s,
  )


def peak_memory() -> tuple[int, str]:
  """Peak bytes in use on the device where it reports them, else the host's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS"

"""The run state: everything a run carries from one task to the next, as one pytree.

  {'knowledge_base': KB variables,
   'tasks': {'feature_extractor', 'mask_generator', 'head'} with a leading task axis,
   'rng': the run's PRNG key, split once per task}

Every seen task is evaluated in one vmapped call over the task axis, and a checkpoint of
this pytree (plus the accuracy matrix) is all a resume needs.
"""

import functools

import jax
from jax import lax

from mark_jax.models import Networks
from mark_jax.runtime import devices


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_run_state(nets: Networks, key, num_tasks: int) -> dict:
  """The run state before task 0 (key: PRNGKey(seed)): fresh KB and per-task variables, the
  run's RNG key.

  Jitted: eagerly, the vmapped initialisers dispatch thousands of small operations (bit
  for bit the same values, several times slower on CPU).
  """
  kb_key, tasks_key, run_key = jax.random.split(key, 3)
  return {
    "knowledge_base": nets.init_knowledge_base(kb_key),
    "tasks": jax.vmap(nets.init_task)(jax.random.split(tasks_key, num_tasks)),
    "rng": run_key,
  }


def initial(nets: Networks, seed: int, num_tasks: int, mesh) -> dict:
  """A fresh run state, replicated over the mesh."""
  return devices.replicate(init_run_state(nets, jax.random.PRNGKey(seed), num_tasks), mesh)


def initial_runs(nets: Networks, seeds: list[int], num_tasks: int, mesh) -> dict:
  """Fresh run states of `seeds` stacked on a leading run axis (each as `initial` makes it)."""
  keys = jax.numpy.stack([jax.random.PRNGKey(seed) for seed in seeds])
  init = jax.vmap(lambda key: init_run_state(nets, key, num_tasks))
  return devices.replicate(init(keys), mesh)


def stack(states: list):
  """Pytrees of equal structure stacked on a new leading axis."""
  return jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *states)


@jax.jit
def unstack(tree, index):
  """Entry `index` of a pytree stacked on a leading axis (one program for every index)."""
  return jax.tree.map(lambda leaf: lax.dynamic_index_in_dim(leaf, index, keepdims=False), tree)


def abstract(nets: Networks, seed: int, num_tasks: int, mesh):
  """Shapes, dtypes and shardings of the run state (what a checkpoint restore needs)."""
  shapes = jax.eval_shape(init_run_state, nets, jax.random.PRNGKey(seed), num_tasks)
  return devices.abstract_replicated(shapes, mesh)


def size_bytes(abstract_state) -> int:
  """Bytes of a run state: the size of one task's checkpoint."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_state))


task_slot = unstack  # task t's variables out of the stacked per-task pytree


@functools.partial(jax.jit, donate_argnums=0)
def set_task_slot(tasks, t, task):
  """The stacked per-task pytree with task t's variables replaced."""
  return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v, t, 0), tasks, task)

"""A run's compiled functions, built once: `build_programs(config, benchmark)`.

Every function that a task's steps call is compiled here, so nothing recompiles between
tasks, and a later run in the same process whose programs would be the same (another seed,
other loop counts) reuses them: it neither traces nor loads anything again.

Built with `runs=R`, each function takes and returns a leading run axis instead
(jax.vmap over R runs that share the networks' shapes: seeds and the step sizes of
metalearning.SETTINGS), and the round's step sizes become an input (one value per run)
instead of constants compiled in.
"""

import collections
import dataclasses
import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mark_jax import metalearning
from mark_jax import phases as phases_lib
from mark_jax.data import tasks as tasks_lib
from mark_jax.models import Networks, model_inputs
from mark_jax.runtime import devices
from mark_jax.runtime.errors import ConfigError


def one_run(fn: Callable, in_axes=0) -> Callable:
  """`per_run` of a single run: the function itself."""
  del in_axes
  return fn


@dataclasses.dataclass(frozen=True)
class Programs:
  """A run's networks, device mesh and compiled functions.

  Attributes:
    nets: the networks (mark_jax.models.Networks).
    mesh: the devices' ('mini_tasks', 'batch') mesh.
    phases: the gradient-descent phases by name (mark_jax.phases.make_phases).
    init_phase_states: each phase's jitted `(params, model_state) -> step state` (a fresh
      optimiser), placed as its epoch returns the state.
    epoch_fns: one jitted epoch of each phase.
    init_probe: F^t's throw-away linear probe from a key (jitted).
    feature_statistics: F^t's batch-norm statistics recomputed over a task's images.
    task_features: F^t's features of a task's training images (phases.make_features_fn).
    meta_round: one jitted metalearning round `(kb, task, images, labels, rng)`; with a run
      axis it takes the runs' stacked round settings as a sixth argument.
    scores: a model's accuracy on weighted examples, its masks' largest value and its masked
      latent's norm, in one pass (phases.make_scores_fn; jitted, `use_masks` static).
    evaluate_all: the test accuracy of every task seen, with its own F, M, C and one KB.
    runs: the number of runs on the leading axis, None for a single run.
    per_run: `per_run(fn, in_axes=0)` maps a single-run function over the runs (jax.vmap),
      or returns it unchanged for a single run.
  """

  nets: Networks
  mesh: jax.sharding.Mesh
  phases: dict
  init_phase_states: dict
  epoch_fns: dict
  init_probe: Callable
  feature_statistics: Callable
  task_features: Callable
  meta_round: Callable
  scores: Callable
  evaluate_all: Callable
  runs: int | None = None
  per_run: Callable = one_run


def make_mesh(config) -> jax.sharding.Mesh:
  """The run's device mesh; ConfigError when the config's sizes do not divide over it."""
  try:
    batch_sizes = {key: config[key] for key in ("batch_size", "eval_batch_size")}
    return devices.make_mesh(config.mini_tasks, batch_sizes)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def make_evaluate_all(scores: Callable, use_masks: bool) -> Callable:
  """`(knowledge_base, tasks, test, seen) -> accuracy per task` (not jitted).

  The tasks are evaluated one after another (lax.map: one task's batch in memory at a
  time, where a vmap over 20 tasks held them all at once), and those from index `seen` on,
  not trained yet, are skipped (accuracy 0). `seen` is an input, not a constant: one
  program serves every task.

  Args:
    scores: a model's scores on weighted examples (phases.make_scores_fn).
    use_masks: whether the models apply their masks.
  """

  def evaluate_all(knowledge_base, tasks, test, seen):
    def one(xs):
      index, task, inputs, labels, weights = xs
      model = {**task, "knowledge_base": knowledge_base}
      return lax.cond(
        index < seen,
        lambda: scores(model, inputs, labels, weights, use_masks)["accuracy"],
        lambda: jnp.zeros((), jnp.float32),
      )

    labels = test["label"]
    indices = jnp.arange(labels.shape[0])
    return lax.map(one, (indices, tasks, model_inputs(test), labels, test["weight"]))

  return evaluate_all


# Config keys that no compiled function reads: the seed makes keys (inputs), the epochs and
# rounds are loop counts, the rest choose the data (whose facts the signature holds). Every
# other key is part of the programs' signature.
NOT_COMPILED = (
  "seed",
  "epochs",
  "meta_rounds",
  "dataset",
  "data_dir",
  "image_size",
  "max_tasks",
  "validation_fraction",
  "synthetic",
  "resnet18_weights",
  "resnet18_pretrained",
)
KEPT_PROGRAMS = 8  # the programs of this many signatures stay built in a process
_built: collections.OrderedDict = collections.OrderedDict()


def signature(config, benchmark, runs: int | None) -> tuple:
  """What a run's programs are built from: the config but NOT_COMPILED, the data's image
  size, classes per task and normalisation, the run axis. (Array shapes need not be in it:
  a jitted function compiles again for new ones.)"""
  settings = {k: v for k, v in config.to_dict().items() if k not in NOT_COMPILED}
  facts = (benchmark.image_size, benchmark.classes_per_task, benchmark.mean, benchmark.std)
  return json.dumps(settings, sort_keys=True, default=repr), repr(facts), runs


def build_programs(config, benchmark, runs: int | None = None) -> Programs:
  """The networks, mesh and jitted functions of a run of `config` on `benchmark`: those
  of an earlier run in this process with the same signature, else new ones.

  Args:
    config: the run config (of any of the runs: they share everything but seeds and
      round settings).
    benchmark: the data's shapes and normalisation (mark_jax.data.datasets.Benchmark).
    runs: R to compile every function over a leading axis of R runs; None for one run.
  """
  key = signature(config, benchmark, runs)
  if key not in _built:
    _built[key] = new_programs(config, benchmark, runs)
    if len(_built) > KEPT_PROGRAMS:
      _built.popitem(last=False)
  _built.move_to_end(key)
  return _built[key]


def forget_programs() -> None:
  """Drops every built program: the next run traces and compiles (or loads) its own."""
  _built.clear()


def new_programs(config, benchmark, runs: int | None = None) -> Programs:
  """build_programs without reuse."""
  nets = Networks(config, benchmark.image_size, benchmark.classes_per_task, runs is not None)
  mean, std = benchmark.mean, benchmark.std
  mesh = make_mesh(config)
  shard_batch = functools.partial(devices.shard_batch, mesh=mesh)
  phases = phases_lib.make_phases(nets, config, mean, std)
  per_run = one_run if runs is None else lambda fn, in_axes=0: jax.vmap(fn, in_axes=in_axes)
  meta_round = metalearning.make_meta_round(
    nets,
    config,
    mean,
    std,
    mini_task_map=metalearning.mini_task_map(config.mini_task_map, mesh.shape["mini_tasks"]),
    shard_mini_tasks=functools.partial(devices.shard_mini_tasks, mesh=mesh),
  )
  if runs is None:
    meta_round = functools.partial(meta_round, settings=metalearning.round_settings(config))
  scores = phases_lib.make_scores_fn(nets, mean, std, config.eval_batch_size, shard_batch)
  use_masks = config.use_masks
  return Programs(
    nets=nets,
    mesh=mesh,
    phases=phases,
    # Placed as the epochs return it: with runs on a leading axis, a state without that
    # sharding would make each epoch compile once more for its own output.
    init_phase_states={
      name: jax.jit(
        per_run(functools.partial(phases_lib.init_state, phase)),
        out_shardings=devices.replicated(mesh),
      )
      for name, phase in phases.items()
    },
    epoch_fns={
      name: jax.jit(
        per_run(phases_lib.make_epoch_fn(phase, config.batch_size, shard_batch)),
        donate_argnums=0,
      )
      for name, phase in phases.items()
    },
    init_probe=jax.jit(per_run(nets.init_head)),
    feature_statistics=jax.jit(
      per_run(
        phases_lib.make_feature_statistics_fn(nets, config.batch_size, mean, std, shard_batch)
      )
    ),
    # Replicated like the images beside them.
    task_features=jax.jit(
      per_run(phases_lib.make_features_fn(nets, config.batch_size, mean, std, shard_batch)),
      out_shardings=devices.replicated(mesh),
    ),
    meta_round=jax.jit(per_run(meta_round), donate_argnums=0),
    scores=jax.jit(per_run(scores, (0, 0, 0, 0, None)), static_argnums=4),
    evaluate_all=jax.jit(per_run(make_evaluate_all(scores, use_masks), (0, 0, 0, None))),
    runs=runs,
    per_run=per_run,
  )


def device_data(config, mesh, task) -> dict:
  """A task's training inputs (models.model_inputs) on the devices, and its validation split
  padded for evaluation.

  `task` is a TaskData, or a list of them (one per run, equally many training images)
  stacked on a leading run axis.
  """
  tasks = task if isinstance(task, list) else [task]
  held_out = tasks_lib.stack_splits([t.validation for t in tasks], config.eval_batch_size)
  train = {"image": np.stack([t.train.images for t in tasks])}
  if tasks[0].train.features is not None:
    train["features"] = np.stack([t.train.features for t in tasks])
  on_device = {
    "train_image": model_inputs(train),
    "train_label": np.stack([t.train.labels for t in tasks]),
    "validation": (model_inputs(held_out), held_out["label"], held_out["weight"]),
  }
  if not isinstance(task, list):
    on_device = jax.tree.map(lambda a: a[0], on_device)
  return devices.replicate(on_device, mesh)


def device_test_data(config, mesh, tasks: list) -> dict:
  """Every task's test split, stacked on a task axis, on the devices.

  `tasks` lists each task's TaskData, or, for runs on a leading run axis, each run's list.
  """
  runs = tasks if tasks and isinstance(tasks[0], list) else [tasks]
  test = tasks_lib.stack_splits([t.test for run in runs for t in run], config.eval_batch_size)
  if runs is not tasks:
    return devices.replicate(test, mesh)
  return devices.replicate(
    {k: v.reshape(len(runs), -1, *v.shape[1:]) for k, v in test.items()}, mesh
  )

"""One task of MARK: its five steps as functions over the run state.

`train_task(run, t, state, task_data)` trains F^t, pretrains the KB (task 0), trains M^t
and C^t, enriches the KB by metalearning and consolidates M^t and C^t (docs/spec.md).
The compiled functions come from `build_programs`, once per run, so nothing recompiles
between tasks; every epoch and metalearning round goes through `run_loop`, the one loop
that checks for a stop request, shows progress, writes metrics and stops at a non-finite
loss.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
from absl import logging

from mark_jax import metalearning, state
from mark_jax import phases as phases_lib
from mark_jax.data import tasks as tasks_lib
from mark_jax.models import Networks
from mark_jax.runtime import devices, logs, signals
from mark_jax.runtime.errors import ConfigError, TrainingError


@dataclasses.dataclass(frozen=True)
class Programs:
  """A run's networks, device mesh and compiled functions.

  Attributes:
    nets: the networks (mark_jax.models.Networks).
    mesh: the devices' ('mini_tasks', 'batch') mesh.
    phases: the gradient-descent phases by name (mark_jax.phases.make_phases).
    epoch_fns: one jitted epoch of each phase.
    feature_statistics: F^t's batch-norm statistics recomputed over a task's images.
    meta_round: one jitted metalearning round (mark_jax.metalearning).
    accuracy: a model's accuracy on weighted examples.
    mask_statistics: the masks' largest value and the masked latent's norm.
    evaluate_all: every task's test accuracy with its own F, M, C and one KB.
  """

  nets: Networks
  mesh: jax.sharding.Mesh
  phases: dict
  epoch_fns: dict
  feature_statistics: Callable
  meta_round: Callable
  accuracy: Callable
  mask_statistics: Callable
  evaluate_all: Callable


def make_mesh(config) -> jax.sharding.Mesh:
  """The run's device mesh; ConfigError when the config's sizes do not divide over it."""
  try:
    return devices.make_mesh(config.mini_tasks, config.batch_size)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def make_evaluate_all(accuracy: Callable, use_masks: bool) -> Callable:
  """Jitted `(knowledge_base, tasks, test) -> accuracy per task`, vmapped over the tasks.

  Args:
    accuracy: a model's accuracy on weighted examples (phases.make_accuracy_fn).
    use_masks: whether the models apply their masks.
  """

  def evaluate_all(knowledge_base, tasks, test):
    def one(task, images, labels, weights):
      model = {**task, "knowledge_base": knowledge_base}
      return accuracy(model, images, labels, weights, use_masks)

    return jax.vmap(one)(tasks, test["image"], test["label"], test["weight"])

  return jax.jit(evaluate_all)


def build_programs(config, benchmark) -> Programs:
  """The networks, mesh and jitted functions of a run of `config` on `benchmark`."""
  nets = Networks(config, benchmark.image_size, benchmark.classes_per_task)
  mean, std = benchmark.mean, benchmark.std
  mesh = make_mesh(config)
  shard_batch = functools.partial(devices.shard_batch, mesh=mesh)
  phases = phases_lib.make_phases(nets, config, mean, std)
  meta_round = metalearning.make_meta_round(
    nets,
    config,
    mean,
    std,
    shard_mini_tasks=functools.partial(devices.shard_mini_tasks, mesh=mesh),
  )
  accuracy = phases_lib.make_accuracy_fn(nets, mean, std, config.eval_batch_size)
  return Programs(
    nets=nets,
    mesh=mesh,
    phases=phases,
    epoch_fns={
      name: phases_lib.make_epoch_fn(phase, config.batch_size, shard_batch)
      for name, phase in phases.items()
    },
    feature_statistics=phases_lib.make_feature_statistics_fn(
      nets, config.batch_size, mean, std, shard_batch
    ),
    meta_round=jax.jit(meta_round, donate_argnums=0),
    accuracy=jax.jit(accuracy, static_argnums=4),
    mask_statistics=jax.jit(phases_lib.make_mask_statistics_fn(nets, mean, std)),
    evaluate_all=make_evaluate_all(accuracy, config.use_masks),
  )


@dataclasses.dataclass(frozen=True)
class Run:
  """What one run's steps share.

  Attributes:
    config: the run config.
    programs: its compiled functions (build_programs).
    writer: where metrics go.
    stop: the run's stop request (SIGINT/SIGTERM).
    interactive: progress bars (True), log lines (False), or by terminal (None).
  """

  config: object
  programs: Programs
  writer: logs.MetricWriter = dataclasses.field(default_factory=lambda: logs.MetricWriter(None))
  stop: signals.StopOnSignal = dataclasses.field(default_factory=signals.StopOnSignal)
  interactive: bool | None = None


def device_data(config, mesh, task: tasks_lib.TaskData) -> dict:
  """A task's training images on the devices, and its validation split padded for evaluation."""
  held_out = tasks_lib.stack_splits([task.validation], config.eval_batch_size)
  on_device = {
    "train_image": task.train.images,
    "train_label": task.train.labels,
    "validation": tuple(held_out[k][0] for k in ("image", "label", "weight")),
  }
  return devices.replicate(on_device, mesh)


def device_test_data(config, mesh, tasks: list[tasks_lib.TaskData]) -> dict:
  """Every task's test split, stacked on a task axis, on the devices."""
  test = tasks_lib.stack_splits([task.test for task in tasks], config.eval_batch_size)
  return devices.replicate(test, mesh)


def resume_hint(t: int) -> str:
  """Where a relaunch resumes when task t is interrupted."""
  return f"after task {t - 1}" if t > 0 else "from the start"


def check_finite(metrics: dict, t: int, where: str) -> None:
  """Raises TrainingError when a step's loss or the trained parameters are not finite."""
  step = int(metrics["first_nonfinite_step"])
  if step < 0 and bool(metrics["params_finite"]):
    return
  what = f"step {step + 1}: the loss is not finite" if step >= 0 else "parameters not finite"
  raise TrainingError(
    f"task {t}, {where}, {what}; stopped without saving task {t}, so a relaunch resumes "
    f"{resume_hint(t)}: lower the learning rates or check the data"
  )


def run_loop(run: Run, body, carry, *, task: int, step: str, count: int, unit: str, scalars):
  """Runs `body(carry, i) -> (carry, metrics)` for i < count: MARK's one training loop.

  Before each iteration it honours a stop request; after it, it writes the metrics named in
  `scalars` (also those of a diverged iteration, so that they are on record), stops with
  TrainingError at a non-finite loss or parameter, and shows progress.

  `body` is one compiled epoch or metalearning round; `step` names the step of MARK it
  runs as (e.g. 'masks' or 'metalearning'), `unit` its iterations ('epoch' or 'round').
  Returns the final carry.
  """
  label = f"task {task} {step}"
  with logs.PhaseProgress(label, count, unit, interactive=run.interactive) as bar:
    for i in range(count):
      run.stop.check(f"{label} {unit} {i + 1}", resume_hint(task))
      carry, metrics = body(carry, i)
      metrics = jax.device_get(metrics)
      values = {name: metrics[name] for name in scalars}
      run.writer.write(
        f"task_{task:02d}/{step}", i + 1, values, task=task, phase=step, **{unit: i + 1}
      )
      check_finite(metrics, task, f"{step} {unit} {i + 1}")
      bar.update(values)
  return carry


def run_phase(run: Run, name, params, frozen, data, rng, *, task, step, model_state=None):
  """`config.epochs` epochs of phase `name`; returns (params, model_state).

  Args:
    run: the run.
    name: the phase (a key of run.programs.phases).
    params: what the phase trains.
    frozen: what the phase only reads.
    data: the task's device data (device_data).
    rng: the phase's key.
    task: the task index.
    step: the step of MARK this phase runs as (e.g. 'masks' or 'consolidation').
    model_state: F^t's batch statistics, for the phases that update them.
  """
  epoch_fn = run.programs.epoch_fns[name]

  def epoch(phase_state, i):
    key = jax.random.fold_in(rng, i)
    return epoch_fn(phase_state, frozen, data["train_image"], data["train_label"], key)

  phase_state = phases_lib.init_state(run.programs.phases[name], params, model_state)
  phase_state = run_loop(
    run,
    epoch,
    phase_state,
    task=task,
    step=step,
    count=run.config.epochs,
    unit="epoch",
    scalars=("loss", "accuracy"),
  )
  return phase_state["params"], phase_state["model_state"]


def feature_phase_inputs(nets: Networks, model: dict, rng) -> tuple[dict, dict, dict]:
  """(params, frozen, batch statistics) of F^t's phase: F^t and a fresh probe head."""
  fe = model["feature_extractor"]
  return {"feature_extractor": fe["params"], "probe": nets.init_head(rng)}, {}, fe["batch_stats"]


def phase_inputs(phase: phases_lib.Phase, model: dict) -> tuple[dict, dict, dict | None]:
  """Splits a model dict (KB + one task's F/M/C) for a phase after F^t's.

  Returns:
    (params, frozen, model_state): what the phase trains, what it only reads, and F^t's
    batch statistics when the phase updates them (Phase.updates_feature_statistics).
  """
  frozen = {k: v for k, v in model.items() if k not in phase.trainable}
  params = {k: model[k] for k in phase.trainable}
  if phase.updates_feature_statistics:
    frozen["feature_extractor"] = {"params": model["feature_extractor"]["params"]}
    return params, frozen, model["feature_extractor"]["batch_stats"]
  return params, frozen, None


def train_feature_extractor(run: Run, model, data, rng, task) -> dict:
  """Step 1: trains F^t with a throw-away linear probe; returns F^t's new variables."""
  probe_key, phase_key = jax.random.split(rng)
  params, frozen, batch_stats = feature_phase_inputs(run.programs.nets, model, probe_key)
  params, batch_stats = run_phase(
    run,
    "feature_extractor",
    params,
    frozen,
    data,
    phase_key,
    task=task,
    step="feature_extractor",
    model_state=batch_stats,
  )
  if run.config.feature_bn_statistics == "recomputed":
    variables = {"params": params["feature_extractor"], "batch_stats": batch_stats}
    after_last_epoch = jax.random.fold_in(phase_key, run.config.epochs)
    batch_stats = run.programs.feature_statistics(variables, data["train_image"], after_last_epoch)
  return {"params": params["feature_extractor"], "batch_stats": batch_stats}


def train_phase(run: Run, name, model, data, rng, task, step=None) -> dict:
  """Trains the phase's entries of `model` (KB + one task's F/M/C); returns the new model."""
  step, phase, programs = step or name, run.programs.phases[name], run.programs
  params, frozen, batch_stats = phase_inputs(phase, model)
  params, batch_stats = run_phase(
    run, name, params, frozen, data, rng, task=task, step=step, model_state=batch_stats
  )
  model = {**model, **params}
  if phase.updates_feature_statistics:
    model["feature_extractor"] = {**model["feature_extractor"], "batch_stats": batch_stats}
  images, labels, weights = data["validation"]
  scalars = {
    "validation_accuracy": float(programs.accuracy(model, images, labels, weights, phase.use_masks))
  }
  if phase.use_masks:
    statistics = programs.mask_statistics(model, images, weights)
    scalars.update({k: float(v) for k, v in statistics.items()})
  logging.info("task %d %s: %s", task, step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
  run.writer.write(f"task_{task:02d}/{step}", run.config.epochs, scalars, task=task, phase=step)
  return model


def metalearn(run: Run, t, model, data, rng):
  """Step 4: `config.meta_rounds` rounds of K vmapped mini-tasks + a Reptile step.

  Returns:
    The new KB variables.
  """
  task = {k: v for k, v in model.items() if k != "knowledge_base"}

  def meta_round(kb, r):
    key = jax.random.fold_in(rng, r)
    return run.programs.meta_round(kb, task, data["train_image"], data["train_label"], key)

  return run_loop(
    run,
    meta_round,
    model["knowledge_base"],
    task=t,
    step="metalearning",
    count=run.config.meta_rounds,
    unit="round",
    scalars=("first_inner_loss", "inner_loss", "mini_task_accuracy"),
  )


def train_task(run: Run, t: int, run_state: dict, task_data: tasks_lib.TaskData) -> dict:
  """The five steps of task t (docs/spec.md); returns the new run state."""
  config = run.config
  rng, task_key = jax.random.split(run_state["rng"])
  keys = dict(
    zip(
      ("features", "pretrain", "masks", "kb", "consolidation"),
      jax.random.split(task_key, 5),
      strict=True,
    )
  )
  data = device_data(config, run.programs.mesh, task_data)
  model = {**state.task_slot(run_state["tasks"], t), "knowledge_base": run_state["knowledge_base"]}

  own_features = config.use_feature_extractor and not (config.shared_feature_extractor and t)
  if own_features:
    model["feature_extractor"] = train_feature_extractor(run, model, data, keys["features"], t)
  elif config.use_feature_extractor:
    model["feature_extractor"] = state.task_slot(run_state["tasks"], 0)["feature_extractor"]
  masks_phase = "masks" if own_features else "masks_without_own_features"
  if t == 0 and config.pretrain_kb:
    model = train_phase(run, "kb_pretrain", model, data, keys["pretrain"], t)
  if config.use_feature_extractor or not config.kb_only_skips_masks_step:
    model = train_phase(run, masks_phase, model, data, keys["masks"], t, "masks")
  if config.use_metalearning:
    model["knowledge_base"] = metalearn(run, t, model, data, keys["kb"])
  else:
    model = train_phase(run, "kb_sgd", model, data, keys["kb"], t)
  model = train_phase(run, masks_phase, model, data, keys["consolidation"], t, "consolidation")
  kb = model.pop("knowledge_base")
  return {
    "knowledge_base": kb,
    "tasks": state.set_task_slot(run_state["tasks"], t, model),
    "rng": rng,
  }

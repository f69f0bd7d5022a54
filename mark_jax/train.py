"""MARK's task loop: train each task's five phases, evaluate every seen task, checkpoint.

`train_and_evaluate(config, workdir)` is the whole run. State between tasks is one pytree:

  {'knowledge_base': KB variables,
   'tasks': {'feature_extractor', 'mask_generator', 'head'} with a leading task axis,
   'rng': the run's PRNG key, split once per task}

so every seen task is evaluated in one vmapped call, and a checkpoint of this pytree (plus
the accuracy matrix) is all a resume needs.
"""

import contextlib
import functools
import json
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax import lax

from mark_jax import (
  checkpointing,
  metalearning,
  metric_writer,
  parallel,
  progress,
  stopping,
  validation,
)
from mark_jax import data as data_lib
from mark_jax import metrics as metrics_lib
from mark_jax import phases as phases_lib
from mark_jax import workdir as workdir_lib
from mark_jax.errors import CheckpointError, ConfigError, TrainingError
from mark_jax.models import Networks


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def init_run_state(nets: Networks, seed: int, num_tasks: int) -> dict:
  """The run state before task 0: fresh KB and per-task variables, the run's RNG key.

  Jitted: eagerly, the vmapped initialisers dispatch thousands of small operations (bit
  for bit the same values, several times slower on CPU).
  """
  kb_key, tasks_key, run_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    "knowledge_base": nets.init_knowledge_base(kb_key),
    "tasks": jax.vmap(nets.init_task)(jax.random.split(tasks_key, num_tasks)),
    "rng": run_key,
  }


@jax.jit
def task_slot(tasks, t):
  """Task t's variables out of the stacked per-task pytree."""
  return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, t, keepdims=False), tasks)


@functools.partial(jax.jit, donate_argnums=0)
def set_task_slot(tasks, t, task):
  """The stacked per-task pytree with task t's variables replaced."""
  return jax.tree.map(lambda a, v: lax.dynamic_update_index_in_dim(a, v, t, 0), tasks, task)


class Trainer:
  """Compiled functions of one run (built once, so nothing recompiles between tasks).

  Args:
    config: the run config.
    benchmark: the dataset cut into tasks.
    writer: where metrics go (default: nowhere).
    stop: the run's StopOnSignal (default: one that never fires).
    interactive: progress bars (True), log lines (False), or by terminal (None).
  """

  def __init__(
    self,
    config,
    benchmark: data_lib.Benchmark,
    writer: metric_writer.MetricWriter | None = None,
    stop: stopping.StopOnSignal | None = None,
    interactive: bool | None = None,
  ):
    self.config = config
    self.writer = writer or metric_writer.MetricWriter(None)
    self.stop = stop or stopping.StopOnSignal()
    self.interactive = interactive
    self.nets = Networks(config, benchmark.image_size, benchmark.classes_per_task)
    self.mean, self.std = benchmark.mean, benchmark.std
    try:
      self.mesh = parallel.make_mesh(config.mini_tasks, config.batch_size)
    except ValueError as error:
      raise ConfigError(str(error)) from None
    shard_batch = functools.partial(parallel.shard_batch, mesh=self.mesh)
    self.phases = phases_lib.make_phases(self.nets, config, self.mean, self.std)
    self.epoch_fns = {
      name: phases_lib.make_epoch_fn(phase, config.batch_size, shard_batch)
      for name, phase in self.phases.items()
    }
    self.feature_statistics = phases_lib.make_feature_statistics_fn(
      self.nets, config.batch_size, self.mean, self.std, shard_batch
    )
    meta_round = metalearning.make_meta_round(
      self.nets,
      config,
      self.mean,
      self.std,
      shard_mini_tasks=functools.partial(parallel.shard_mini_tasks, mesh=self.mesh),
    )
    self.meta_round = jax.jit(meta_round, donate_argnums=0)
    accuracy = phases_lib.make_accuracy_fn(self.nets, self.mean, self.std, config.eval_batch_size)
    self.accuracy = jax.jit(accuracy, static_argnums=4)
    mask_statistics = phases_lib.make_mask_statistics_fn(self.nets, self.mean, self.std)
    self.mask_statistics = jax.jit(mask_statistics)

    def evaluate_all(knowledge_base, tasks, test):
      def one(task, images, labels, weights):
        model = {**task, "knowledge_base": knowledge_base}
        return accuracy(model, images, labels, weights, config.use_masks)

      return jax.vmap(one)(tasks, test["image"], test["label"], test["weight"])

    self.evaluate_all = jax.jit(evaluate_all)

  def init_state(self, num_tasks: int) -> dict:
    """A fresh run state, replicated over the mesh."""
    return parallel.replicate(init_run_state(self.nets, self.config.seed, num_tasks), self.mesh)

  def abstract_state(self, num_tasks: int):
    """Shapes, dtypes and shardings of the run state (what a checkpoint restore needs)."""
    abstract = jax.eval_shape(init_run_state, self.nets, self.config.seed, num_tasks)
    return parallel.abstract_replicated(abstract, self.mesh)

  def device_data(self, task: data_lib.TaskData) -> dict:
    """A task's training images on the devices, and its validation split padded for evaluation."""
    held_out = data_lib.stack_splits([task.validation], self.config.eval_batch_size)
    on_device = {
      "train_image": task.train.images,
      "train_label": task.train.labels,
      "validation": tuple(held_out[k][0] for k in ("image", "label", "weight")),
    }
    return parallel.replicate(on_device, self.mesh)

  def device_test_data(self, tasks: list[data_lib.TaskData]) -> dict:
    """Every task's test split, stacked on a task axis, on the devices."""
    test = data_lib.stack_splits([task.test for task in tasks], self.config.eval_batch_size)
    return parallel.replicate(test, self.mesh)

  def resume_hint(self, t: int) -> str:
    """Where a relaunch resumes when task t is interrupted."""
    return f"after task {t - 1}" if t > 0 else "from the start"

  def check_stop(self, t: int, where: str) -> None:
    self.stop.check(where, self.resume_hint(t))

  def check_finite(self, metrics: dict, t: int, where: str) -> None:
    """Raises TrainingError when a step's loss or the trained parameters are not finite."""
    step = int(metrics["first_nonfinite_step"])
    if step < 0 and bool(metrics["params_finite"]):
      return
    what = f"step {step + 1}: the loss is not finite" if step >= 0 else "parameters not finite"
    raise TrainingError(
      f"task {t}, {where}, {what}; stopped without saving task {t}, so a relaunch resumes "
      f"{self.resume_hint(t)}: lower the learning rates or check the data"
    )

  def run_phase(self, name, params, frozen, data, rng, *, task, step, model_state=None):
    """Runs `config.epochs` epochs of a phase; returns (params, model_state).

    Args:
      name: the phase (a key of self.phases).
      params: what the phase trains.
      frozen: what the phase only reads.
      data: the task's device data (device_data).
      rng: the phase's key.
      task: the task index, for progress, metrics and errors.
      step: the step of MARK this phase runs as (e.g. 'masks' or 'consolidation').
      model_state: F^t's batch statistics, for the phases that update them.
    """
    phase, epochs = self.phases[name], self.config.epochs
    state = phases_lib.init_state(phase, params, model_state)
    with progress.PhaseProgress(f"task {task} {step}", epochs, interactive=self.interactive) as bar:
      for epoch in range(epochs):
        self.check_stop(task, f"task {task} {step} epoch {epoch + 1}")
        state, metrics = self.epoch_fns[name](
          state, frozen, data["train_image"], data["train_label"], jax.random.fold_in(rng, epoch)
        )
        metrics = jax.device_get(metrics)
        self.check_finite(metrics, task, f"{step} epoch {epoch + 1}")
        scalars = {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}
        bar.update(scalars)
        self.writer.write(
          f"task_{task:02d}/{step}", epoch + 1, scalars, task=task, phase=step, epoch=epoch + 1
        )
    return state["params"], state["model_state"]

  def validation_accuracy(self, model, data, use_masks) -> float:
    return float(self.accuracy(model, *data["validation"], use_masks))

  def phase_inputs(self, name, model, rng=None):
    """Splits a model dict (KB + one task's F/M/C) for phase `name`.

    Returns:
      (params, frozen, model_state): what the phase trains, what it only reads, and F^t's
      batch statistics for the phases that update them (the feature phase, which also
      gets a fresh probe from `rng`, and Phase.updates_feature_statistics).
    """
    fe = model["feature_extractor"]
    if name == "feature_extractor":
      params = {"feature_extractor": fe["params"], "probe": self.nets.init_head(rng)}
      return params, {}, fe["batch_stats"]
    phase = self.phases[name]
    frozen = {k: v for k, v in model.items() if k not in phase.trainable}
    params = {k: model[k] for k in phase.trainable}
    if phase.updates_feature_statistics:
      frozen["feature_extractor"] = {"params": fe["params"]}
      return params, frozen, fe["batch_stats"]
    return params, frozen, None

  def train_feature_extractor(self, model, data, rng, task) -> dict:
    """Phase 1: trains F^t with a throw-away linear probe; returns F^t's new variables."""
    probe_key, phase_key = jax.random.split(rng)
    params, frozen, batch_stats = self.phase_inputs("feature_extractor", model, probe_key)
    params, batch_stats = self.run_phase(
      "feature_extractor",
      params,
      frozen,
      data,
      phase_key,
      task=task,
      step="feature_extractor",
      model_state=batch_stats,
    )
    if self.config.feature_bn_statistics == "recomputed":
      variables = {"params": params["feature_extractor"], "batch_stats": batch_stats}
      after_last_epoch = jax.random.fold_in(phase_key, self.config.epochs)
      batch_stats = self.feature_statistics(variables, data["train_image"], after_last_epoch)
    return {"params": params["feature_extractor"], "batch_stats": batch_stats}

  def train_phase(self, name, model, data, rng, task, step=None) -> dict:
    """Trains the phase's entries of `model` (KB + one task's F/M/C); returns the new model."""
    step, phase = step or name, self.phases[name]
    params, frozen, batch_stats = self.phase_inputs(name, model)
    params, batch_stats = self.run_phase(
      name, params, frozen, data, rng, task=task, step=step, model_state=batch_stats
    )
    model = {**model, **params}
    if phase.updates_feature_statistics:
      model["feature_extractor"] = {**model["feature_extractor"], "batch_stats": batch_stats}
    scalars = {"validation_accuracy": self.validation_accuracy(model, data, phase.use_masks)}
    if phase.use_masks:
      images, _, weights = data["validation"]
      statistics = self.mask_statistics(model, images, weights)
      scalars.update({k: float(v) for k, v in statistics.items()})
    logging.info(
      "task %d %s: %s", task, step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items())
    )
    self.writer.write(f"task_{task:02d}/{step}", self.config.epochs, scalars, task=task, phase=step)
    return model

  def train_task(self, t: int, state: dict, task_data: data_lib.TaskData) -> dict:
    """The five phases of task t (README, "What MARK does"); returns the new run state."""
    config = self.config
    rng, task_key = jax.random.split(state["rng"])
    keys = dict(
      zip(
        ("features", "pretrain", "masks", "kb", "consolidation"),
        jax.random.split(task_key, 5),
        strict=True,
      )
    )
    data = self.device_data(task_data)
    model = {**task_slot(state["tasks"], t), "knowledge_base": state["knowledge_base"]}

    own_features = config.use_feature_extractor and not (config.shared_feature_extractor and t)
    if own_features:
      model["feature_extractor"] = self.train_feature_extractor(model, data, keys["features"], t)
    elif config.use_feature_extractor:
      model["feature_extractor"] = task_slot(state["tasks"], 0)["feature_extractor"]
    masks_phase = "masks" if own_features else "masks_without_own_features"
    if t == 0 and config.pretrain_kb:
      model = self.train_phase("kb_pretrain", model, data, keys["pretrain"], t)
    if config.use_feature_extractor or not config.kb_only_skips_masks_step:
      model = self.train_phase(masks_phase, model, data, keys["masks"], t, "masks")
    if config.use_metalearning:
      model["knowledge_base"] = self.metalearn(t, model, data, keys["kb"])
    else:
      model = self.train_phase("kb_sgd", model, data, keys["kb"], t)
    model = self.train_phase(masks_phase, model, data, keys["consolidation"], t, "consolidation")
    kb = model.pop("knowledge_base")
    return {"knowledge_base": kb, "tasks": set_task_slot(state["tasks"], t, model), "rng": rng}

  def metalearn(self, t, model, data, rng):
    """Phase 4: `config.meta_rounds` rounds of K vmapped mini-tasks + a Reptile step.

    Returns:
      The new KB variables.
    """
    kb = model["knowledge_base"]
    task = {k: v for k, v in model.items() if k != "knowledge_base"}
    rounds = self.config.meta_rounds
    label = f"task {t} metalearning"
    with progress.PhaseProgress(label, rounds, "round", interactive=self.interactive) as bar:
      for r in range(rounds):
        self.check_stop(t, f"{label} round {r + 1}")
        kb, metrics = self.meta_round(
          kb, task, data["train_image"], data["train_label"], jax.random.fold_in(rng, r)
        )
        metrics = jax.device_get(metrics)
        scalars = {k: metrics[k] for k in ("first_inner_loss", "inner_loss", "mini_task_accuracy")}
        # Written before the check, so that a diverged round's first loss is on record.
        self.writer.write(
          f"task_{t:02d}/metalearning", r + 1, scalars, task=t, phase="metalearning", round=r + 1
        )
        self.check_finite(metrics, t, f"metalearning round {r + 1} (inner loop)")
        bar.update(scalars)
    return kb


def _restore(trainer: Trainer, mngr, config, workdir: epath.Path, num_tasks: int):
  """The run's starting point: (state, accuracy matrix, first task to train, wall seconds).

  The wall seconds are those recorded with the restored checkpoint (0 for a fresh state,
  None for a checkpoint that did not record them).

  Order: --config.restore_task (from --config.restore_dir, else the workdir), else the
  workdir's newest intact checkpoint (damaged ones are moved aside), else a fresh state.
  """
  accuracy = np.full((num_tasks, num_tasks), np.nan)
  abstract = trainer.abstract_state(num_tasks)
  restore_task = config.get("restore_task")
  if restore_task is None:
    restored = checkpointing.restore_latest(mngr, abstract, jax.process_index() == 0)
    if restored is None:
      return trainer.init_state(num_tasks), accuracy, 0, 0.0
    restore_task, state, saved, wall_seconds = restored
    source = mngr.directory
  else:
    if config.get("restore_dir"):
      source = epath.Path(config.restore_dir) / "checkpoints"
      if not source.exists():
        raise CheckpointError(f"--config.restore_dir={config.restore_dir} has no checkpoints/")
      state, saved, wall_seconds = checkpointing.restore(
        checkpointing.manager(source), restore_task, abstract
      )
    else:
      later = [s for s in mngr.all_steps() if s > restore_task]
      if later:
        raise CheckpointError(
          f"{workdir} already has checkpoints after task {restore_task} (tasks {sorted(later)});"
          f" to branch from task {restore_task}, use a new --workdir with "
          f"--config.restore_dir={workdir} --config.restore_task={restore_task}"
        )
      source = mngr.directory
      state, saved, wall_seconds = checkpointing.restore(mngr, restore_task, abstract)
  accuracy[: saved.shape[0], : saved.shape[1]] = saved
  accuracy[restore_task + 1 :] = np.nan
  logging.info("Resuming after task %d from %s", restore_task, source)
  return state, accuracy, restore_task + 1, wall_seconds


def checkpoint_bytes(trainer: Trainer, num_tasks: int) -> int:
  """Bytes of one task's checkpoint: the whole run state."""
  abstract = trainer.abstract_state(num_tasks)
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Runs MARK on `config.dataset` in `workdir`, resuming from its checkpoints.

  Before any data is loaded or anything compiled: the config is validated, the workdir
  must be writable and, if it holds an earlier run, have been started with the same
  config. Writes `workdir/config.json`, one checkpoint per task under
  `workdir/checkpoints/`, metrics (`metrics.jsonl`, `tensorboard/`), and
  `workdir/results.json` (accuracy matrix, ACC, BWT, forgetting) after every task.
  SIGINT/SIGTERM stop the run between two steps (errors.Interrupted).

  Args:
    config: the run config.
    workdir: local path or cloud URL of the run's directory.
    allow_config_change: continue a workdir started with another config.

  Returns:
    The results dict written to results.json.

  Raises:
    errors.UserError: with a message for the user (bad config, data, workdir, ...).
  """
  start_time = time.perf_counter()
  problems = validation.validate(config)
  if problems:
    raise ConfigError(f"the config has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  workdir = epath.Path(workdir)
  is_writer = jax.process_index() == 0
  if is_writer:
    workdir_lib.check_writable(workdir)
  workdir_lib.check_config(workdir, config, allow_config_change, is_writer)

  benchmark = data_lib.load_benchmark(config)
  num_tasks = len(benchmark.tasks)
  writer = metric_writer.MetricWriter(workdir if is_writer else None)
  with stopping.StopOnSignal() as stop, contextlib.closing(writer):
    trainer = Trainer(config, benchmark, writer, stop)
    if is_writer:
      workdir_lib.check_free_space(workdir, (num_tasks + 1) * checkpoint_bytes(trainer, num_tasks))
    test = trainer.device_test_data(benchmark.tasks)
    mngr = checkpointing.manager(workdir / "checkpoints")
    state, accuracy, first_task, earlier_seconds = _restore(
      trainer, mngr, config, workdir, num_tasks
    )

    def wall_seconds():
      """The run's wall time: earlier sessions' (as checkpointed) plus this one's."""
      if earlier_seconds is None:
        return None
      return earlier_seconds + time.perf_counter() - start_time

    results = _write_results(workdir, config, accuracy, first_task, wall_seconds(), is_writer)
    for t in range(first_task, num_tasks):
      task_start = time.perf_counter()
      logging.info("=== task %d/%d: classes %s", t, num_tasks - 1, benchmark.tasks[t].classes)
      state = trainer.train_task(t, state, benchmark.tasks[t])
      seen = np.asarray(trainer.evaluate_all(state["knowledge_base"], state["tasks"], test))
      accuracy[t, : t + 1] = seen[: t + 1]
      elapsed = wall_seconds()
      checkpointing.save(mngr, t, state, accuracy, elapsed)
      results = _write_results(workdir, config, accuracy, t + 1, elapsed, is_writer)
      logging.info(
        "task %d done in %.0fs | ACC %.4f | test accuracy of tasks 0..%d: %s",
        t,
        time.perf_counter() - task_start,
        results["acc"],
        t,
        " ".join(f"{a:.3f}" for a in seen[: t + 1]),
      )
      scalars = {f"task_{u:02d}": float(seen[u]) for u in range(t + 1)}
      scalars.update(acc=results["acc"], bwt=results["bwt"])
      writer.write("test", t, scalars, task=t, phase="test")
      trainer.check_stop(t + 1, f"the evaluation after task {t}")
  logging.info("ACC %.4f BWT %.4f", results["acc"], results["bwt"])
  return results


def _write_results(workdir, config, accuracy, tasks_completed, wall_seconds, is_writer) -> dict:
  results = metrics_lib.summarize(accuracy, tasks_completed)
  results.update(config=config.to_dict(), wall_seconds=wall_seconds)
  if is_writer:
    workdir_lib.write_atomically(workdir / "results.json", json.dumps(results, indent=2))
  return results

"""MARK's task loop: train each task's five phases, evaluate every seen task, checkpoint.

`train_and_evaluate(config, workdir)` is the whole run. State between tasks is one pytree:

  {'knowledge_base': KB variables,
   'tasks': {'feature_extractor', 'mask_generator', 'head'} with a leading task axis,
   'rng': the run's PRNG key, split once per task}

so every seen task is evaluated in one vmapped call, and a checkpoint of this pytree (plus
the accuracy matrix) is all a resume needs.
"""

import functools
import json
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from jax import lax

from mark_jax import checkpointing, metalearning, parallel
from mark_jax import data as data_lib
from mark_jax import metrics as metrics_lib
from mark_jax import phases as phases_lib
from mark_jax.errors import CheckpointError, ConfigError, TrainingError
from mark_jax.models import Networks


def init_run_state(nets: Networks, seed: int, num_tasks: int) -> dict:
  """The run state before task 0: fresh KB and per-task variables, the run's RNG key."""
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
  """Compiled functions of one run (built once, so nothing recompiles between tasks)."""

  def __init__(self, config, benchmark: data_lib.Benchmark):
    self.config = config
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
    init = functools.partial(init_run_state, self.nets, self.config.seed, num_tasks)
    abstract = jax.eval_shape(init)
    return parallel.abstract_replicated(abstract, self.mesh)

  def device_data(self, task: data_lib.TaskData) -> dict:
    """A task's training images on the devices, and its validation split padded for evaluation."""
    validation = data_lib.stack_splits([task.validation], self.config.eval_batch_size)
    on_device = {
      "train_image": task.train.images,
      "train_label": task.train.labels,
      "validation": tuple(validation[k][0] for k in ("image", "label", "weight")),
    }
    return parallel.replicate(on_device, self.mesh)

  def device_test_data(self, tasks: list[data_lib.TaskData]) -> dict:
    """Every task's test split, stacked on a task axis, on the devices."""
    test = data_lib.stack_splits([task.test for task in tasks], self.config.eval_batch_size)
    return parallel.replicate(test, self.mesh)

  def run_phase(self, name, params, frozen, data, rng, *, label, model_state=None):
    """Runs `config.epochs` epochs of a phase; returns (params, model_state)."""
    phase, epochs = self.phases[name], self.config.epochs
    state = phases_lib.init_state(phase, params, model_state)
    start = time.perf_counter()
    for epoch in range(epochs):
      state, metrics = self.epoch_fns[name](
        state, frozen, data["train_image"], data["train_label"], jax.random.fold_in(rng, epoch)
      )
      metrics = jax.device_get(metrics)
      _check_finite(metrics["loss"], label, epoch)
      logging.info(
        "%s epoch %d/%d: loss %.4f train accuracy %.4f",
        label,
        epoch + 1,
        epochs,
        metrics["loss"],
        metrics["accuracy"],
      )
    logging.info("%s: %d epochs in %.1fs", label, epochs, time.perf_counter() - start)
    return state["params"], state["model_state"]

  def validation_accuracy(self, model, data, use_masks) -> float:
    validation = data["validation"]
    return float(self.accuracy(model, *validation, use_masks))

  def phase_inputs(self, name, model, rng=None):
    """Splits a model dict (KB + one task's F/M/C) for phase `name`.

    Returns:
      (params, frozen, model_state): what the phase trains, what it only reads, and F^t's
      batch statistics for the feature phase (which also gets a fresh probe from `rng`).
    """
    if name == "feature_extractor":
      fe = model["feature_extractor"]
      params = {"feature_extractor": fe["params"], "probe": self.nets.init_head(rng)}
      return params, {}, fe["batch_stats"]
    trainable = self.phases[name].trainable
    frozen = {k: v for k, v in model.items() if k not in trainable}
    return {k: model[k] for k in trainable}, frozen, None

  def train_feature_extractor(self, model, data, rng, label) -> dict:
    """Phase 1: trains F^t with a throw-away linear probe; returns F^t's new variables."""
    probe_key, phase_key = jax.random.split(rng)
    params, frozen, batch_stats = self.phase_inputs("feature_extractor", model, probe_key)
    params, batch_stats = self.run_phase(
      "feature_extractor", params, frozen, data, phase_key, label=label, model_state=batch_stats
    )
    return {"params": params["feature_extractor"], "batch_stats": batch_stats}

  def train_phase(self, name, model, data, rng, label) -> dict:
    """Trains the phase's entries of `model` (KB + one task's F/M/C); returns the new model."""
    params, frozen, _ = self.phase_inputs(name, model)
    params, _ = self.run_phase(name, params, frozen, data, rng, label=label)
    model = {**model, **params}
    logging.info(
      "%s: validation accuracy %.4f",
      label,
      self.validation_accuracy(model, data, self.phases[name].use_masks),
    )
    return model

  def train_task(self, t: int, state: dict, task_data: data_lib.TaskData) -> dict:
    """The five phases of task t (MARK_SPEC.md); returns the new run state."""
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
    tag = f"task {t}"

    if config.use_feature_extractor:
      if config.shared_feature_extractor and t > 0:
        model["feature_extractor"] = task_slot(state["tasks"], 0)["feature_extractor"]
      else:
        model["feature_extractor"] = self.train_feature_extractor(
          model, data, keys["features"], f"{tag} feature_extractor"
        )
    if t == 0 and config.pretrain_kb:
      model = self.train_phase("kb_pretrain", model, data, keys["pretrain"], f"{tag} kb_pretrain")
    model = self.train_phase("masks", model, data, keys["masks"], f"{tag} masks")
    if config.use_metalearning:
      model["knowledge_base"] = self.metalearn(t, model, data, keys["kb"])
    else:
      model = self.train_phase("kb_sgd", model, data, keys["kb"], f"{tag} kb_sgd")
    model = self.train_phase("masks", model, data, keys["consolidation"], f"{tag} consolidation")
    kb = model.pop("knowledge_base")
    return {"knowledge_base": kb, "tasks": set_task_slot(state["tasks"], t, model), "rng": rng}

  def metalearn(self, t, model, data, rng):
    """Phase 4: `config.meta_rounds` rounds of K vmapped mini-tasks + a Reptile step.

    Returns:
      The new KB variables.
    """
    kb = model["knowledge_base"]
    task = {k: v for k, v in model.items() if k != "knowledge_base"}
    for r in range(self.config.meta_rounds):
      start = time.perf_counter()
      kb, metrics = self.meta_round(
        kb, task, data["train_image"], data["train_label"], jax.random.fold_in(rng, r)
      )
      metrics = jax.device_get(metrics)
      _check_finite(metrics["inner_loss"], f"task {t} metalearning", r)
      logging.info(
        "task %d metalearning round %d/%d: inner loss %.4f mini-task accuracy %.4f (%.1fs)",
        t,
        r + 1,
        self.config.meta_rounds,
        metrics["inner_loss"],
        metrics["mini_task_accuracy"],
        time.perf_counter() - start,
      )
    return kb


def _check_finite(value, where: str, index: int) -> None:
  if not np.isfinite(value):
    raise TrainingError(f"non-finite loss {value} in {where} at epoch/round {index + 1}")


def _write_json(path: epath.Path, payload: dict) -> None:
  """Writes JSON through a temporary file, so a reader never sees a half-written file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2))
  tmp.replace(path)


def _resume_point(mngr, config, workdir) -> tuple[str | None, int | None]:
  """Which checkpoint to start from: (directory, task) or (None, None) for a fresh run.

  Order: --config.restore_task (from --config.restore_dir, else the workdir), else the
  workdir's latest checkpoint, else fresh.
  """
  restore_task = config.get("restore_task")
  if restore_task is None:
    latest = mngr.latest_step()
    return (None, None) if latest is None else (mngr.directory, latest)
  if config.get("restore_dir"):
    return epath.Path(config.restore_dir) / "checkpoints", restore_task
  later = [s for s in mngr.all_steps() if s > restore_task]
  if later:
    raise CheckpointError(
      f"{workdir} already has checkpoints after task {restore_task} (tasks {sorted(later)}); "
      f"to branch from task {restore_task}, use a new --workdir with "
      f"--config.restore_dir={workdir} --config.restore_task={restore_task}"
    )
  return mngr.directory, restore_task


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs MARK on `config.dataset` in `workdir`, resuming from its checkpoints.

  Writes `workdir/config.json`, one checkpoint per task under `workdir/checkpoints/`, and
  `workdir/results.json` (accuracy matrix, ACC, BWT, forgetting) after every task.

  Returns:
    The results dict written to results.json.
  """
  start_time = time.perf_counter()
  workdir = epath.Path(workdir)
  is_writer = jax.process_index() == 0
  if is_writer:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  benchmark = data_lib.load_benchmark(config)
  num_tasks = len(benchmark.tasks)
  trainer = Trainer(config, benchmark)
  test = trainer.device_test_data(benchmark.tasks)

  mngr = checkpointing.manager(workdir / "checkpoints")
  directory, restored_task = _resume_point(mngr, config, workdir)
  accuracy = np.full((num_tasks, num_tasks), np.nan)
  if directory is None:
    state, first_task = trainer.init_state(num_tasks), 0
  else:
    source = mngr if directory == mngr.directory else checkpointing.manager(directory)
    abstract = trainer.abstract_state(num_tasks)
    state, saved = checkpointing.restore(source, restored_task, abstract)
    accuracy[: saved.shape[0], : saved.shape[1]] = saved
    accuracy[restored_task + 1 :] = np.nan
    first_task = restored_task + 1
    logging.info("Resuming after task %d from %s", restored_task, directory)

  for t in range(first_task, num_tasks):
    task_start = time.perf_counter()
    logging.info("=== task %d/%d: classes %s", t, num_tasks - 1, benchmark.tasks[t].classes)
    state = trainer.train_task(t, state, benchmark.tasks[t])
    seen = np.asarray(trainer.evaluate_all(state["knowledge_base"], state["tasks"], test))
    accuracy[t, : t + 1] = seen[: t + 1]
    logging.info(
      "task %d done in %.1fs; test accuracy of seen tasks: %s",
      t,
      time.perf_counter() - task_start,
      " ".join(f"{a:.3f}" for a in seen[: t + 1]),
    )
    checkpointing.save(mngr, t, state, accuracy)
    results = _write_results(workdir, config, accuracy, t + 1, start_time, is_writer)
  if first_task == num_tasks:
    results = _write_results(workdir, config, accuracy, num_tasks, start_time, is_writer)
  logging.info("ACC %.4f BWT %.4f", results["acc"], results["bwt"])
  return results


def _write_results(workdir, config, accuracy, tasks_completed, start_time, is_writer) -> dict:
  results = metrics_lib.summarize(accuracy, tasks_completed)
  results.update(config=config.to_dict(), wall_seconds=time.perf_counter() - start_time)
  if is_writer:
    _write_json(workdir / "results.json", results)
  return results

"""One task of MARK: its five steps as functions over the run state.

`train_task(run, t, state, task_data)` trains F^t, pretrains the KB (task 0), trains M^t
and C^t, enriches the KB by metalearning and consolidates M^t and C^t (docs/spec.md).
The compiled functions come from mark_jax.programs, once per run, so nothing recompiles
between tasks; every epoch and metalearning round goes through `run_loop`, the one loop
that checks for a stop request, shows progress, writes metrics and stops at a non-finite
loss. The same code trains runs stacked on a leading run axis (mark_jax.runs): each
per-run operation goes through `programs.per_run`, and a run whose loss is not finite
stops alone.
"""

import contextlib
import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from mark_jax import phases as phases_lib
from mark_jax import state
from mark_jax.programs import Programs, device_data
from mark_jax.runtime import logs, signals
from mark_jax.runtime.errors import TrainingError


def no_timer(part: str) -> contextlib.AbstractContextManager:
  """Run.timer's default: times nothing."""
  del part
  return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Run:
  """What one run's steps share.

  Attributes:
    config: the run config.
    programs: its compiled functions (build_programs).
    writer: where metrics go.
    stop: the run's stop request (SIGINT/SIGTERM).
    interactive: progress bars (True), log lines (False), or by terminal (None).
    diverged: runs on a run axis whose loss or parameters stopped being finite: index ->
      what happened (filled by run_loop; such runs go on being computed, unused).
    timer: `timer(part)` is a context manager around each part of a task (its epochs,
      validations, statistics, rounds, the data's transfer), for mark_jax.bench; by default
      it does nothing.
  """

  config: object
  programs: Programs
  writer: logs.MetricWriter = dataclasses.field(default_factory=lambda: logs.MetricWriter(None))
  stop: signals.StopOnSignal = dataclasses.field(default_factory=signals.StopOnSignal)
  interactive: bool | None = None
  diverged: dict = dataclasses.field(default_factory=dict)
  timer: Callable[[str], contextlib.AbstractContextManager] = no_timer


def resume_hint(t: int) -> str:
  """Where a relaunch resumes when task t is interrupted."""
  return f"after task {t - 1}" if t > 0 else "from the start"


def check_finite(run: Run, metrics: dict, t: int, where: str) -> None:
  """Stops at a non-finite loss or trained parameter: TrainingError for a single run; on a
  run axis, the runs concerned join `run.diverged` (TrainingError once all have)."""
  steps = np.atleast_1d(metrics["first_nonfinite_step"])
  finite = np.atleast_1d(metrics["params_finite"])
  for r in np.flatnonzero((steps >= 0) | ~finite):
    what = (
      f"step {steps[r] + 1}: the loss is not finite" if steps[r] >= 0 else "parameters not finite"
    )
    if run.programs.runs is None:
      raise TrainingError(
        f"task {t}, {where}, {what}; stopped without saving task {t}, so a relaunch resumes "
        f"{resume_hint(t)}: lower the learning rates or check the data"
      )
    if int(r) not in run.diverged:
      run.diverged[int(r)] = f"task {t}, {where}, {what}; task {t} not saved"
      logging.error("run %d of %d stopped: %s", r, run.programs.runs, run.diverged[int(r)])
  if run.programs.runs is not None and len(run.diverged) == run.programs.runs:
    raise TrainingError(f"every run stopped at a non-finite value; the last: task {t}, {where}")


def lane_means(scalars: dict, stopped=()) -> dict:
  """Scalars of one run as they are; of runs on an axis, the mean over the runs not
  `stopped` (for progress lines)."""
  return {
    name: float(np.mean(np.delete(np.atleast_1d(value), list(stopped))))
    for name, value in scalars.items()
  }


def describe(scalars: dict) -> str:
  """'name value ...' with each run's value for runs on an axis."""
  return ", ".join(
    f"{name} {' '.join(f'{v:.4f}' for v in np.atleast_1d(value))}"
    for name, value in scalars.items()
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
      check_finite(run, metrics, task, f"{step} {unit} {i + 1}")
      bar.update(lane_means(values, run.diverged))
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
  programs = run.programs
  epoch_fn, fold_in = programs.epoch_fns[name], programs.per_run(jax.random.fold_in, (0, None))

  def epoch(phase_state, i):
    return epoch_fn(phase_state, frozen, data["train_image"], data["train_label"], fold_in(rng, i))

  phase_state = programs.init_phase_states[name](params, model_state)
  with run.timer(f"{step} epochs"):
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


def feature_phase_inputs(programs: Programs, model: dict, rng) -> tuple[dict, dict, dict]:
  """(params, frozen, batch statistics) of F^t's phase: F^t and a fresh probe head."""
  fe, probe = model["feature_extractor"], programs.init_probe(rng)
  return {"feature_extractor": fe["params"], "probe": probe}, {}, fe["batch_stats"]


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
  probe_key, phase_key = run.programs.per_run(split_in_two)(rng)
  params, frozen, batch_stats = feature_phase_inputs(run.programs, model, probe_key)
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
  variables = {"params": params["feature_extractor"], "batch_stats": batch_stats}
  if run.config.feature_bn_statistics == "recomputed":
    fold_in = run.programs.per_run(jax.random.fold_in, (0, None))
    after_last_epoch = fold_in(phase_key, run.config.epochs)
    variables = recompute_statistics(run, variables, data, after_last_epoch)
  return variables


def recompute_statistics(run: Run, variables, data, rng) -> dict:
  """F's variables with its batch-norm statistics recomputed over the task's training images."""
  with run.timer("feature statistics"):
    statistics = jax.block_until_ready(
      run.programs.feature_statistics(variables, data["train_image"], rng)
    )
  return {"params": variables["params"], "batch_stats": statistics}


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
  with run.timer(f"{step} validation"):
    scores = programs.scores(model, images, labels, weights, phase.use_masks)
    scalars = {"validation_accuracy": scores["accuracy"]}
    if phase.use_masks:
      scalars.update(mask_max=scores["mask_max"], latent_norm=scores["latent_norm"])
    scalars = {name: jax.device_get(value) for name, value in scalars.items()}
  logging.info("task %d %s: %s", task, step, describe(scalars))
  run.writer.write(f"task_{task:02d}/{step}", run.config.epochs, scalars, task=task, phase=step)
  return model


def metalearn(run: Run, t, model, data, rng, settings=None):
  """Step 4: `config.meta_rounds` rounds of K vmapped mini-tasks + a Reptile step.

  `settings`: the runs' stacked round settings, for runs on a run axis (mark_jax.runs).

  Returns:
    The new KB variables.
  """
  task = {k: v for k, v in model.items() if k != "knowledge_base"}
  fold_in = run.programs.per_run(jax.random.fold_in, (0, None))
  extra = () if settings is None else (settings,)

  def meta_round(kb, r):
    images, labels = data["train_image"], data["train_label"]
    return run.programs.meta_round(kb, task, images, labels, fold_in(rng, r), *extra)

  with run.timer("metalearning rounds"):
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


def with_task_features(programs: Programs, config, model: dict, data: dict) -> dict:
  """The task's device data with F^t's features of its training images beside them.

  From here on F^t is frozen, so its features are computed once and the masks read them
  (Networks.masks) instead of running F^t in every step. The data stay as they are where
  the masks do not run a frozen F^t: no masks, features that come with the data (a
  ResNet-18's), or F^t in training mode on each batch (feature_bn_statistics 'batch').
  """
  nets = programs.nets
  if not config.use_masks or nets.cached_features or nets.masks_from_batch_statistics:
    return data
  images = data["train_image"]
  features = programs.task_features(model["feature_extractor"], images)
  return {**data, "train_image": {"image": images, "features": features}}


@jax.jit
def split_in_two(key) -> tuple:
  """Two keys from one."""
  return tuple(jax.random.split(key))


@jax.jit
def task_keys(run_key) -> tuple:
  """(the run's next key, the keys of task's five steps by name)."""
  rng, task_key = jax.random.split(run_key)
  steps = ("features", "pretrain", "masks", "kb", "consolidation")
  return rng, dict(zip(steps, jax.random.split(task_key, 5), strict=True))


def train_task(run: Run, t: int, run_state: dict, task_data, settings=None) -> dict:
  """The five steps of task t (docs/spec.md); returns the new run state.

  Args:
    run: the run (or runs on a run axis).
    t: the task index.
    run_state: the run state (mark_jax.state), with a leading run axis for runs.
    task_data: the task's TaskData, or one per run.
    settings: the runs' stacked round settings, for runs on a run axis.
  """
  config, per_run = run.config, run.programs.per_run
  rng, keys = per_run(task_keys)(run_state["rng"])
  with run.timer("task data to the devices"):
    data = jax.block_until_ready(device_data(config, run.programs.mesh, task_data))
  task_slot = per_run(state.task_slot, (0, None))
  model = {**task_slot(run_state["tasks"], t), "knowledge_base": run_state["knowledge_base"]}

  # A frozen ResNet-18's features come with the data (models.Networks.cached_features).
  trains_features = config.use_feature_extractor and not run.programs.nets.cached_features
  own_features = trains_features and not (config.shared_feature_extractor and t)
  if own_features and not config.random_feature_extractor:
    model["feature_extractor"] = train_feature_extractor(run, model, data, keys["features"], t)
  elif own_features and config.feature_bn_statistics == "recomputed":
    model["feature_extractor"] = recompute_statistics(
      run, model["feature_extractor"], data, keys["features"]
    )
  elif trains_features and t:
    model["feature_extractor"] = task_slot(run_state["tasks"], 0)["feature_extractor"]
  with run.timer("task features"):
    data = jax.block_until_ready(with_task_features(run.programs, config, model, data))
  # The authors' masks learn at the full rate with an F of the task's own or a random one,
  # at a tenth of it with a shared F^0 or a ResNet-18.
  full_rate = own_features or config.random_feature_extractor
  masks_phase = "masks" if full_rate else "masks_without_own_features"
  if t == 0 and config.pretrain_kb:
    model = train_phase(run, "kb_pretrain", model, data, keys["pretrain"], t)
  if config.use_feature_extractor or not config.kb_only_skips_masks_step:
    model = train_phase(run, masks_phase, model, data, keys["masks"], t, "masks")
  if config.use_metalearning:
    model["knowledge_base"] = metalearn(run, t, model, data, keys["kb"], settings)
  else:
    model = train_phase(run, "kb_sgd", model, data, keys["kb"], t)
  model = train_phase(run, masks_phase, model, data, keys["consolidation"], t, "consolidation")
  kb = model.pop("knowledge_base")
  return {
    "knowledge_base": kb,
    "tasks": per_run(state.set_task_slot, (0, None, 0))(run_state["tasks"], t, model),
    "rng": rng,
  }

"""MARK's task loop: `train_and_evaluate(config, workdir)` is the whole run.

It checks the config and the workdir, loads the data, restores the newest checkpoint (or
starts afresh), then for each task trains its five steps (mark_jax.mark), evaluates every
seen task, checkpoints the run state (mark_jax.state) and rewrites results.json.
"""

import contextlib
import json
import time
from typing import NamedTuple

import jax
import numpy as np
from absl import logging
from etils import epath

from mark_jax import config_checks, mark, metrics, state
from mark_jax import programs as programs_lib
from mark_jax.data import datasets
from mark_jax.runtime import checkpointing, logs, signals
from mark_jax.runtime import workdir as workdir_lib
from mark_jax.runtime.errors import CheckpointError, ConfigError


class Start(NamedTuple):
  """Where a run starts.

  Attributes:
    state: the run state (restored or fresh).
    accuracy: the accuracy rows so far, one per task trained (NaN where not yet measured).
    first_task: the first task to train, counted over all passes (pass * tasks + task).
    wall_seconds: the wall time recorded with the restored checkpoint (0 for a fresh
      state, None for a checkpoint that did not record it).
  """

  state: dict
  accuracy: np.ndarray
  first_task: int
  wall_seconds: float | None


def restore(programs: programs_lib.Programs, abstract, mngr, config, workdir: epath.Path) -> Start:
  """The run's starting point (`abstract`: the run state's shapes, state.abstract).

  Order: --config.restore_task (from --config.restore_dir, else the workdir), else the
  workdir's newest intact checkpoint (damaged ones are moved aside), else a fresh state.
  Tasks are counted over all passes: checkpoint N holds task N % T of pass N // T.
  """
  num_tasks = jax.tree.leaves(abstract["tasks"])[0].shape[0]  # the leading task axis
  shape = (config.passes * num_tasks, num_tasks)
  accuracy = np.full(shape, np.nan)
  restore_task = config.get("restore_task")
  if restore_task is None:
    restored = checkpointing.restore_latest(mngr, abstract, jax.process_index() == 0)
    if restored is None:
      return Start(
        state.initial(programs.nets, config.seed, num_tasks, programs.mesh), accuracy, 0, 0.0
      )
    restore_task, run_state, saved, wall_seconds = restored
    source = mngr.directory
  else:
    if config.get("restore_dir") and not workdir_lib.same_place(config.restore_dir, workdir):
      source = epath.Path(config.restore_dir) / "checkpoints"
      if not source.exists():
        raise CheckpointError(f"--config.restore_dir={config.restore_dir} has no checkpoints/")
      run_state, saved, wall_seconds = checkpointing.restore(
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
      run_state, saved, wall_seconds = checkpointing.restore(mngr, restore_task, abstract)
  accuracy = restored_accuracy(saved, restore_task, shape)
  logging.info("Resuming after task %d from %s", restore_task, source)
  return Start(run_state, accuracy, restore_task + 1, wall_seconds)


def restored_accuracy(saved: np.ndarray, task: int, shape: tuple[int, int]) -> np.ndarray:
  """The accuracy rows (`shape`: tasks over all passes, tasks) of a checkpoint after `task`
  (NaN after it)."""
  accuracy = np.full(shape, np.nan)
  accuracy[: saved.shape[0], : saved.shape[1]] = saved
  accuracy[task + 1 :] = np.nan
  return accuracy


def write_test_scalars(writer, trained: int, t: int, seen, results: dict) -> None:
  """Records task t's test accuracies of the seen tasks, ACC and BWT as metrics, at step
  `trained` (the task counted over all passes)."""
  scalars = {f"task_{u:02d}": float(seen[u]) for u in range(t + 1)}
  scalars.update(acc=results["acc"], bwt=results["bwt"])
  writer.write("test", trained, scalars, task=t, phase="test")


def train_and_evaluate(
  config, workdir: str, allow_config_change: bool = False, timer=mark.no_timer
) -> dict:
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
    timer: `timer(part)`, a context manager around each task and each of its parts
      (mark.Run.timer; mark_jax.bench); by default nothing is timed.

  Returns:
    The results dict written to results.json.

  Raises:
    errors.UserError: with a message for the user (bad config, data, workdir, ...).
  """
  start_time = time.perf_counter()
  problems = config_checks.validate(config)
  if problems:
    raise ConfigError(f"the config has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  workdir = epath.Path(workdir)
  is_writer = jax.process_index() == 0
  if is_writer:
    workdir_lib.check_writable(workdir)
  workdir_lib.check_config(workdir, config, allow_config_change, is_writer)

  benchmark = datasets.load_benchmark(config)
  num_tasks = len(benchmark.tasks)
  writer = logs.MetricWriter(workdir if is_writer else None)
  with signals.StopOnSignal() as stop, contextlib.closing(writer):
    programs = programs_lib.build_programs(config, benchmark)
    run = mark.Run(config, programs, writer, stop, timer=timer)
    abstract = state.abstract(programs.nets, config.seed, num_tasks, programs.mesh)
    if is_writer:
      workdir_lib.check_free_space(workdir, (num_tasks + 1) * state.size_bytes(abstract))
    test = programs_lib.device_test_data(config, programs.mesh, benchmark.tasks)
    mngr = checkpointing.manager(workdir / "checkpoints")
    start = restore(programs, abstract, mngr, config, workdir)
    run_state, accuracy = start.state, start.accuracy

    def wall_seconds():
      """The run's wall time: earlier sessions' (as checkpointed) plus this one's."""
      if start.wall_seconds is None:
        return None
      return start.wall_seconds + time.perf_counter() - start_time

    # Wall time counts sessions that train: until a task is trained, it is the saved one.
    results = write_results(
      workdir, config, accuracy, start.first_task, start.wall_seconds, is_writer
    )
    for trained in range(start.first_task, config.passes * num_tasks):
      task_start = time.perf_counter()
      pass_index, t = divmod(trained, num_tasks)
      in_pass = f" (pass {pass_index + 1}/{config.passes})" if config.passes > 1 else ""
      logging.info(
        "=== task %d/%d%s: classes %s", t, num_tasks - 1, in_pass, benchmark.tasks[t].classes
      )
      with run.timer("task"):
        run_state = mark.train_task(run, t, run_state, benchmark.tasks[t])
        with run.timer("evaluation of the seen tasks"):
          seen = np.asarray(
            programs.evaluate_all(run_state["knowledge_base"], run_state["tasks"], test, t + 1)
          )
        accuracy[trained, : t + 1] = seen[: t + 1]
        elapsed = wall_seconds()
        with run.timer("checkpoint"):
          checkpointing.save(mngr, trained, run_state, accuracy, elapsed)
        with run.timer("results and metrics"):
          results = write_results(workdir, config, accuracy, trained + 1, elapsed, is_writer)
          logging.info(
            "task %d done in %.0fs | ACC %.4f | test accuracy of tasks 0..%d: %s",
            t,
            time.perf_counter() - task_start,
            results["acc"],
            t,
            " ".join(f"{a:.3f}" for a in seen[: t + 1]),
          )
          write_test_scalars(writer, trained, t, seen, results)
      stop.check(f"the evaluation after task {t}{in_pass}", mark.resume_hint(trained + 1))
  logging.info("ACC %.4f BWT %.4f", results["acc"], results["bwt"])
  return results


def write_results(
  workdir, config, accuracy, tasks_completed, wall_seconds, is_writer, **fields
) -> dict:
  """Writes workdir/results.json (metrics of the first tasks, config, wall time, `fields`).

  `accuracy` has a row per task trained over all passes and `tasks_completed` counts them.
  With several passes the metrics are those of the latest pass begun, and
  `accuracy_matrix_per_pass` keeps the matrix of every pass so far.
  """
  num_tasks = accuracy.shape[1]
  latest_pass = min(max(tasks_completed - 1, 0) // num_tasks, config.passes - 1)
  rows = accuracy[latest_pass * num_tasks : (latest_pass + 1) * num_tasks]
  results = metrics.summarize(rows, tasks_completed - latest_pass * num_tasks)
  if config.passes > 1:
    results.update(
      passes_begun=latest_pass + 1,
      accuracy_matrix_per_pass=[
        metrics.matrix_to_json(accuracy[q * num_tasks : min((q + 1) * num_tasks, tasks_completed)])
        for q in range(latest_pass + 1)
      ],
    )
  results.update(config=config.to_dict(), wall_seconds=wall_seconds, **fields)
  if is_writer:
    workdir_lib.write_atomically(workdir / "results.json", json.dumps(results, indent=2))
  return results

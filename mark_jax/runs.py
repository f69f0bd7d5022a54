r"""Many runs as one compiled program: seeds and round settings on a leading run axis.

  python launch.py --config configs/smoke.py --workdir DIR --seeds=48,49,51 \
      --sweep=meta_step_size=0,0.001,0.01 --config.runs_in_one_program=True

Runs that differ only in the seed and in the step sizes of a metalearning round
(metalearning.SETTINGS) share every shape, so one program trains them all: the run state
gets a leading run axis and every epoch, round and evaluation is vmapped over it
(mark_jax.programs). Each run keeps its seed's class split and RNG and writes its own
workdir exactly as a run alone does (config.json, a checkpoint per task, metrics,
results.json), so a relaunch resumes every run, and a run whose loss stops being finite
stops alone (its results.json says where) while the others go on.
"""

import contextlib
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from mark_jax import config_checks, mark, metalearning, state, train
from mark_jax import programs as programs_lib
from mark_jax.data import datasets
from mark_jax.runtime import checkpointing, devices, logs, signals
from mark_jax.runtime import workdir as workdir_lib
from mark_jax.runtime.errors import ConfigError, DataError

STOPPED = "stopped"  # results.json's field naming why a run stopped before the others


def in_one_program(config) -> bool:
  """config.runs_in_one_program, or by backend when None: one program on GPU and TPU."""
  chosen = config.get("runs_in_one_program")
  return jax.default_backend() != "cpu" if chosen is None else bool(chosen)


def parse_sweeps(config, sweeps: list[str]) -> dict[str, list]:
  """`KEY=V1,V2,...` flags as {key: values}, each value of the config key's type.

  Raises:
    ConfigError: a malformed flag, or a key that is not a round setting.
  """
  parsed = {}
  for sweep in sweeps:
    key, sep, values = sweep.partition("=")
    if not sep or not values:
      raise ConfigError(f"--sweep={sweep}: expected KEY=V1,V2,...")
    if key not in metalearning.SETTINGS:
      raise ConfigError(
        f"--sweep={sweep}: only the step sizes of a metalearning round can be swept "
        f"({', '.join(metalearning.SETTINGS)}); other keys change the compiled program, so "
        "run them as separate commands"
      )
    kind = type(config[key])
    try:
      parsed[key] = [kind(value) for value in values.split(",")]
    except ValueError:
      raise ConfigError(f"--sweep={sweep}: values must be of type {kind.__name__}") from None
  return parsed


def expand(config, seeds: list[int], sweeps: dict[str, list]) -> list[tuple[str, object]]:
  """(subdirectory, config) of every run: each combination of swept values x each seed.

  A combination's folder is named by its values (`meta_step_size=0.01`), its seeds' by
  the seed (`seed_48`) inside it; without sweeps only the seed folders remain.
  """
  runs = []
  for values in itertools.product(*sweeps.values()):
    setting = dict(zip(sweeps, values, strict=True))
    folder = ",".join(f"{key}={value}" for key, value in setting.items())
    for seed in seeds:
      run_config = config.copy_and_resolve_references()
      run_config.update(setting)
      run_config.seed = seed
      runs.append((f"{folder}/seed_{seed}" if folder else f"seed_{seed}", run_config))
  return runs


def check_configs(configs: list) -> None:
  """Raises ConfigError unless the configs can share one program (see module doc)."""
  problems = []
  for i, config in enumerate(configs):
    problems += [f"run {i} (seed {config.seed}): {p}" for p in config_checks.validate(config)]
  if problems:
    raise ConfigError(f"the configs have {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  shared = workdir_lib.CHANGEABLE_KEYS | set(metalearning.SETTINGS) | {"seed"}
  first = workdir_lib.flatten_config(configs[0].to_dict())
  for config in configs[1:]:
    flat = workdir_lib.flatten_config(config.to_dict())
    differ = sorted(
      k for k in first.keys() | flat.keys() if k not in shared and first.get(k) != flat.get(k)
    )
    if differ:
      raise ConfigError(
        "runs in one program must share every key but the seed and round settings "
        f"({', '.join(metalearning.SETTINGS)}); these differ: {', '.join(differ)}"
      )
  if configs[0].get("restore_task") is not None:
    raise ConfigError(
      "--config.restore_task branches one run: use launch.py without --seeds/--sweep"
    )
  kb_sgd = ("meta_step_size", "meta_weight_decay")
  if not configs[0].use_metalearning and any(len({c[k] for c in configs}) > 1 for k in kb_sgd):
    raise ConfigError(
      "with --config.use_metalearning=False, meta_step_size and meta_weight_decay set a "
      "compiled-in SGD phase: sweep them in separate commands"
    )


def check_equal_tasks(benchmarks: list) -> None:
  """Raises DataError unless each task has as many training images in every run."""
  for t in range(len(benchmarks[0].tasks)):
    sizes = {len(b.tasks[t].train) for b in benchmarks}
    if len(sizes) > 1:
      raise DataError(
        f"task {t} has {sorted(sizes)} training images in different runs (classes of unequal "
        "size): such seeds cannot share one program; use --config.runs_in_one_program=False"
      )


def restore_runs(mngrs, abstract, nets, seeds, num_tasks, mesh, is_writer):
  """The runs' common starting point: every run restored after the last task all finished.

  Returns:
    (stacked state, accuracy matrices, first task, wall seconds per run).
  """
  latest = [checkpointing.restore_latest(m, abstract, is_writer) for m in mngrs]
  accuracy = [np.full((num_tasks, num_tasks), np.nan) for _ in mngrs]
  if any(restored is None for restored in latest):
    return state.initial_runs(nets, seeds, num_tasks, mesh), accuracy, 0, [0.0] * len(mngrs)
  task = min(restored[0] for restored in latest)
  states, walls = [], []
  for r, (mngr, restored) in enumerate(zip(mngrs, latest, strict=True)):
    _, run_state, saved, wall = (
      restored if restored[0] == task else (task, *checkpointing.restore(mngr, task, abstract))
    )
    accuracy[r] = train.restored_accuracy(saved, task, num_tasks)
    states.append(run_state)
    walls.append(wall)
  logging.info("Resuming %d runs after task %d", len(mngrs), task)
  return devices.replicate(state.stack(states), mesh), accuracy, task + 1, walls


def stopped_results(workdir) -> dict | None:
  """The results.json of a run in `workdir` that stopped alone earlier, else None."""
  path = epath.Path(workdir) / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  return results if STOPPED in results else None


def train_and_evaluate_runs(configs: list, workdirs: list[str], allow_config_change=False) -> list:
  """Trains runs of `configs` as one program, each in its workdir as train_and_evaluate does.

  A run that stopped alone in an earlier launch is left out (delete its workdir to train
  it again); the others resume together.

  Args:
    configs: one config per run, equal but for seeds and round settings (check_configs).
    workdirs: one directory per run.
    allow_config_change: continue workdirs started with another config.

  Returns:
    Each run's results dict (as written to its results.json).

  Raises:
    errors.UserError: with a message for the user (bad configs, data, workdirs, ...).
  """
  check_configs(configs)
  results = [stopped_results(w) for w in workdirs]
  for workdir, earlier in zip(workdirs, results, strict=True):
    if earlier is not None:
      logging.warning("%s stopped earlier (%s): left out", workdir, earlier[STOPPED])
  live = [i for i, earlier in enumerate(results) if earlier is None]
  if live:
    trained = _train_together(
      [configs[i] for i in live], [workdirs[i] for i in live], allow_config_change
    )
    for i, run_results in zip(live, trained, strict=True):
      results[i] = run_results
  return results


def _train_together(configs: list, workdirs: list[str], allow_config_change: bool) -> list:
  """train_and_evaluate_runs of runs that have not stopped."""
  start_time = time.perf_counter()
  workdirs = [epath.Path(w) for w in workdirs]
  is_writer = jax.process_index() == 0
  for config, workdir in zip(configs, workdirs, strict=True):
    if is_writer:
      workdir_lib.check_writable(workdir)
    workdir_lib.check_config(workdir, config, allow_config_change, is_writer)
  benchmarks = datasets.load_benchmarks(configs)
  check_equal_tasks(benchmarks)
  num_runs, num_tasks = len(configs), len(benchmarks[0].tasks)
  for r, workdir in enumerate(workdirs):
    logging.info("run %d of the program: %s", r, workdir)
  seeds = [c.seed for c in configs]
  diverged = {}  # run index -> why it stopped (mark.check_finite)
  writers = [logs.MetricWriter(w if is_writer else None) for w in workdirs]
  writer = logs.RunsWriter(writers, stopped=diverged)
  with signals.StopOnSignal() as stop, contextlib.closing(writer):
    programs = programs_lib.build_programs(configs[0], benchmarks[0], runs=num_runs)
    run = mark.Run(configs[0], programs, writer, stop, diverged=diverged)
    abstract = state.abstract(programs.nets, seeds[0], num_tasks, programs.mesh)
    if is_writer:
      for workdir in workdirs:
        workdir_lib.check_free_space(workdir, (num_tasks + 1) * state.size_bytes(abstract))
    test = programs_lib.device_test_data(configs[0], programs.mesh, [b.tasks for b in benchmarks])
    mngrs = [checkpointing.manager(w / "checkpoints") for w in workdirs]
    run_state, accuracy, first_task, walls = restore_runs(
      mngrs, abstract, programs.nets, seeds, num_tasks, programs.mesh, is_writer
    )
    per_run_settings = [metalearning.round_settings(c) for c in configs]
    settings = {k: jnp.asarray([s[k] for s in per_run_settings]) for k in per_run_settings[0]}

    def wall_seconds(r):
      if walls[r] is None:
        return None
      return walls[r] + time.perf_counter() - start_time

    results = [
      train.write_results(w, c, a, first_task, wall_seconds(r), is_writer)
      for r, (w, c, a) in enumerate(zip(workdirs, configs, accuracy, strict=True))
    ]
    for t in range(first_task, num_tasks):
      task_start = time.perf_counter()
      logging.info("=== task %d/%d of %d runs in one program", t, num_tasks - 1, num_runs)
      run_state = mark.train_task(run, t, run_state, [b.tasks[t] for b in benchmarks], settings)
      seen = np.asarray(
        programs.evaluate_all(run_state["knowledge_base"], run_state["tasks"], test)
      )
      for r in range(num_runs):
        if r in diverged:
          if STOPPED not in results[r]:
            results[r] = train.write_results(
              workdirs[r],
              configs[r],
              accuracy[r],
              t,
              wall_seconds(r),
              is_writer,
              **{STOPPED: diverged[r]},
            )
          continue
        accuracy[r][t, : t + 1] = seen[r, : t + 1]
        if t not in mngrs[r].all_steps():  # a relaunch retrains tasks some runs had saved
          checkpointing.save(mngrs[r], t, state.unstack(run_state, r), accuracy[r], wall_seconds(r))
        results[r] = train.write_results(
          workdirs[r], configs[r], accuracy[r], t + 1, wall_seconds(r), is_writer
        )
        train.write_test_scalars(writer.writers[r], t, seen[r], results[r])
      logging.info(
        "task %d done in %.0fs | ACC of each run: %s",
        t,
        time.perf_counter() - task_start,
        " ".join(
          "stopped" if r in diverged else f"{results[r]['acc']:.4f}" for r in range(num_runs)
        ),
      )
      stop.check(f"the evaluation after task {t}", mark.resume_hint(t + 1))
  return results

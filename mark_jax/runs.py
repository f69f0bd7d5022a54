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
import dataclasses
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


def check_configs(configs: list, names: list[str] | None = None) -> None:
  """Raises ConfigError unless the configs can share one program (see module doc).

  Args:
    configs: one config per run.
    names: how the message names each run (default: its index and seed).
  """
  names = names or [f"run {i} (seed {c.seed})" for i, c in enumerate(configs)]
  problems = []
  for i, config in enumerate(configs):
    problems += [f"run {i} (seed {config.seed}): {p}" for p in config_checks.validate(config)]
  if problems:
    raise ConfigError(f"the configs have {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  shared = workdir_lib.CHANGEABLE_KEYS | set(metalearning.SETTINGS) | {"seed"}
  first = workdir_lib.flatten_config(configs[0].to_dict())
  for name, config in zip(names[1:], configs[1:], strict=True):
    flat = workdir_lib.flatten_config(config.to_dict())
    differ = sorted(
      k for k in first.keys() | flat.keys() if k not in shared and first.get(k) != flat.get(k)
    )
    if differ:
      listed = ", ".join(f"{k} ({first.get(k)!r} vs {flat.get(k)!r})" for k in differ)
      raise ConfigError(
        "runs in one program must share every key but the seed and round settings "
        f"({', '.join(metalearning.SETTINGS)}); {names[0]} and {name} differ in: {listed}"
      )
  if configs[0].get("restore_task") is not None:
    raise ConfigError(
      "--config.restore_task branches one run: use launch.py without --seeds/--sweep"
    )
  if configs[0].passes > 1:
    raise ConfigError(
      f"--config.passes={configs[0].passes}: runs in one program make one pass; "
      "use --config.runs_in_one_program=False"
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


@dataclasses.dataclass
class Resume:
  """Where runs on a run axis start (restore_runs).

  A run ahead of the others (it saved later tasks) keeps its checkpoints and results: until
  its own latest task, its lane computes a copy of a run behind, whose outputs are dropped
  (nothing saved, written or logged for it); then its restored state takes the lane over.
  """

  state: dict  # stacked over the run axis, replicated over the mesh
  accuracy: list[np.ndarray]  # each run's matrix, as of its own latest checkpoint
  first_task: int  # the first task the program trains
  walls: list[float | None]  # each run's saved wall seconds
  latest: list[int]  # each run's latest saved task (-1: none; the task count: stopped)
  joining: dict[int, dict]  # run ahead -> its restored state, taken over after latest[r]

  def ahead(self, t: int) -> set[int]:
    """The runs whose lanes only copy another during task t."""
    return {r for r, done in enumerate(self.latest) if t <= done}

  def take_over(self, run_state: dict, t: int, mesh, waiting: dict) -> dict:
    """`run_state` with the lanes of the runs that rejoin at task t set to their states;
    those runs leave `waiting` (the runs the program treats as stopped)."""
    rejoining = [r for r in self.joining if self.latest[r] == t - 1]
    if not rejoining:
      return run_state
    lanes = [state.unstack(run_state, r) for r in range(len(self.latest))]
    for r in rejoining:
      lanes[r] = self.joining.pop(r)
      del waiting[r]
    return devices.replicate(state.stack(lanes), mesh)


def restore_runs(latest: list, nets, seeds, num_tasks: int, mesh, stopped=frozenset()) -> Resume:
  """The runs' common starting point: after the latest task of the runs furthest behind.

  Args:
    latest: per run, checkpointing.restore_latest's answer (None: no checkpoint).
    nets, seeds, num_tasks, mesh: what a fresh state needs.
    stopped: runs that stopped in an earlier launch: ahead of every task, never rejoining.
  """
  done = [
    num_tasks if r in stopped else -1 if restored is None else restored[0]
    for r, restored in enumerate(latest)
  ]
  common = min(done)
  accuracy = [np.full((num_tasks, num_tasks), np.nan) for _ in latest]
  walls: list[float | None] = [0.0] * len(latest)
  states = {}
  for r, restored in enumerate(latest):
    if restored is not None:
      task, run_state, saved, walls[r] = restored
      accuracy[r] = train.restored_accuracy(saved, task, (num_tasks, num_tasks))
      states[r] = run_state
  joining = {r: states.pop(r) for r in list(states) if done[r] > common}
  if common < 0:
    stacked = state.initial_runs(nets, seeds, num_tasks, mesh)
  else:
    behind = [states[r] for r in range(len(latest)) if done[r] == common]
    lanes = [states.get(r, behind[0]) for r in range(len(latest))]
    stacked = devices.replicate(state.stack(lanes), mesh)
  if common >= 0 or joining:
    logging.info(
      "Resuming %d runs after task %d%s",
      len(latest),
      common,
      "".join(f"; run {r} rejoins after its task {done[r]}" for r in sorted(joining)),
    )
  return Resume(stacked, accuracy, common + 1, walls, done, joining)


def stopped_results(workdir) -> dict | None:
  """The results.json of a run in `workdir` that stopped alone earlier, else None."""
  path = epath.Path(workdir) / "results.json"
  if not path.exists():
    return None
  results = json.loads(path.read_text())
  return results if STOPPED in results else None


def train_and_evaluate_runs(configs: list, workdirs: list[str], allow_config_change=False) -> list:
  """Trains runs of `configs` as one program, each in its workdir as train_and_evaluate does.

  A run that stopped alone in an earlier launch is not trained again (delete its workdir
  for that) and nothing of it is written; its lane copies another run's, so that the
  program stays the one the first launch compiled. The others resume together.

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
  earlier = [stopped_results(w) for w in workdirs]
  stopped = {r for r, results in enumerate(earlier) if results is not None}
  for r in sorted(stopped):
    logging.warning("%s stopped earlier (%s): not trained", workdirs[r], earlier[r][STOPPED])
  if len(stopped) == len(workdirs):
    return earlier
  trained = _train_together(configs, workdirs, allow_config_change, stopped)
  return [earlier[r] if r in stopped else trained[r] for r in range(len(workdirs))]


def _train_together(
  configs: list, workdirs: list[str], allow_config_change: bool, stopped: set[int]
) -> list:
  """train_and_evaluate_runs; the runs in `stopped` are carried along untrained."""
  start_time = time.perf_counter()
  workdirs = [epath.Path(w) for w in workdirs]
  is_writer = jax.process_index() == 0
  # Each run goes on with the values it used for keys its config.json lacks: the programs
  # are built from configs[0], so the runs must still agree once those are filled in.
  for config, workdir in zip(configs, workdirs, strict=True):
    workdir_lib.fill_keys_as_run(workdir, config)
  check_configs(configs, [str(w) for w in workdirs])
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
    resume = restore_runs(
      [
        None if r in stopped else checkpointing.restore_latest(m, abstract, is_writer)
        for r, m in enumerate(mngrs)
      ],
      programs.nets,
      seeds,
      num_tasks,
      programs.mesh,
      stopped,
    )
    run_state, accuracy, walls = resume.state, resume.accuracy, resume.walls
    # Runs that do not train yet count as stopped for the program (no metrics, no
    # divergence reports) until they rejoin (Resume.take_over).
    for r in sorted(stopped | resume.joining.keys()):
      diverged[r] = "stopped in an earlier launch" if r in stopped else "ahead of the others"
    per_run_settings = [metalearning.round_settings(c) for c in configs]
    settings = {k: jnp.asarray([s[k] for s in per_run_settings]) for k in per_run_settings[0]}

    def wall_seconds(r):
      if walls[r] is None:
        return None
      return walls[r] + time.perf_counter() - start_time

    # Each run's results as its checkpoints hold them (a kill between a checkpoint and its
    # results leaves them a task behind), wall times as saved until a task is trained
    # (train.train_and_evaluate); runs stopped in an earlier launch keep theirs.
    results = [
      train.write_results(w, c, a, resume.latest[r] + 1, walls[r], is_writer and r not in stopped)
      for r, (w, c, a) in enumerate(zip(workdirs, configs, accuracy, strict=True))
    ]
    for t in range(resume.first_task, num_tasks):
      task_start = time.perf_counter()
      logging.info("=== task %d/%d of %d runs in one program", t, num_tasks - 1, num_runs)
      run_state = resume.take_over(run_state, t, programs.mesh, diverged)
      ahead = resume.ahead(t)
      run_state = mark.train_task(run, t, run_state, [b.tasks[t] for b in benchmarks], settings)
      seen = np.asarray(
        programs.evaluate_all(run_state["knowledge_base"], run_state["tasks"], test, t + 1)
      )
      for r in range(num_runs):
        if r in ahead:  # its lane copied another run's: nothing to keep
          continue
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
        wall = wall_seconds(r)  # one figure in the checkpoint and in results.json
        checkpointing.save(mngrs[r], t, state.unstack(run_state, r), accuracy[r], wall)
        results[r] = train.write_results(
          workdirs[r], configs[r], accuracy[r], t + 1, wall, is_writer
        )
        train.write_test_scalars(writer.writers[r], t, t, seen[r], results[r])
      logging.info(
        "task %d done in %.0fs | ACC of each run: %s",
        t,
        time.perf_counter() - task_start,
        " ".join(
          "waits"
          if r in resume.joining
          else "stopped"
          if r in diverged
          else f"{results[r]['acc']:.4f}"
          for r in range(num_runs)
        ),
      )
      stop.check(f"the evaluation after task {t}", mark.resume_hint(t + 1))
  return results

"""Runs on a leading run axis (mark_jax.runs): equal to runs alone, resumable, stopped alone."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import smoke
from mark_jax import runs, train
from mark_jax.runtime import checkpointing
from mark_jax.runtime.errors import ConfigError

from tiny import abstract_state, tiny_config

ROOT = Path(__file__).resolve().parent.parent
KILL_SEED = 3


def _matrix(workdir) -> np.ndarray:
  rows = json.loads((Path(workdir) / "results.json").read_text())["accuracy_matrix"]
  return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _results(workdir) -> dict:
  return json.loads((Path(workdir) / "results.json").read_text())


def _train(config, workdir: Path, seeds, sweeps=()) -> list[Path]:
  planned = runs.expand(config, list(seeds), runs.parse_sweeps(config, list(sweeps)))
  dirs = [workdir / folder for folder, _ in planned]
  runs.train_and_evaluate_runs([c for _, c in planned], [str(d) for d in dirs])
  return dirs


def _losses(workdir, task: int, phase: str) -> list[float]:
  """The epoch losses of one phase of one task, from the run's metrics.jsonl."""
  with open(Path(workdir) / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return [
    r["loss"] for r in records if (r.get("task"), r.get("phase")) == (task, phase) and "loss" in r
  ]


def test_smoke_runs_in_one_program_equal_each_run_alone(tmp_path):
  # Mask bias 1.0, as every fidelity run: at the framework's default mask init the smoke
  # config amplifies float rounding (seed 48 alone scores ACC 0.970 on two CPU devices and
  # 0.943 on one), beyond the tolerance asked of one program.
  config = smoke.get_config()
  config.mask_bias_init = 1.0
  alone = tmp_path / "alone"
  train.train_and_evaluate(config, str(alone))
  other_seed = config.seed + 1
  dirs = _train(config, tmp_path / "together", [other_seed, config.seed])  # alone's seed: run 1
  assert [d.name for d in dirs] == [f"seed_{other_seed}", f"seed_{config.seed}"]
  together = _results(dirs[1])
  assert together["config"]["seed"] == config.seed
  assert abs(together["acc"] - _results(alone)["acc"]) <= 0.02
  assert np.nanmax(np.abs(_matrix(dirs[1]) - _matrix(alone))) <= 0.05
  # Before rounding differences have been amplified by training, the numbers agree closely.
  for phase in ("feature_extractor", "kb_pretrain"):
    np.testing.assert_allclose(_losses(dirs[1], 0, phase), _losses(alone, 0, phase), rtol=1e-4)
  for d in dirs:  # each run's workdir is a complete single-run workdir
    assert _results(d)["tasks_completed"] == 3
    steps = sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["0", "1", "2"]
    assert (d / "config.json").exists() and (d / "tensorboard").is_dir()
  # Different seeds cut different classes into their tasks: the runs are not copies.
  assert _losses(dirs[0], 0, "feature_extractor") != _losses(dirs[1], 0, "feature_extractor")


@pytest.fixture(scope="module")
def sweep_reference(tmp_path_factory):
  """(workdir, run dirs, seconds) of an uninterrupted tiny sweep: steps 0 and 0.1, seed 0."""
  workdir = tmp_path_factory.mktemp("sweep")
  start = time.perf_counter()
  dirs = _train(tiny_config(), workdir, [0], ["meta_step_size=0,0.1"])
  return workdir, dirs, time.perf_counter() - start


def _kb(run_dir: Path, task: int) -> list:
  mngr = checkpointing.manager(run_dir / "checkpoints")
  run_state, _, _ = checkpointing.restore(mngr, task, abstract_state(tiny_config()))
  return jax.tree.leaves(run_state["knowledge_base"])


def test_a_zero_step_keeps_the_kb_of_task_0_and_a_larger_one_moves_it(sweep_reference):
  _, dirs, _ = sweep_reference
  assert [str(d.relative_to(d.parent.parent)) for d in dirs] == [
    "meta_step_size=0.0/seed_0",
    "meta_step_size=0.1/seed_0",
  ]
  for d in dirs:
    first, last = _kb(d, 0), _kb(d, 2)
    same = all(np.array_equal(a, b) for a, b in zip(first, last, strict=True))
    assert same == d.parent.name.endswith("=0.0"), d


def test_killed_runs_resume_to_the_uninterrupted_numbers(sweep_reference, cached_env, tmp_path):
  """SIGKILL at a random moment of a launch, then a relaunch: every run as uninterrupted.

  The killed launch compiles from scratch (a killed process must not write the compilation
  cache); the relaunch loads what the reference compiled.
  """
  reference_dir, reference_dirs, seconds = sweep_reference
  workdir = tmp_path / "sweep"
  flags = [f"--config.{k}={v}" for k, v in _tiny_flags().items()]
  command = [
    sys.executable,
    "launch.py",
    "--config=configs/smoke.py",
    f"--workdir={workdir}",
    "--seeds=0",
    "--sweep=meta_step_size=0,0.1",
    "--config.runs_in_one_program=True",
    *flags,
  ]
  delay = random.Random(KILL_SEED).uniform(0.3, 0.9) * seconds
  uncached = {k: v for k, v in cached_env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  with open(tmp_path / "killed.log", "w") as log:
    process = subprocess.Popen(
      command, cwd=ROOT, env=uncached, stdout=log, stderr=subprocess.STDOUT
    )
    try:
      process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
      process.kill()
  assert process.wait() == -signal.SIGKILL, f"finished before the kill at {delay:.1f}s"
  completed = subprocess.run(
    command, cwd=ROOT, env=cached_env, capture_output=True, text=True, timeout=600
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  for ref in reference_dirs:
    resumed = workdir / ref.relative_to(reference_dir)
    np.testing.assert_array_equal(_matrix(resumed), _matrix(ref))


def _tiny_flags() -> dict:
  from mark_jax.runtime import workdir as workdir_lib

  wanted = workdir_lib.flatten_config(tiny_config().to_dict())
  base = workdir_lib.flatten_config(smoke.get_config().to_dict())
  return {k: v for k, v in sorted(wanted.items()) if v != base[k]}


def test_runs_saved_at_different_tasks_resume_together(sweep_reference, tmp_path):
  """A kill between two runs' saves: the run behind retrains, the one ahead keeps its files."""
  reference_dir, reference_dirs, _ = sweep_reference
  workdir = tmp_path / "copy"
  shutil.copytree(reference_dir, workdir)
  behind = workdir / reference_dirs[1].relative_to(reference_dir)
  mngr = checkpointing.manager(behind / "checkpoints")
  shutil.rmtree(behind / "checkpoints" / "2")
  mngr.reload()
  dirs = _train(tiny_config(), workdir, [0], ["meta_step_size=0,0.1"])
  for d, ref in zip(dirs, reference_dirs, strict=True):
    np.testing.assert_array_equal(_matrix(d), _matrix(ref))


def test_a_diverging_run_stops_alone(tmp_path):
  config = tiny_config(max_tasks=1)
  dirs = _train(config, tmp_path, [0], ["inner_learning_rate=0.01,1e12"])
  diverged, healthy = _results(dirs[1]), _results(dirs[0])
  assert healthy["tasks_completed"] == 1 and "stopped" not in healthy
  assert diverged["tasks_completed"] == 0
  assert diverged["stopped"].startswith("task 0, metalearning round 1")
  assert not (dirs[1] / "checkpoints" / "0").exists()
  # A relaunch leaves the stopped run out, keeps its record and resumes the other.
  again = _train(config, tmp_path, [0], ["inner_learning_rate=0.01,1e12"])
  assert again == dirs
  assert (
    _results(dirs[1]) == diverged
    and _results(dirs[0])["accuracy_matrix"] == (healthy["accuracy_matrix"])
  )


def test_seeds_cross_every_swept_value_in_folders_named_by_the_values():
  config = tiny_config()
  sweeps = runs.parse_sweeps(config, ["meta_sign=paper,authors", "inner_learning_rate=0.1"])
  planned = runs.expand(config, [48, 49], sweeps)
  assert [folder for folder, _ in planned] == [
    "meta_sign=paper,inner_learning_rate=0.1/seed_48",
    "meta_sign=paper,inner_learning_rate=0.1/seed_49",
    "meta_sign=authors,inner_learning_rate=0.1/seed_48",
    "meta_sign=authors,inner_learning_rate=0.1/seed_49",
  ]
  assert [(c.meta_sign, c.inner_learning_rate, c.seed) for _, c in planned][2] == (
    "authors",
    0.1,
    48,
  )


@pytest.mark.parametrize(
  "sweep, message",
  [
    ("learning_rate=0.1,0.2", "only the step sizes of a metalearning round"),
    ("meta_step_size", "expected KEY=V1,V2"),
    ("meta_step_size=fast", "must be of type float"),
  ],
)
def test_bad_sweeps_are_refused(sweep, message):
  with pytest.raises(ConfigError, match=message):
    runs.parse_sweeps(tiny_config(), [sweep])


def test_runs_that_differ_in_structure_are_refused():
  configs = [tiny_config(), tiny_config(seed=1, use_masks=False, use_feature_extractor=False)]
  with pytest.raises(ConfigError, match="these differ: use_feature_extractor, use_masks"):
    runs.check_configs(configs)

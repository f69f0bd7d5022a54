"""Runs on a leading run axis (mark_jax.runs): equal to runs alone, resumable, stopped alone."""

import json
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from mark_jax import programs, runs
from mark_jax.runtime import checkpointing
from mark_jax.runtime.errors import ConfigError

from tiny import (
  ROOT,
  abstract_state,
  checkpoint_digests,
  damage_checkpoint,
  epoch_losses,
  kill_during_task_1,
  launch_command,
  lowered_programs,
  read_results,
  tiny_config,
  tiny_flags,
)

KILL_SEED = 3


def _matrix(workdir) -> np.ndarray:
  rows = read_results(workdir)["accuracy_matrix"]
  return np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _train(config, workdir: Path, seeds, sweeps=()) -> list[Path]:
  planned = runs.expand(config, list(seeds), runs.parse_sweeps(config, list(sweeps)))
  dirs = [workdir / folder for folder, _ in planned]
  runs.train_and_evaluate_runs([c for _, c in planned], [str(d) for d in dirs])
  return dirs


SEEDS = [49, 48]  # the reference's seed as run 1
DIVERGING = tiny_config(meta_step_size=0.0, epochs=1)  # the epochs change no program


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory) -> tuple[Path, list[Path], list[str]]:
  """(workdir, run dirs, names of the programs lowered) of tiny_config() with two seeds as
  one program, uninterrupted."""
  workdir = tmp_path_factory.mktemp("seeds")
  programs.forget_programs()  # its own programs, lowered (and counted) by this run
  with lowered_programs() as lowered:
    dirs = _train(tiny_config(), workdir, SEEDS)
  return workdir, dirs, lowered


@pytest.fixture(scope="module")
def diverging_runs(tmp_path_factory) -> tuple[list[Path], list[dict]]:
  """(run dirs, results) of a KB frozen by a zero Reptile step, with inner learning rates
  0.01 and 1e12 (which diverges) as one program; one epoch per phase."""
  workdir = tmp_path_factory.mktemp("diverging")
  dirs = _train(DIVERGING, workdir, [0], ["inner_learning_rate=0.01,1e12"])
  return dirs, [read_results(d) for d in dirs]


def test_runs_in_one_program_equal_each_run_alone(reference, seed_runs):
  alone = reference.workdir
  _, dirs, _ = seed_runs
  assert [d.name for d in dirs] == [f"seed_{seed}" for seed in SEEDS]
  together = read_results(dirs[1])
  assert together["config"]["seed"] == reference.results["config"]["seed"]
  assert abs(together["acc"] - read_results(alone)["acc"]) <= 0.02
  assert np.nanmax(np.abs(_matrix(dirs[1]) - _matrix(alone))) <= 0.05
  # Before rounding differences have been amplified by training, the numbers agree closely.
  for phase in ("feature_extractor", "kb_pretrain"):
    np.testing.assert_allclose(
      epoch_losses(dirs[1], phase, 0), epoch_losses(alone, phase, 0), rtol=1e-4
    )
  for d in dirs:  # each run's workdir is a complete single-run workdir
    assert read_results(d)["tasks_completed"] == 3
    steps = sorted(p.name for p in (d / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["0", "1", "2"]
    assert (d / "config.json").exists() and (d / "tensorboard").is_dir()
  # Different seeds cut different classes into their tasks: the runs are not copies.
  assert epoch_losses(dirs[0], "feature_extractor", 0) != epoch_losses(
    dirs[1], "feature_extractor", 0
  )


def _kb(run_dir: Path, task: int) -> list:
  mngr = checkpointing.manager(run_dir / "checkpoints")
  run_state, _, _ = checkpointing.restore(mngr, task, abstract_state(tiny_config()))
  return jax.tree.leaves(run_state["knowledge_base"])


def test_each_epoch_program_compiles_once(seed_runs):
  """tiny_config() trains three epoch programs (F^t, KB pretraining, masks; consolidation
  reuses the masks'): each is lowered once, though the runs' phase state is built outside
  jit before its first epoch."""
  lowered = seed_runs[2]
  assert lowered.count("jit(run_epoch)") == 3, lowered


def test_a_zero_step_keeps_the_kb_of_task_0_and_a_larger_one_moves_it(seed_runs, diverging_runs):
  (frozen, _), _ = diverging_runs
  moved = seed_runs[1][0]  # the default step, 0.001
  for d, step in ((frozen, 0.0), (moved, 0.001)):
    assert read_results(d)["config"]["meta_step_size"] == step
    first, last = _kb(d, 0), _kb(d, 2)
    same = all(np.array_equal(a, b) for a, b in zip(first, last, strict=True))
    assert same == (step == 0.0), d


def test_killed_runs_resume_to_the_uninterrupted_numbers(seed_runs, killable_env, tmp_path):
  """SIGKILL at a seeded epoch of task 1 (both runs saved task 0), then a relaunch: every run as
  uninterrupted. The killed launch loads its programs from a copy of the compilation cache."""
  reference_dir, reference_dirs, _ = seed_runs
  workdir = tmp_path / "seeds"
  command = launch_command(
    workdir,
    f"--seeds={','.join(map(str, SEEDS))}",
    "--config.runs_in_one_program=True",
    *tiny_flags(),
  )
  run_dirs = [workdir / ref.relative_to(reference_dir) for ref in reference_dirs]
  with open(tmp_path / "killed.log", "w") as log:
    process = subprocess.Popen(
      command, cwd=ROOT, env=killable_env, stdout=log, stderr=subprocess.STDOUT
    )
    saved = kill_during_task_1(process, run_dirs, tmp_path / "killed.log", KILL_SEED)
  assert 0 in saved and 2 not in saved, saved
  completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  for resumed, ref in zip(run_dirs, reference_dirs, strict=True):
    np.testing.assert_array_equal(_matrix(resumed), _matrix(ref))


def _files(run_dir: Path) -> dict[str, bytes]:
  return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
  "lost", ["every_task", "task_2_and_a_damaged_task_1", "task_2_and_results_ahead"]
)
def test_runs_saved_at_different_tasks_resume_together(seed_runs, tmp_path, lost):
  """A run behind (it lost checkpoints, or one is damaged) catches up with the run ahead,
  whose files stay as its checkpoints hold them (a results.json one task behind them, left
  by a kill between the two writes, is brought up to them); both end as uninterrupted.

  The run ahead keeps its results.json untouched in the first two cases and has it
  rewritten in the third, where the run behind lost task 2 alone."""
  reference_dir, reference_dirs, _ = seed_runs
  workdir = tmp_path / "copy"
  shutil.copytree(reference_dir, workdir)
  ahead, behind = (workdir / d.relative_to(reference_dir) for d in reference_dirs)
  for task in ("2", "1", "0") if lost == "every_task" else ("2",):
    shutil.rmtree(behind / "checkpoints" / task)
  if lost == "task_2_and_a_damaged_task_1":
    damage_checkpoint(behind / "checkpoints" / "1")
  files_ahead = _files(ahead)
  if lost == "task_2_and_results_ahead":  # as they were before task 2 was written
    stale = read_results(ahead)
    stale.update(tasks_completed=2, wall_seconds=stale["wall_seconds"] / 2)
    stale["accuracy_matrix"][2] = [None, None, None]
    (ahead / "results.json").write_text(json.dumps(stale))
  dirs = _train(tiny_config(), workdir, SEEDS)
  assert dirs == [ahead, behind]
  assert _files(ahead) == files_ahead
  for d, ref in zip(dirs, reference_dirs, strict=True):
    np.testing.assert_array_equal(_matrix(d), _matrix(ref))
  assert checkpoint_digests(behind) == checkpoint_digests(reference_dirs[1])
  assert (behind / "damaged_checkpoints").exists() == (lost == "task_2_and_a_damaged_task_1")


def test_a_diverging_run_stops_alone(diverging_runs, tmp_path):
  dirs, (healthy, diverged) = diverging_runs
  assert healthy["tasks_completed"] == 3 and "stopped" not in healthy
  assert diverged["tasks_completed"] == 0
  assert diverged["stopped"].startswith("task 0, metalearning round 1")
  assert not (dirs[1] / "checkpoints" / "0").exists()
  # A relaunch leaves the stopped run out, keeps its record and resumes the other.
  workdir = tmp_path / "copy"
  shutil.copytree(dirs[0].parent.parent, workdir)
  copies = [workdir / d.relative_to(dirs[0].parent.parent) for d in dirs]
  shutil.rmtree(copies[0] / "checkpoints" / "2")
  again = _train(DIVERGING, workdir, [0], ["inner_learning_rate=0.01,1e12"])
  assert again == copies
  assert read_results(copies[1]) == diverged
  assert read_results(copies[0])["accuracy_matrix"] == healthy["accuracy_matrix"]


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
  with pytest.raises(ConfigError, match="differ in: use_feature_extractor .*, use_masks"):
    runs.check_configs(configs)


def test_runs_in_one_program_refuse_several_passes():
  with pytest.raises(ConfigError, match="--config.passes=2: runs in one program make one pass"):
    runs.check_configs([tiny_config(passes=2), tiny_config(seed=1, passes=2)])


def test_runs_that_differ_once_an_old_workdir_fills_its_keys_are_refused(tmp_path):
  """seed_48 was started before config.feature_bn_statistics existed, so it goes on with
  'running'; seed_49 would start with today's default: one program cannot serve both."""
  old = json.loads(tiny_config(seed=48).to_json_best_effort())
  del old["feature_bn_statistics"]
  (tmp_path / "seed_48").mkdir()
  (tmp_path / "seed_48" / "config.json").write_text(json.dumps(old))
  workdirs = [str(tmp_path / "seed_48"), str(tmp_path / "seed_49")]
  with pytest.raises(ConfigError) as error:
    runs.train_and_evaluate_runs([tiny_config(seed=48), tiny_config(seed=49)], workdirs)
  message = str(error.value)
  assert "\n" not in message and all(w in message for w in workdirs), message
  assert "feature_bn_statistics ('running' vs 'recomputed')" in message, message
  assert not (tmp_path / "seed_49").exists()

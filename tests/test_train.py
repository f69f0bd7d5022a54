"""End-to-end runs (mark_jax.train): results, checkpoints, resume, branching, the CLI."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import smoke
from mark_jax import train
from mark_jax.runtime import checkpointing, errors

from tiny import abstract_state, fresh_run, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_smoke_run_learns(smoke_run):
  workdir, results = smoke_run
  assert results["tasks_completed"] == 3
  assert results["acc"] >= 0.6
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  matrix = written["accuracy_matrix"]
  assert matrix[0][1] is None and matrix[0][2] is None and matrix[1][2] is None
  assert written["acc"] == pytest.approx(np.mean(matrix[-1]))
  assert written["config"]["dataset"] == "synthetic"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "1", "2"]


def test_resume_after_interruption_equals_uninterrupted(smoke_run, copy_workdir):
  workdir, results = smoke_run
  resumed_dir = copy_workdir(workdir)
  # The disk as a kill during task 2 leaves it: checkpoints of tasks 0 and 1 only.
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "2"))
  os.remove(os.path.join(resumed_dir, "results.json"))
  resumed = train.train_and_evaluate(smoke.get_config(), resumed_dir)
  assert resumed["accuracy_matrix"] == results["accuracy_matrix"]
  assert resumed["acc"] == results["acc"] and resumed["bwt"] == results["bwt"]
  # The wall time counts the first session's tasks 0 and 1 too, as checkpointed.
  mngr = checkpointing.manager(os.path.join(resumed_dir, "checkpoints"))
  saved = mngr.restore(1, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
  assert 0 < saved["wall_seconds"] < resumed["wall_seconds"]


def test_restore_task_branches_into_a_new_workdir(smoke_run, tmp_path):
  workdir, results = smoke_run
  config = smoke.get_config()
  config.restore_task = 0
  config.restore_dir = workdir
  branched = train.train_and_evaluate(config, str(tmp_path / "branch"))
  assert branched["accuracy_matrix"] == results["accuracy_matrix"]


def test_restore_task_refuses_to_mix_with_later_checkpoints(smoke_run, copy_workdir):
  workdir, _ = smoke_run
  config = smoke.get_config()
  config.restore_task = 0
  with pytest.raises(errors.CheckpointError, match="--config.restore_dir"):
    train.train_and_evaluate(config, copy_workdir(workdir))


def test_checkpoint_round_trip(tmp_path):
  _, _, state = fresh_run(tiny_config())
  matrix = np.full((3, 3), np.nan)
  matrix[0, 0], matrix[1, :2] = 0.5, [0.25, 0.75]
  mngr = checkpointing.manager(str(tmp_path / "ckpt"))
  checkpointing.save(mngr, 1, state, matrix, wall_seconds=12.5)
  abstract = abstract_state(tiny_config())
  restored, restored_matrix, wall_seconds = checkpointing.restore(mngr, 1, abstract)
  _assert_same(state, restored)
  np.testing.assert_array_equal(restored_matrix, matrix)
  assert wall_seconds == 12.5
  with pytest.raises(errors.CheckpointError, match="no checkpoint for task 5"):
    checkpointing.restore(mngr, 5, abstract)


def test_cifar100_end_to_end_on_tfds_mock_data(tmp_path):
  config = tiny_config(dataset="cifar100", max_tasks=2, validation_fraction=0.15)
  with tfds.testing.mock_data(num_examples=400):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results["tasks_completed"] == 2
  assert len(results["accuracy_matrix"]) == 2 and len(results["accuracy_matrix"][0]) == 2
  assert 0.0 <= results["acc"] <= 1.0 and np.isfinite(results["bwt"])


def test_cli_reports_a_bad_dataset_in_one_line(tmp_path):
  command = [
    sys.executable,
    "launch.py",
    "--config=configs/smoke.py",
    f"--workdir={tmp_path}",
    "--config.dataset=nope",
  ]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-2:] == [
    "error: the config has 1 problem(s):",
    "  --config.dataset='nope': must be one of: cifar100, digits, miniimagenet, synthetic",
  ]

"""End-to-end runs (mark_jax.train): results, checkpoints, resume, branching, the CLI."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from mark_jax import programs, train
from mark_jax.data import datasets
from mark_jax.runtime import checkpointing, errors

from tiny import abstract_state, checkpoint_digests, fresh_run, lowered_programs, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_tiny_run_learns(reference):
  workdir, results = str(reference.workdir), reference.results
  assert results["tasks_completed"] == 3
  assert results["acc"] >= 0.6
  with open(os.path.join(workdir, "results.json")) as f:
    written = json.load(f)
  matrix = written["accuracy_matrix"]
  assert matrix[0][1] is None and matrix[0][2] is None and matrix[1][2] is None
  assert written["acc"] == pytest.approx(np.mean(matrix[-1]))
  assert written["config"]["dataset"] == "synthetic"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "1", "2"]


def test_resume_after_interruption_equals_uninterrupted(reference, copy_workdir, tmp_path):
  """Resumed in a process where a run of another seed and epoch count ran first: the resumed
  run reuses that run's programs (it lowers no phase program) and ends as the reference,
  whose programs were built afresh, bit for bit."""
  workdir, results = str(reference.workdir), reference.results
  resumed_dir = copy_workdir(workdir)
  # The disk as a kill during task 2 leaves it: checkpoints of tasks 0 and 1 only.
  shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "2"))
  os.remove(os.path.join(resumed_dir, "results.json"))
  train.train_and_evaluate(tiny_config(seed=5, epochs=1), str(tmp_path / "other"))
  with lowered_programs() as lowered:
    resumed = train.train_and_evaluate(tiny_config(), resumed_dir)
  assert not {"jit(run_epoch)", "jit(meta_round)", "jit(evaluate_all)"} & set(lowered), lowered
  assert checkpoint_digests(Path(resumed_dir)) == reference.digests
  assert resumed["accuracy_matrix"] == results["accuracy_matrix"]
  assert resumed["acc"] == results["acc"] and resumed["bwt"] == results["bwt"]
  # The wall time counts the first session's tasks 0 and 1 too, as checkpointed.
  mngr = checkpointing.manager(os.path.join(resumed_dir, "checkpoints"))
  saved = mngr.restore(1, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
  assert 0 < saved["wall_seconds"] < resumed["wall_seconds"]


def test_programs_are_reused_only_for_the_same_signature():
  config = tiny_config()
  benchmark = datasets.load_benchmark(config)
  built = programs.build_programs(config, benchmark)
  again = tiny_config(seed=7, epochs=1, meta_rounds=2, data_dir="/elsewhere")
  assert programs.build_programs(again, benchmark) is built
  for changed in (dict(learning_rate=0.5), dict(inner_steps=2), dict(batch_size=8)):
    assert programs.build_programs(tiny_config(**changed), benchmark) is not built, changed
  assert programs.build_programs(config, benchmark, runs=2) is not built
  other_data = dataclasses.replace(benchmark, mean=(0.0, 0.0, 0.0))
  assert programs.build_programs(config, other_data) is not built
  assert programs.build_programs(config, benchmark) is built  # still kept


def test_relaunching_a_finished_run_changes_nothing(reference, copy_workdir):
  workdir = copy_workdir(str(reference.workdir))
  results = train.train_and_evaluate(tiny_config(), workdir)
  assert results["wall_seconds"] == reference.results["wall_seconds"]
  assert json.loads((Path(workdir) / "results.json").read_text()) == reference.results


def test_a_second_pass_continues_the_first_and_resumes_within_itself(reference, tmp_path):
  """passes=2 branched from the reference's last task (one pass of three tasks): tasks 3-5
  are the second pass over tasks 0-2, each pass keeps its own matrix, ACC and BWT are the
  second pass's; a relaunch after losing task 5 ends as uninterrupted."""
  config = tiny_config(passes=2, restore_task=2, restore_dir=str(reference.workdir))
  workdir = tmp_path / "two_passes"
  results = train.train_and_evaluate(config, str(workdir))
  first, second = results["accuracy_matrix_per_pass"]
  assert first == reference.results["accuracy_matrix"]
  assert results["passes_begun"] == 2 and results["accuracy_matrix"] == second
  matrix = np.array([[np.nan if v is None else v for v in row] for row in second])
  assert np.all(np.isfinite(np.tril(matrix))) and np.all(np.isnan(matrix[np.triu_indices(3, 1)]))
  assert results["acc"] == pytest.approx(np.mean(matrix[-1]))
  assert sorted(checkpoint_digests(workdir)) == [3, 4, 5]

  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "5")
  again = train.train_and_evaluate(tiny_config(passes=2), str(resumed))
  assert again["accuracy_matrix_per_pass"] == results["accuracy_matrix_per_pass"]
  assert checkpoint_digests(resumed)[5] == checkpoint_digests(workdir)[5]


def test_restore_task_branches_into_a_new_workdir(reference, tmp_path):
  workdir, results = str(reference.workdir), reference.results
  config = tiny_config()
  config.restore_task = 0
  config.restore_dir = workdir
  branched = train.train_and_evaluate(config, str(tmp_path / "branch"))
  assert branched["accuracy_matrix"] == results["accuracy_matrix"]


@pytest.mark.parametrize("restore_dir", [None, "the workdir", "the workdir/"])
def test_restore_task_refuses_to_mix_with_later_checkpoints(reference, copy_workdir, restore_dir):
  workdir = copy_workdir(str(reference.workdir))
  config = tiny_config()
  config.restore_task = 0
  if restore_dir:
    config.restore_dir = restore_dir.replace("the workdir", workdir)
  with pytest.raises(errors.CheckpointError, match="already has checkpoints after task 0"):
    train.train_and_evaluate(config, workdir)
  assert checkpoint_digests(Path(workdir)) == reference.digests


def test_a_checkpoint_that_is_not_written_is_an_error(tmp_path):
  _, _, state = fresh_run(tiny_config())
  mngr = checkpointing.manager(str(tmp_path / "ckpt"))
  checkpointing.save(mngr, 2, state, np.full((3, 3), np.nan))
  with pytest.raises(errors.CheckpointError, match="task 1 was not saved"):
    checkpointing.save(mngr, 1, state, np.full((3, 3), np.nan))
  assert mngr.all_steps() == [2]


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


def _cifar100_like_source(builder, split, **kwargs):
  """tfds.data_source's records for the mocked CIFAR-100: tiny_config()'s images per class,
  so that the run loads the programs the reference compiled."""
  del builder, kwargs
  config = tiny_config().synthetic
  train_split, test_split = datasets.synthetic_splits(
    num_classes=100,
    train_per_class=config.train_per_class,
    test_per_class=config.test_per_class,
    image_size=32,
    seed=0,
  )
  chosen = train_split if split == "train" else test_split
  return [{"image": x, "label": y} for x, y in zip(chosen.images, chosen.labels, strict=True)]


def test_cifar100_end_to_end_on_tfds_mock_data(reference, tmp_path):
  config = tiny_config(dataset="cifar100", max_tasks=3)
  with tfds.testing.mock_data(as_data_source_fn=_cifar100_like_source):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results["tasks_completed"] == 3
  assert len(results["accuracy_matrix"]) == 3 and len(results["accuracy_matrix"][0]) == 3
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
    "  --config.dataset='nope': must be one of: "
    "cifar100, digits, imagenet, miniimagenet, synthetic",
  ]

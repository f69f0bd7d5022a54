"""Faults a long run meets: kills, signals, damaged checkpoints, bad configs, data and workdirs.

One uninterrupted in-process run of the tiny config is the reference; every recovered run
must end with its accuracy matrix, ACC, BWT and, bit for bit, its checkpointed states.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import types
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from mark_jax import mark, train
from mark_jax.data import datasets
from mark_jax.data.tasks import Split
from mark_jax.runtime import checkpointing, errors
from mark_jax.runtime import workdir as workdir_lib

from tiny import (
  ROOT,
  abstract_state,
  checkpoint_digests,
  final_numbers,
  kill_during_task_1,
  largest_array_file,
  launch_command,
  read_results,
  tiny_config,
  tiny_flags,
)

KILL_SEED = 5


def file_sizes(root: Path) -> dict[str, int]:
  """Relative path -> size of every file under `root`."""
  return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def finished_copy(reference, copy_workdir) -> Path:
  """A copy of the reference's finished workdir."""
  return Path(copy_workdir(str(reference.workdir)))


def damage_warnings(caplog) -> list[str]:
  return [
    record.getMessage()
    for record in caplog.records
    if record.levelno == logging.WARNING and "is damaged" in record.getMessage()
  ]


def moved_checkpoints(workdir: Path) -> dict[int, Path]:
  """Task -> its checkpoint's directory in damaged_checkpoints/."""
  moved = sorted((workdir / "damaged_checkpoints").iterdir())
  return {int(path.name.split("-")[0]): path for path in moved}


# Kills and signals (subprocesses of launch.py).


def terminate_at_line(
  command: list[str], env: dict[str, str], marker: str, timeout: float
) -> tuple[int, list[str]]:
  """Runs `command`, sends SIGTERM once a stderr line contains `marker`.

  Returns:
    (exit code, stderr lines).
  """
  process = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  watchdog = threading.Timer(timeout, process.kill)
  watchdog.start()
  lines, signalled = [], False
  try:
    for line in process.stderr:
      lines.append(line.rstrip("\n"))
      if marker in line and not signalled:
        process.send_signal(signal.SIGTERM)
        signalled = True
  finally:
    watchdog.cancel()
  return process.wait(), lines


def test_terminated_then_killed_run_resumes_to_the_reference(reference, killable_env, tmp_path):
  """SIGTERM at the first epoch, SIGKILL at a seeded epoch of task 1, a relaunch.

  Each launch loads the programs the reference compiled; the killed one from a copy of the
  compilation cache.
  """
  workdir = tmp_path / "run"
  command = launch_command(workdir, *tiny_flags())

  code, lines = terminate_at_line(command, os.environ, "epoch 1/", timeout=300)
  assert code == 128 + signal.SIGTERM, "\n".join(lines[-20:])
  assert lines[-1].startswith("error: stopped by SIGTERM during task 0 ")
  assert lines[-1].endswith("relaunch the same command to resume from the start")
  assert not any("Traceback" in line for line in lines)
  assert read_results(workdir)["tasks_completed"] == 0

  with open(tmp_path / "killed.log", "w") as log:
    process = subprocess.Popen(
      command, cwd=ROOT, env=killable_env, stdout=log, stderr=subprocess.STDOUT
    )
    saved = kill_during_task_1(process, [workdir], tmp_path / "killed.log", KILL_SEED)
  assert 0 in saved and 2 not in saved, saved

  completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert f"Resuming after task {saved[-1]}" in completed.stderr
  reference.assert_matches(workdir)


# Damaged checkpoints (in-process relaunches of a finished tiny run).


def test_truncated_and_incomplete_checkpoints_are_moved_aside_and_retrained(
  reference, finished_copy, caplog
):
  workdir = finished_copy
  truncated = largest_array_file(workdir / "checkpoints" / "2")
  os.truncate(truncated, truncated.stat().st_size // 2)
  (workdir / "checkpoints" / "1" / "metadata" / "metadata").unlink()
  before = file_sizes(workdir)

  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(tiny_config(), str(workdir))

  warnings = damage_warnings(caplog)
  assert len(warnings) == 2, warnings
  assert "checkpoint of task 2 " in warnings[0] and "checkpoint of task 1 " in warnings[1]
  moved = moved_checkpoints(workdir)
  assert sorted(moved) == [1, 2]
  reference.assert_matches(workdir)
  # Nothing is deleted: damaged checkpoints are moved unchanged, the other files stay.
  after = file_sizes(workdir)
  for path, size in before.items():
    task = path.split("/")[1] if path.startswith("checkpoints/") else None
    if task in ("1", "2"):
      moved_path = moved[int(task)].relative_to(workdir) / path.removeprefix(f"checkpoints/{task}/")
      assert after.get(str(moved_path)) == size, path
    elif task is not None:
      assert after.get(path) == size, path
    else:
      assert path in after, path


def test_altered_checkpoint_is_detected_and_passed_over(reference, finished_copy, caplog):
  workdir = finished_copy
  altered = largest_array_file(workdir / "checkpoints" / "2")
  size = altered.stat().st_size
  with open(altered, "r+b") as f:
    f.seek(size // 2)
    flipped = bytes(b ^ 0xFF for b in f.read(64))
    f.seek(size // 2)
    f.write(flipped)
  assert altered.stat().st_size == size
  abstract = abstract_state(tiny_config())

  with caplog.at_level(logging.WARNING):
    mngr = checkpointing.manager(workdir / "checkpoints")
    task, state, matrix, _ = checkpointing.restore_latest(mngr, abstract)

  assert task == 1 and checkpointing.state_digest(state) == reference.digests[1]
  expected_rows = np.array(reference.results["accuracy_matrix"][:2], dtype=np.float64)
  np.testing.assert_array_equal(matrix[:2], expected_rows)
  warnings = damage_warnings(caplog)
  assert len(warnings) == 1 and "checkpoint of task 2 " in warnings[0], warnings
  assert list(moved_checkpoints(workdir)) == [2]
  assert sorted(mngr.all_steps()) == [0, 1]


def test_unfinished_orbax_directories_are_ignored_and_kept(reference, finished_copy):
  workdir = finished_copy
  checkpoints = workdir / "checkpoints"
  unfinished = [
    checkpoints / f"3{ocp.path.step.TMP_DIR_SUFFIX}",
    checkpoints / f"3{ocp.path.step.TMP_DIR_SUFFIX}-1234567890",
  ]
  for path in unfinished:
    shutil.copytree(checkpoints / "2", path)
  before = {path: file_sizes(path) for path in unfinished}

  results = train.train_and_evaluate(tiny_config(), str(workdir))

  assert results["tasks_completed"] == 3
  reference.assert_matches(workdir)
  assert {path: file_sizes(path) for path in unfinished} == before
  assert not (workdir / "damaged_checkpoints").exists()


# Config changes between launches.


def test_another_config_is_refused_unless_allowed(reference, finished_copy, monkeypatch):
  workdir = finished_copy
  with monkeypatch.context() as patch:
    patch.setattr(datasets, "load_benchmark", lambda config: pytest.fail("data loaded"))
    with pytest.raises(errors.WorkdirError) as refused:
      train.train_and_evaluate(tiny_config(epochs=4), str(workdir))
  message = str(refused.value)
  assert "epochs: 5 -> 4" in message and "--allow_config_change" in message
  assert "\n" not in message

  moved_data = train.train_and_evaluate(tiny_config(data_dir="/elsewhere"), str(workdir))
  assert final_numbers(moved_data) == final_numbers(reference.results)
  assert not list(workdir.glob("config.before-*.json"))

  forced = train.train_and_evaluate(tiny_config(epochs=4), str(workdir), allow_config_change=True)
  assert final_numbers(forced) == final_numbers(reference.results)
  (kept,) = workdir.glob("config.before-*.json")
  assert json.loads(kept.read_text())["epochs"] == 5
  assert json.loads((workdir / "config.json").read_text())["epochs"] == 4


def test_a_forced_change_of_the_state_shapes_keeps_the_checkpoints(finished_copy):
  workdir = finished_copy
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(errors.WorkdirError, match="other shapes") as refused:
    train.train_and_evaluate(tiny_config(max_tasks=2), str(workdir), allow_config_change=True)
  assert "max_tasks" in str(refused.value) and "\n" not in str(refused.value)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
  assert not (workdir / "damaged_checkpoints").exists()


def test_keys_added_since_a_run_started_take_the_values_it_ran_with(tmp_path):
  started = tiny_config().to_dict()
  for key in ("feature_bn_statistics", "no_own_features_lr_factor", "cpu_devices"):
    del started[key]  # a workdir started before these keys existed
  (tmp_path / "config.json").write_text(json.dumps(started))
  config = tiny_config(feature_bn_statistics="recomputed", cpu_devices=2)
  workdir_lib.check_config(epath.Path(tmp_path), config, False, True)
  assert config.feature_bn_statistics == "running"  # as before the key existed
  assert config.no_own_features_lr_factor == 1.0
  assert config.cpu_devices == 2  # devices may change on any resume
  assert "feature_bn_statistics" not in json.loads((tmp_path / "config.json").read_text())
  with pytest.raises(errors.WorkdirError, match="seed"):
    workdir_lib.check_config(epath.Path(tmp_path), tiny_config(seed=7), False, True)


def test_every_replaced_config_is_kept(tmp_path, monkeypatch):
  one_second = types.SimpleNamespace(strftime=lambda fmt: "20260101T000000")
  monkeypatch.setattr(workdir_lib, "time", one_second)
  for epochs in (1, 2, 3):
    workdir_lib.check_config(epath.Path(tmp_path), tiny_config(epochs=epochs), True, True)
  kept = [json.loads(p.read_text())["epochs"] for p in tmp_path.glob("config.before-*.json")]
  assert sorted(kept) == [1, 2]


def test_cli_reports_every_config_problem_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  command = launch_command(workdir, "--config.batch_size=0", "--config.momentum=2.0")
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  seconds = time.perf_counter() - start

  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert "error: the config has 2 problem(s):" in lines
  for flag in ("--config.batch_size=0:", "--config.momentum=2.0:"):
    (line,) = [line for line in lines if flag in line]
    assert line.strip().startswith(flag) and "must be" in line
  assert "Traceback" not in result.stderr
  assert seconds < 20, f"took {seconds:.0f}s: something was compiled or loaded"
  assert not workdir.exists()


# Bad data (a fake loader in place of the synthetic one).


def _out_of_range_labels(train_split, test_split):
  labels = test_split.labels.copy()
  labels[3] = 15
  return train_split, Split(test_split.images, labels)


def _rectangular_images(train_split, test_split):
  return Split(train_split.images[:, :, :30], train_split.labels), test_split


def _grey_images(train_split, test_split):
  return Split(train_split.images[..., :1], train_split.labels), test_split


def _nan_pixels(train_split, test_split):
  images = test_split.images.astype(np.float32)
  images[0, 5, 5, 1] = np.nan
  return train_split, Split(images, test_split.labels)


def _few_training_images(train_split, test_split):
  keep = np.concatenate([np.flatnonzero(train_split.labels == c)[:3] for c in range(15)])
  return Split(train_split.images[keep], train_split.labels[keep]), test_split


@pytest.mark.parametrize(
  "damage, where, what",
  [
    (_out_of_range_labels, "synthetic test split", "labels must lie in 0..14, found 0..15"),
    (_rectangular_images, "synthetic train split", "expected square RGB images"),
    (_grey_images, "synthetic train split", "expected square RGB images"),
    (_nan_pixels, "synthetic test split", "1 pixel values are not finite"),
    (_few_training_images, "task 0 of 'synthetic'", "fewer than --config.batch_size=16"),
  ],
)
def test_bad_data_is_reported_in_one_line(monkeypatch, damage, where, what):
  def fake_loader(config):
    splits = datasets.synthetic_splits(
      num_classes=15, train_per_class=16, test_per_class=8, image_size=32, seed=0
    )
    return damage(*splits)

  monkeypatch.setitem(datasets.LOADERS, "synthetic", fake_loader)
  with pytest.raises(errors.DataError) as failure:
    datasets.load_benchmark(tiny_config())
  message = str(failure.value)
  assert message.startswith(where) and what in message and "\n" not in message, message


# Numerical faults.


def test_nonfinite_loss_stops_the_task_without_saving_it(reference, finished_copy, tmp_path):
  workdir = finished_copy
  for task in ("1", "2"):
    shutil.move(workdir / "checkpoints" / task, tmp_path / f"checkpoint_{task}")
  checkpoint_0 = file_sizes(workdir / "checkpoints" / "0")

  with pytest.raises(errors.TrainingError) as failure:
    train.train_and_evaluate(
      tiny_config(learning_rate=1e30), str(workdir), allow_config_change=True
    )

  message = str(failure.value)
  found = re.search(r"^task 1, feature_extractor epoch 1, step (\d+): the loss is not", message)
  assert found, message
  config = tiny_config()
  steps_per_epoch = -(-len(datasets.load_benchmark(config).tasks[1].train) // config.batch_size)
  assert 1 <= int(found.group(1)) <= steps_per_epoch
  assert "resumes after task 0" in message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["0"]
  assert file_sizes(workdir / "checkpoints" / "0") == checkpoint_0
  assert checkpoint_digests(workdir) == {0: reference.digests[0]}
  assert read_results(workdir)["tasks_completed"] == 1


# Workdir problems.


def test_unwritable_workdir_is_refused_before_loading_data(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, "load_benchmark", lambda config: pytest.fail("data loaded"))
  regular_file = tmp_path / "a_file"
  regular_file.write_text("not a directory")
  with pytest.raises(errors.WorkdirError, match="cannot write to workdir"):
    train.train_and_evaluate(tiny_config(), str(regular_file / "run"))


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
  one_mib_free = types.SimpleNamespace(total=2**30, used=2**30 - 2**20, free=2**20)
  monkeypatch.setattr(workdir_lib.shutil, "disk_usage", lambda path: one_mib_free)
  monkeypatch.setattr(mark, "train_task", lambda *args: pytest.fail("trained"))
  with pytest.raises(errors.WorkdirError, match=r"has 1 MiB free; .* need about \d+ MiB"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()

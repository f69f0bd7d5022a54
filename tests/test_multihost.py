"""Multi-host on one machine: scripts/multihost_local.sh joins two launch.py processes (one
CPU device each) over loopback with jax.distributed, as the hosts of a Cloud TPU slice."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tiny import ROOT, damage_checkpoint, launch_command, read_results, tiny_flags, wait_until

SCRIPT = ROOT / "scripts" / "multihost_local.sh"


def _env() -> dict:
  """The script's environment: this interpreter first on PATH and a short stop grace."""
  env = dict(os.environ)
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
  env["MARK_STOP_GRACE"] = "10"
  return env


def _launch(workdir: Path, env: dict, log) -> subprocess.Popen:
  """Starts the script; every line of both processes goes to the file `log`."""
  command = ["bash", str(SCRIPT), str(workdir), "--config", "configs/smoke.py", *tiny_flags()]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _assert_close(results: dict, reference: dict) -> None:
  """Equal up to float rounding: ACC within 0.02, no accuracy more than 0.05 apart."""
  assert abs(results["acc"] - reference["acc"]) <= 0.02
  ours, theirs = (
    np.array(r["accuracy_matrix"], dtype=float) for r in (results, reference)
  )  # None -> nan
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
  assert np.nanmax(np.abs(ours - theirs)) <= 0.05


def test_two_processes_resume_a_damaged_run_and_a_killed_process_stops_the_other(
  reference, copy_workdir
):
  """The reference's workdir with task 2 lost and task 1's checkpoint damaged: two
  processes move task 1 aside as one process would, resume after task 0 and train task 1.
  Process 1 is then SIGKILLed during task 2 and process 0 stops too. A one-process
  relaunch finishes the run: results equal to the reference up to float rounding.

  The two processes launch once (process 1 compiles every program on each launch: JAX
  writes the persistent cache from process 0 only, and process 1's programs have keys of
  their own); the relaunch loads the reference's programs.
  """
  workdir = Path(copy_workdir(str(reference.workdir)))
  shutil.rmtree(workdir / "checkpoints" / "2")
  damage_checkpoint(workdir / "checkpoints" / "1")
  records_before = len((workdir / "metrics.jsonl").read_text().splitlines())

  log = workdir.parent / "multihost.log"
  with open(log, "w") as log_file:
    process = _launch(workdir, _env(), log_file)
  # Process 1 logs "task 1 done" after task 1's checkpoint is saved: wait for the line itself,
  # with its pid at hand (a tiny task takes a fraction of a second).
  pattern = f"launch.py .*--workdir {workdir} .*--process_id=1"
  found = []

  def find_victim() -> bool:
    listed = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    found[:] = [int(pid) for pid in listed.split()]
    return bool(found)

  wait_until(process, find_victim, "process 1 starting")
  task_1_done = "[process 1 of 2] task 1 done"
  wait_until(process, lambda: task_1_done in log.read_text(), "process 1 finishing task 1")
  (victim,) = found
  os.kill(victim, signal.SIGKILL)
  process.wait(timeout=120)  # the other process must not hang
  output = log.read_text()
  assert process.returncode != 0
  assert (workdir / "damaged_checkpoints").is_dir(), output[-3000:]
  assert "Resuming after task 0" in output
  assert "Traceback" not in output, output[-3000:]  # the process left behind says one line
  assert "process 1 exited with status" in output and "stopping the others" in output
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1"]
  # Only process 0 writes the run's files: one metrics line per record, not two.
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  tested = [r["task"] for r in records[records_before:] if r.get("phase") == "test"]
  assert tested == [1], tested

  command = launch_command(workdir, *tiny_flags())
  completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "Resuming after task 1" in completed.stderr
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1", "2"]
  _assert_close(read_results(workdir), reference.results)  # one device: equal up to rounding

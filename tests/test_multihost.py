"""Multi-host on one machine: scripts/multihost_local.sh joins two launch.py processes (one
CPU device each) over loopback with jax.distributed, as the hosts of a Cloud TPU slice."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tiny import ROOT, tiny_flags, wait_for_checkpoint

SCRIPT = ROOT / "scripts" / "multihost_local.sh"


def _env() -> dict:
  """The script's environment: this interpreter first on PATH and a short stop grace."""
  env = dict(os.environ)
  env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
  env["MARK_STOP_GRACE"] = "10"
  return env


def _launch(workdir: Path, env: dict) -> subprocess.Popen:
  command = ["bash", str(SCRIPT), str(workdir), "--config", "configs/smoke.py", *tiny_flags()]
  return subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(process: subprocess.Popen, timeout: float = 900) -> str:
  output, _ = process.communicate(timeout=timeout)
  assert process.returncode == 0, output[-3000:]
  return output


def _results(workdir: Path) -> dict:
  return json.loads((workdir / "results.json").read_text())


def _assert_close(results: dict, reference: dict) -> None:
  """Equal up to float rounding: ACC within 0.02, no accuracy more than 0.05 apart."""
  assert abs(results["acc"] - reference["acc"]) <= 0.02
  ours, theirs = (
    np.array(r["accuracy_matrix"], dtype=float) for r in (results, reference)
  )  # None -> nan
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
  assert np.nanmax(np.abs(ours - theirs)) <= 0.05


def test_two_processes_give_the_one_process_results_across_a_kill_and_a_damaged_checkpoint(
  reference, tmp_path
):
  """Two processes train tiny_config(); process 1 is SIGKILLed once task 1 is saved and
  process 0 stops too. The checkpoint of task 1 is then damaged: the relaunch moves it aside
  as one process would, resumes after task 0 and ends with the one-process results.

  Both launches use the session's compilation cache: by the time task 1 is saved, every
  program has been compiled and written. (Each launch costs process 1 a full compilation:
  JAX writes the persistent cache from process 0 only, and process 1's programs have keys of
  their own.)
  """
  workdir = tmp_path / "run"
  process = _launch(workdir, _env())
  wait_for_checkpoint(process, [workdir], 1)
  pattern = f"launch.py .*--workdir {workdir} .*--process_id=1"
  victim = int(subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout)
  os.kill(victim, signal.SIGKILL)
  output, _ = process.communicate(timeout=120)  # the other process must not hang
  assert process.returncode != 0
  assert "process 1 exited with status" in output and "stopping the others" in output
  assert not (workdir / "checkpoints" / "2").exists()

  state_files = (workdir / "checkpoints" / "1" / "state").rglob("*")
  damaged = max((p for p in state_files if p.is_file()), key=os.path.getsize)
  with open(damaged, "r+b") as f:
    f.seek(damaged.stat().st_size // 2)
    f.write(b"\0" * 64)
  output = _finish(_launch(workdir, _env()))
  assert (workdir / "damaged_checkpoints").is_dir(), output[-3000:]
  assert "Resuming after task 0" in output
  assert "[process 1]" in output and "[process 1 of 2] task 2 done" in output
  assert sorted(os.listdir(workdir / "checkpoints")) == ["0", "1", "2"]
  _assert_close(_results(workdir), reference.results)  # one device: equal up to rounding
  # Only process 0 writes the run's files: one metrics line per record, not two. Task 0 was
  # tested by the first launch only, task 2 by the relaunch only.
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  tested = [r["task"] for r in records if r.get("phase") == "test"]
  assert tested.count(0) == 1 and tested.count(2) == 1, tested

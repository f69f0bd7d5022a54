r"""R runs as one compiled program against the same R runs one after another.

  python -m mark_jax.bench_runs --config configs/smoke.py --runs=1,3,9 --json runs.json
  python -m mark_jax.bench_runs --config configs/cifar100.py --config.dataset=synthetic \
      --config.max_tasks=5 --runs=1,3,9 --modes=one_program

For each R, each mode trains seeds 0..R-1 of the config in a fresh process (launch.py's
--seeds, with --config.runs_in_one_program set by the mode), from scratch: compilation
is part of what a user waits for. Reports wall time, runs per hour, seconds per task after
task 0, and peak memory (the device's peak bytes in use where it reports them, else the
process's max RSS). A row is written to --json as soon as it is measured.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mark_jax.runtime import devices, errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_RUNS = flags.DEFINE_list("runs", ["1", "3", "9"], "Numbers of runs R to measure.")
_MODES = flags.DEFINE_list(
  "modes", ["one_program", "separate"], "one_program, separate, or both (in this order)."
)
_JSON = flags.DEFINE_string("json", "bench_runs.json", "Where to write the rows as JSON.")
_CHILD = flags.DEFINE_string("child_workdir", None, "Internal: train here and print a row.")
flags.mark_flags_as_required(["config"])

MODES = {"one_program": True, "separate": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config, workdir: str, runs: int, one_program: bool) -> dict:
  """Trains seeds 0..runs-1 in this process; returns the measurements."""
  import jax

  from mark_jax import runs as runs_lib
  from mark_jax import train

  devices.set_cpu_devices(config.cpu_devices)
  planned = runs_lib.expand(config, list(range(runs)), {})
  dirs = [os.path.join(workdir, folder) for folder, _ in planned]
  configs = [c for _, c in planned]
  start = time.perf_counter()
  if one_program:
    runs_lib.train_and_evaluate_runs(configs, dirs)
  else:
    for run_config, run_dir in zip(configs, dirs, strict=True):
      train.train_and_evaluate(run_config, run_dir)
  wall = time.perf_counter() - start
  peak, kind = devices.peak_memory()
  return {"wall_s": wall, "peak_bytes": peak, "peak_kind": kind, "device": str(jax.devices()[0])}


def task_seconds(workdir: str) -> list[float]:
  """Seconds between the test records of consecutive tasks, from the first run's metrics."""
  first = sorted(os.listdir(workdir))[0]
  with open(os.path.join(workdir, first, "metrics.jsonl")) as f:
    times = [json.loads(line)["time"] for line in f if '"phase": "test"' in line]
  return list(np.diff(times))


def measure(config_argv: list[str], runs: int, mode: str) -> dict:
  """One row: `runs` runs in `mode`, in a fresh process."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable,
      "-m",
      "mark_jax.bench_runs",
      *config_argv,
      f"--config.runs_in_one_program={MODES[mode]}",
      f"--child_workdir={workdir}",
      f"--runs={runs}",
      f"--modes={mode}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
      raise errors.UserError(f"{mode} with {runs} runs failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    per_task = task_seconds(workdir)
  seconds = np.median(per_task) if per_task else None
  return {
    "runs": runs,
    "mode": mode,
    **row,
    "runs_per_hour": 3600 * runs / row["wall_s"],
    "median_task_s_after_task_0": seconds,
  }


def table(rows: list[dict]) -> str:
  lines = [
    "| R | mode | wall (s) | runs/hour | s per task after task 0 | peak memory (MiB) |",
    "|---:|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    task = (
      "n/a" if r["median_task_s_after_task_0"] is None else f"{r['median_task_s_after_task_0']:.1f}"
    )
    lines.append(
      f"| {r['runs']} | {r['mode']} | {r['wall_s']:.1f} | {r['runs_per_hour']:.1f} | {task} | "
      f"{r['peak_bytes'] / 2**20:.0f} ({r['peak_kind']}) |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  if _CHILD.value:
    row = child(config, _CHILD.value, int(_RUNS.value[0]), config.runs_in_one_program)
    print(json.dumps(row))
    return
  unknown = set(_MODES.value) - set(MODES)
  if unknown:
    raise app.UsageError(
      f"--modes: unknown {', '.join(sorted(unknown))}; known: one_program, separate"
    )
  config_flag = flags.FLAGS["config"]
  config_argv = [f"--config={config_flags.get_config_filename(config_flag)}"] + [
    f"--config.{key}={value}"
    for key, value in config_flags.get_override_values(config_flag).items()
  ]
  rows = []
  for runs in (int(r) for r in _RUNS.value):
    for mode in _MODES.value:
      rows.append(measure(config_argv, runs, mode))
      with open(_JSON.value, "w") as f:
        json.dump(rows, f, indent=2)
      print(table(rows[-1:]).splitlines()[-1], flush=True)
  print(table(rows))


if __name__ == "__main__":
  errors.run_or_exit(main, _CONFIG)

r"""Kills a MARK run at random moments; the relaunched run must end with the reference's numbers.

  python scripts/fault_injection.py --kills 20 [--config configs/smoke.py] [--seed 0]
      [--workdir DIR] [--reference RESULTS_JSON [--duration SECONDS]] [--term]
      [--config.key=value ...]

1. The reference: the config once, uninterrupted, in DIR/reference (or the results.json of
   such a run given as --reference; its wall_seconds, or --duration, is the run's duration).
2. The same command in a fresh DIR/faulted-1, stopped after a delay drawn (seeded) uniformly
   within the reference's duration, so stops land in start-up, compilation, phases,
   metalearning, checkpoint and results writes; then relaunched, until it has been stopped
   --kills times; then it finishes. A run that finishes before all kills are spent is compared
   and the rest of the kills go to a fresh DIR/faulted-2, and so on.
3. Each finished run's accuracy_matrix, acc and bwt (and its checkpointed state digests, when
   the reference's checkpoints are there) are compared with the reference: IDENTICAL or the
   differences. Exit status 0 when every run is identical and every stop behaved, else 1.

Stops are SIGKILL; with --term about half are SIGTERM, which must end the launch with exit
code 143 and the message "error: stopped by SIGTERM during ...; ... resume after task N" (or
"from the start") that agrees with the tasks saved in results.json. Further --config.key=value
flags go to launch.py. Launches run without a JAX compilation cache: JAX writes cache entries
in place, so a kill could leave a truncated entry. Each launch's output is in DIR/logs/.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT_KEYS = ("accuracy_matrix", "acc", "bwt")
# absl's prefix, e.g. "I1125 21:20:00.123456 140 train.py:178] ".
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")
STOPPED_BY_SIGTERM = re.compile(
  r"^error: stopped by SIGTERM during .+; finished tasks are saved: relaunch the same command "
  r"to resume (after task (\d+)|from the start)$"
)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--kills", type=int, default=20, help="stops to inflict (default 20)")
  parser.add_argument("--config", default="configs/smoke.py", help="config file for launch.py")
  parser.add_argument("--seed", type=int, default=0, help="seeds the stop delays and signals")
  parser.add_argument("--workdir", help="where the runs go (default: a new temporary directory)")
  parser.add_argument("--reference", help="results.json of an uninterrupted run of this config")
  parser.add_argument("--duration", type=float, help="the reference run's duration in seconds")
  parser.add_argument("--term", action="store_true", help="stop about half the time by SIGTERM")
  args, launch_flags = parser.parse_known_args()
  unknown = [flag for flag in launch_flags if not flag.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if args.kills < 0:
    parser.error("--kills must be >= 0")
  return args, launch_flags


def launch_command(config: str, workdir: Path, launch_flags: list[str]) -> list[str]:
  return [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}", *launch_flags]


def launch_env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def last_log_line(log_path: Path) -> str:
  """The log's last non-empty line without absl's prefix, shortened."""
  lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
  if not lines:
    return "(no output yet)"
  line = ABSL_PREFIX.sub("", lines[-1].strip())
  return line if len(line) <= 140 else line[:137] + "..."


def read_json(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return None


def tasks_finished(workdir: Path) -> int | None:
  """tasks_completed of the workdir's results.json, or None when there is none."""
  results = read_json(workdir / "results.json")
  return None if results is None else results["tasks_completed"]


def checkpoint_digests(workdir: Path) -> dict[int, str]:
  """Task -> state digest of each checkpoint whose metadata is readable."""
  checkpoints = workdir / "checkpoints"
  digests = {}
  if checkpoints.is_dir():
    for entry in checkpoints.iterdir():
      metadata = read_json(entry / "metadata" / "metadata") if entry.name.isdigit() else None
      if metadata is not None:
        digests[int(entry.name)] = metadata["state_sha256"]
  return digests


def run_to_completion(command: list[str], log_path: Path, timeout: float) -> float:
  """Runs `command` with its output in `log_path`; returns its wall time. Exits on failure."""
  start = time.perf_counter()
  with open(log_path, "w") as log:
    try:
      code = subprocess.run(
        command, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout
      ).returncode
    except subprocess.TimeoutExpired:
      code = None
  if code != 0:
    sys.exit(f"FAILED: {' '.join(command)} ended with {code}; see {log_path}")
  return time.perf_counter() - start


def stop_after(
  command: list[str], log_path: Path, delay: float, stop_signal: int, timeout: float
) -> tuple[int | None, bool]:
  """Runs `command`, sends `stop_signal` after `delay` seconds unless it ended before.

  Returns:
    (exit code, negative when killed by a signal, or None for a launch that outlived
    `timeout` after the signal and was killed; whether the signal was sent).
  """
  with open(log_path, "w") as log:
    process = subprocess.Popen(
      command, cwd=ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
      return process.wait(timeout=delay), False
    except subprocess.TimeoutExpired:
      process.send_signal(stop_signal)
    try:
      return process.wait(timeout=timeout), True
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
      return None, True


def check_sigterm_exit(code: int | None, log_path: Path, workdir: Path) -> str | None:
  """What is wrong with how a launch ended after SIGTERM, or None when it behaved."""
  if code == -signal.SIGTERM:
    return None  # Stopped before the run installed its handler, or after it removed it.
  if code != 128 + signal.SIGTERM:
    return f"exit code {code} after SIGTERM, expected {128 + signal.SIGTERM}"
  lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
  if any("Traceback" in line for line in lines):
    return "a traceback after SIGTERM"
  stopped = STOPPED_BY_SIGTERM.match(lines[-1]) if lines else None
  if not stopped:
    return f"unexpected last line after SIGTERM: {lines[-1] if lines else '(none)'}"
  promised = int(stopped.group(2)) + 1 if stopped.group(2) else 0
  saved = tasks_finished(workdir) or 0
  if promised != saved:
    return f"the message promises a resume after {promised} task(s), results.json has {saved}"
  return None


def compare(reference: dict, results: dict, reference_digests: dict, digests: dict) -> list[str]:
  """The differences between a finished run and the reference (empty: identical)."""
  differences = []
  for key in RESULT_KEYS:
    if reference.get(key) != results.get(key):
      differences.append(f"{key}: reference {reference.get(key)!r}, this run {results.get(key)!r}")
  if reference_digests:
    differing = sorted(t for t in reference_digests if reference_digests[t] != digests.get(t))
    if differing or set(digests) != set(reference_digests):
      differences.append(f"checkpointed states differ from the reference's for tasks {differing}")
  return differences


def main() -> int:
  args, launch_flags = parse_args()
  config = os.path.abspath(args.config)
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mark_fault_injection_")).resolve()
  logs = workdir / "logs"
  logs.mkdir(parents=True, exist_ok=True)
  rng = random.Random(args.seed)

  if args.reference:
    reference_path = Path(args.reference).resolve()
    reference = json.loads(reference_path.read_text())
    duration = args.duration or reference["wall_seconds"]
    reference_digests = checkpoint_digests(reference_path.parent)
  else:
    reference_dir = workdir / "reference"
    command = launch_command(config, reference_dir, launch_flags)
    print(f"reference run in {reference_dir} ...", flush=True)
    duration = args.duration or run_to_completion(command, logs / "reference.log", timeout=None)
    reference = json.loads((reference_dir / "results.json").read_text())
    reference_digests = checkpoint_digests(reference_dir)
  print(
    f"reference: {reference['tasks_completed']} tasks, ACC {reference['acc']:.4f}, "
    f"BWT {reference['bwt']:.4f}; stops drawn within {duration:.1f}s",
    flush=True,
  )
  hang_timeout = 3 * duration + 300

  kills, round_number, all_good = 0, 1, True
  launches = 0
  run_dir = workdir / f"faulted-{round_number}"
  while True:
    launches += 1
    log_path = logs / f"faulted-{round_number}.launch-{launches:02d}.log"
    command = launch_command(config, run_dir, launch_flags)
    if kills >= args.kills:
      run_to_completion(command, log_path, hang_timeout)
    else:
      use_term = args.term and rng.random() < 0.5
      stop_signal = signal.SIGTERM if use_term else signal.SIGKILL
      delay = rng.uniform(0.0, duration)
      code, signalled = stop_after(command, log_path, delay, stop_signal, hang_timeout)
      if code != 0 and not signalled:
        print(f"FAILED: launch {launches} ended with exit code {code}; see {log_path}")
        return 1
      if code != 0:
        kills += 1
        if code is None:
          problem = f"still running {hang_timeout:.0f}s after the signal"
        elif use_term:
          problem = check_sigterm_exit(code, log_path, run_dir)
        else:
          problem = None if code == -signal.SIGKILL else f"exit code {code}, expected -9"
        finished = tasks_finished(run_dir)
        print(
          f"stop {kills:2d}/{args.kills} {signal.Signals(stop_signal).name} at {delay:6.1f}s "
          f"(exit {code}): tasks finished {'-' if finished is None else finished}; "
          f"last log line: {last_log_line(log_path)}",
          flush=True,
        )
        if problem:
          print(f"  PROBLEM: {problem} (log: {log_path})", flush=True)
          all_good = False
        continue
      when = "despite the SIGTERM" if signalled else "before its stop"
      print(f"launch {launches} finished {when} at {delay:.1f}s", flush=True)
    differences = compare(
      reference,
      json.loads((run_dir / "results.json").read_text()),
      reference_digests,
      checkpoint_digests(run_dir),
    )
    verdict = "IDENTICAL" if not differences else "DIFFERENT"
    print(f"{run_dir} (after {kills} stop(s) in all): {verdict}", flush=True)
    for difference in differences:
      print(f"  {difference}", flush=True)
    all_good = all_good and not differences
    if kills >= args.kills:
      break
    round_number, launches = round_number + 1, 0
    run_dir = workdir / f"faulted-{round_number}"
    print(f"the remaining stops go to a fresh {run_dir}", flush=True)
  print("IDENTICAL" if all_good else "FAILED: see the lines above", flush=True)
  return 0 if all_good else 1


if __name__ == "__main__":
  sys.exit(main())

"""The smallest useful MARK config for tests, its launch.py flags, a kill at a known point,
and what tests read of a finished run."""

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(**overrides):
  """configs/smoke.py shrunk further: 3 synthetic tasks of 80 training and 100 test images,
  drawn at 32x32 and resized to 16x16 (every dataset a test trains on with it is), networks
  of half the CIFAR-100 widths, 5 epochs, a tiny meta round, masks starting near identity
  (as the fidelity runs), so that it learns (ACC well above the 0.2 of chance) in a few
  seconds once compiled. At 16x16 the kernels are smaller (KB 2, 1, 2; F^t 2, 1: fewer
  patches), and every program compiles faster than at 32x32 (docs/performance.md)."""
  from configs import smoke

  config = smoke.get_config()
  config.image_size = 16
  config.kb_channels = (32, 64, 128)
  config.feature_channels = (16, 16)
  config.latent_dim = 64
  config.synthetic.train_per_class = 16
  config.synthetic.test_per_class = 20
  config.batch_size = 16
  config.eval_batch_size = 50
  config.epochs = 5
  config.mask_bias_init = 1.0
  config.mini_tasks = 4
  config.inner_steps = 3
  config.cpu_devices = 0  # one device, like the test process: launches match in-process runs
  for key, value in overrides.items():
    config[key] = value
  return config


def tiny_flags() -> list[str]:
  """The `--config.key=value` flags that turn configs/smoke.py into tiny_config()."""
  from configs import smoke
  from mark_jax.runtime import workdir as workdir_lib

  wanted = workdir_lib.flatten_config(tiny_config().to_dict())
  given = workdir_lib.flatten_config(smoke.get_config().to_dict())
  assert set(wanted) == set(given), "the two configs have different keys"
  return [f"--config.{key}={value}" for key, value in sorted(wanted.items()) if value != given[key]]


def launch_command(workdir: Path, *flags: str) -> list[str]:
  """launch.py on configs/smoke.py in `workdir` with `flags` (e.g. tiny_flags())."""
  return [sys.executable, "launch.py", "--config=configs/smoke.py", f"--workdir={workdir}", *flags]


@contextlib.contextmanager
def lowered_programs():
  """Yields a list that collects the name of every program lowered inside the block (JAX
  lowers before every compilation, also one answered by the persistent cache)."""
  import jax

  names = []

  def listener(event, duration, fun_name=None, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      names.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def wait_until(process: subprocess.Popen, done, what: str, timeout: float = 600) -> None:
  """Waits until `done()` is true, while `process` still runs; `what` names it in failures."""
  deadline = time.monotonic() + timeout
  while not done():
    assert process.poll() is None, f"exited with {process.returncode} before {what}"
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


def wait_for_checkpoint(
  process: subprocess.Popen, run_dirs: list[Path], task: int, timeout: float = 600
) -> None:
  """Waits until every run in `run_dirs` has saved `task`, while `process` still runs."""
  wait_until(
    process,
    lambda: all((d / "checkpoints" / str(task)).is_dir() for d in run_dirs),
    f"saving task {task}",
    timeout,
  )


def largest_array_file(checkpoint: Path) -> Path:
  """The largest file of a checkpoint's state."""
  return max((p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=os.path.getsize)


def damage_checkpoint(checkpoint: Path) -> None:
  """Zeroes 64 bytes in the middle of the checkpoint's largest state file."""
  damaged = largest_array_file(checkpoint)
  with open(damaged, "r+b") as f:
    f.seek(damaged.stat().st_size // 2)
    f.write(b"\0" * 64)


def task_1_progress(seed: int) -> str:
  """The start of one of task 1's progress lines (a phase's epoch or its meta round), picked
  by `seed`."""
  epochs = tiny_config().epochs
  lines = [
    f"task 1 {phase} epoch {epoch}/"
    for phase in ("feature_extractor", "masks", "consolidation")
    for epoch in range(1, epochs + 1)
  ]
  return random.Random(seed).choice([*lines, "task 1 metalearning round 1/"])


def kill_during_task_1(
  process: subprocess.Popen, run_dirs: list[Path], log: Path, seed: int
) -> list[int]:
  """SIGKILLs `process` (a launch of tiny_flags() writing its output to `log`) once every run
  in `run_dirs` has saved task 0 and `log` shows task 1's progress line picked by `seed`.

  A line, not a delay: a task of the tiny config takes a fraction of a second once
  compiled, so a delay would kill at another point on a faster or slower machine.

  Returns:
    The tasks whose checkpoints existed in the first run dir at the kill.
  """
  wait_for_checkpoint(process, run_dirs, 0)
  line = task_1_progress(seed)
  wait_until(process, lambda: line in log.read_text(), repr(line))
  process.kill()
  assert process.wait() == -signal.SIGKILL
  # Listed once the process is dead: no save can land between the listing and the kill.
  return sorted(int(p.name) for p in (run_dirs[0] / "checkpoints").iterdir() if p.name.isdigit())


def fresh_run(config):
  """(benchmark, run, run_state) of `config` before task 0, built in this process."""
  from mark_jax import mark, state
  from mark_jax import programs as programs_lib
  from mark_jax.data import datasets

  benchmark = datasets.load_benchmark(config)
  programs = programs_lib.build_programs(config, benchmark)
  run_state = state.initial(programs.nets, config.seed, len(benchmark.tasks), programs.mesh)
  return benchmark, mark.Run(config, programs), run_state


def run_key(run, seed: int):
  """A PRNG key placed on the run's mesh, as a run places its keys: a phase given it runs
  the programs a run compiled (a key on one device alone makes programs of its own)."""
  import jax

  from mark_jax.runtime import devices

  return devices.replicate(jax.random.PRNGKey(seed), run.programs.mesh)


def task_model(run_state, t: int) -> dict:
  """A copy of task t's F/M/C with the KB (phases donate what they train)."""
  import jax

  from mark_jax import state

  model = {**state.task_slot(run_state["tasks"], t), "knowledge_base": run_state["knowledge_base"]}
  return jax.tree.map(lambda a: a.copy(), model)


def abstract_state(config):
  """The shapes of a run state of `config` (what a checkpoint restore needs)."""
  from mark_jax import programs as programs_lib
  from mark_jax import state
  from mark_jax.data import datasets
  from mark_jax.models import Networks

  benchmark = datasets.load_benchmark(config)
  nets = Networks(config, benchmark.image_size, benchmark.classes_per_task)
  return state.abstract(nets, config.seed, len(benchmark.tasks), programs_lib.make_mesh(config))


def checkpoint_digests(workdir: Path) -> dict[int, str]:
  """Task -> the state digest written in that task's checkpoint metadata."""
  return {
    int(entry.name): json.loads((entry / "metadata" / "metadata").read_text())["state_sha256"]
    for entry in (workdir / "checkpoints").iterdir()
    if entry.name.isdigit()
  }


RESULT_KEYS = ("accuracy_matrix", "acc", "bwt")


def final_numbers(results: dict) -> dict:
  return {key: results[key] for key in RESULT_KEYS}


def read_results(workdir: Path) -> dict:
  return json.loads((Path(workdir) / "results.json").read_text())


def epoch_losses(workdir: Path, phase: str, task: int | None = None) -> list[float]:
  """The epoch losses of one phase (of every task, or of `task`) from metrics.jsonl."""
  with open(Path(workdir) / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return [
    r["loss"]
    for r in records
    if r.get("phase") == phase and "loss" in r and task in (None, r.get("task"))
  ]


@dataclasses.dataclass(frozen=True)
class Reference:
  """An uninterrupted run of tiny_config(): workdir, results.json, checkpoint digests, and
  how many programs its process had lowered when each task ended (evaluated, saved)."""

  workdir: Path
  results: dict
  digests: dict[int, str]
  lowered_by_task: list[int]

  def assert_matches(self, workdir: Path) -> None:
    """Asserts that `workdir` ended with the same numbers and checkpointed states."""
    assert final_numbers(read_results(workdir)) == final_numbers(self.results)
    assert checkpoint_digests(workdir) == self.digests

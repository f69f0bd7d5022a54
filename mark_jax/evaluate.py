r"""Evaluates a task checkpoint of a run on every seen task's test split, without training.

  python -m mark_jax.evaluate WORKDIR [--task N] [--data_dir DIR]

Reads WORKDIR/config.json, loads the run's dataset, restores the checkpoint saved after
task N (default: the newest), and tests every task u <= N with its own F, M, C and that
checkpoint's KB. Prints one line per task beside the accuracy recorded during training,
and writes WORKDIR/evaluation_task<N>.json.
"""

import json

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from mark_jax import programs as programs_lib
from mark_jax import state
from mark_jax.data import datasets
from mark_jax.runtime import checkpointing, logs
from mark_jax.runtime import workdir as workdir_lib
from mark_jax.runtime.errors import CheckpointError, run_or_exit

_TASK = flags.DEFINE_integer(
  "task", None, "Checkpoint to evaluate: after this task (default: newest)."
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "TFDS data_dir, if the data now lives elsewhere than during training."
)


def load_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The run's config from WORKDIR/config.json, each key it lacks (added to the code after
  the run started) at the value that run used, as when it resumes."""
  saved = workdir_lib.read_saved_config(workdir)
  if saved is None:
    raise CheckpointError(
      f"{workdir / workdir_lib.CONFIG_FILE} does not exist: is {workdir} the workdir of a run?"
    )
  return ml_collections.ConfigDict(workdir_lib.saved_as_run(saved))


def evaluate(workdir: str, task: int | None = None, data_dir: str | None = None) -> dict:
  """Restores the checkpoint after `task` and tests every seen task.

  Args:
    workdir: the run's directory.
    task: the checkpoint's task index, counted over all passes (None: the newest).
    data_dir: overrides the config's TFDS data_dir.

  Returns:
    {'task', 'test_accuracy' (one per task <= task), 'recorded_accuracy' (the matrix row
    saved with the checkpoint), 'workdir'}.
  """
  workdir = epath.Path(workdir)
  config = load_config(workdir)
  if data_dir is not None:
    config.data_dir = data_dir
  mngr = checkpointing.manager(workdir / "checkpoints")
  if task is None:
    task = mngr.latest_step()
    if task is None:
      raise CheckpointError(f"{workdir} has no checkpoint yet")
  benchmark = datasets.load_benchmark(config)
  programs = programs_lib.build_programs(config, benchmark)  # compiles only when called
  abstract = state.abstract(programs.nets, config.seed, len(benchmark.tasks), programs.mesh)
  run_state, matrix, _ = checkpointing.restore(mngr, task, abstract)
  test = programs_lib.device_test_data(config, programs.mesh, benchmark.tasks)
  seen = task % len(benchmark.tasks) + 1  # checkpoints count tasks over all passes
  accuracy = np.asarray(
    programs.evaluate_all(run_state["knowledge_base"], run_state["tasks"], test, seen)
  )
  return {
    "workdir": str(workdir),
    "task": task,
    "test_accuracy": [float(a) for a in accuracy[:seen]],
    "recorded_accuracy": [float(a) for a in matrix[task, :seen]],
  }


def format_evaluation(result: dict) -> str:
  lines = [f"checkpoint after task {result['task']} of {result['workdir']}"]
  lines.append(f"{'task':>4}  {'test accuracy':>13}  {'recorded':>8}")
  pairs = zip(result["test_accuracy"], result["recorded_accuracy"], strict=True)
  for u, (now, recorded) in enumerate(pairs):
    lines.append(f"{u:>4}  {now:>13.4f}  {recorded:>8.4f}")
  lines.append(f"mean  {np.mean(result['test_accuracy']):>13.4f}")
  return "\n".join(lines)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m mark_jax.evaluate WORKDIR [--task N]")
  logs.quiet_logs(keep_own_info=False)
  result = evaluate(argv[1], _TASK.value, _DATA_DIR.value)
  print(format_evaluation(result))
  if jax.process_index() == 0:
    path = epath.Path(argv[1]) / f"evaluation_task{result['task']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
  run_or_exit(main)

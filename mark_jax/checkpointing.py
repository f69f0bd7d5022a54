"""One orbax checkpoint per finished task: step = task index.

Each checkpoint holds the whole run state (KB, every task's F/M/C, the RNG key) and, as
JSON metadata, the accuracy matrix so far.
"""

import os

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mark_jax.errors import CheckpointError


def manager(directory) -> ocp.CheckpointManager:
  """A manager that keeps every task's checkpoint and writes synchronously.

  Args:
    directory: a local path (made absolute) or a cloud URL such as gs://bucket/run.
  """
  if "://" not in str(directory):
    directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
    epath.Path(directory), options=options, item_names=("state", "metadata")
  )


def save(mngr: ocp.CheckpointManager, task: int, state, accuracy_matrix: np.ndarray) -> None:
  """Saves the state after `task` with the accuracy matrix (NaN = not yet measured)."""
  matrix = [[None if np.isnan(v) else float(v) for v in row] for row in accuracy_matrix]
  mngr.save(
    task,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      metadata=ocp.args.JsonSave({"task": task, "accuracy_matrix": matrix}),
    ),
  )
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, task: int, abstract_state):
  """Restores the state and accuracy matrix saved after `task`.

  Args:
    mngr: the checkpoint manager.
    task: the task index (checkpoint step).
    abstract_state: shapes/dtypes of the state (jax.eval_shape of its initialiser).

  Returns:
    (state, accuracy_matrix as a float array with NaN for unmeasured entries).
  """
  if task not in mngr.all_steps():
    raise CheckpointError(
      f"no checkpoint for task {task} in {mngr.directory}; "
      f"available: {sorted(mngr.all_steps()) or 'none'}"
    )
  restored = mngr.restore(
    task,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()
    ),
  )
  matrix = np.array(restored.metadata["accuracy_matrix"], dtype=np.float64)
  return restored.state, matrix

"""One orbax checkpoint per finished task: step = task index.

Each checkpoint holds the whole run state (KB, every task's F/M/C, the RNG key) and, as
JSON metadata, the accuracy matrix so far and a SHA-256 digest of the state's arrays.
Orbax writes a checkpoint into a temporary directory and renames it when complete, so a
process killed while saving leaves no checkpoint that looks finished (orbax ignores the
temporary directory). A checkpoint whose files were truncated, altered or removed later
fails its restore or its digest; `restore_latest` then reports it, moves it aside into
`damaged_checkpoints/` (nothing is deleted) and falls back to the previous task.
"""

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mark_jax import metrics
from mark_jax.runtime import workdir as workdir_lib
from mark_jax.runtime.errors import CheckpointError, WorkdirError

DAMAGED_DIR = "damaged_checkpoints"


def manager(directory) -> ocp.CheckpointManager:
  """A manager that keeps every task's checkpoint and writes synchronously.

  Args:
    directory: a local path (made absolute) or a cloud URL such as gs://bucket/run.
  """
  if workdir_lib.is_local(directory):
    directory = os.path.abspath(directory)
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
    epath.Path(directory), options=options, item_names=("state", "metadata")
  )


def state_digest(state) -> str:
  """SHA-256 over the paths, dtypes, shapes and bytes of every array of `state`."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    array = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def save(
  mngr: ocp.CheckpointManager,
  task: int,
  state,
  accuracy_matrix: np.ndarray,
  wall_seconds: float | None = None,
) -> None:
  """Saves the state after `task` with the accuracy matrix (NaN = not yet measured).

  Raises CheckpointError if the manager does not write it (it already holds a later task).

  `wall_seconds`, the run's wall time up to this checkpoint (None: unknown), lets a resumed
  run report its whole wall time.
  """
  metadata = {
    "task": task,
    "accuracy_matrix": metrics.matrix_to_json(accuracy_matrix),
    "state_sha256": state_digest(state),
    "wall_seconds": wall_seconds,
  }
  saved = mngr.save(
    task,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
    ),
  )
  mngr.wait_until_finished()
  if not saved:  # orbax declines, without an error, a step at or below its latest
    raise CheckpointError(
      f"the checkpoint of task {task} was not saved in {mngr.directory}, which holds tasks "
      f"{mngr.all_steps()}: a later task's checkpoint would describe another trajectory"
    )


def _shapes(tree) -> dict[str, tuple]:
  return {
    jax.tree_util.keystr(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_shapes(mngr: ocp.CheckpointManager, task: int, abstract_state) -> None:
  """Refuses a checkpoint whose arrays have other shapes than this config's state.

  Such a checkpoint is intact but belongs to another config (say another max_tasks, forced
  with --allow_config_change): restoring it cannot work, and moving it aside as damaged
  would throw away a good run. A checkpoint whose metadata cannot be read is left to
  `restore` to judge.

  Raises:
    WorkdirError: the shapes differ.
  """
  directory = epath.Path(mngr.directory) / str(task) / "state"
  try:
    metadata = ocp.StandardCheckpointHandler().metadata(directory)
  except Exception:  # Unreadable metadata: a damaged checkpoint, for `restore` to report.
    return
  saved = _shapes(metadata.tree)
  changed = [
    (path, saved[path], shape)
    for path, shape in _shapes(abstract_state).items()
    if path in saved and saved[path] != shape
  ]
  if changed:
    path, old, new = changed[0]
    raise WorkdirError(
      f"the checkpoint of task {task} in {mngr.directory} holds a run state of other shapes "
      f"than this config's ({len(changed)} arrays, e.g. state{path}: {old} saved, {new} now): "
      f"a key that sets them changed (max_tasks, classes_per_task or the network); use a "
      f"new --workdir (branching with --config.restore_dir needs the same shapes)"
    )


def restore(mngr: ocp.CheckpointManager, task: int, abstract_state):
  """Restores and verifies the state and accuracy matrix saved after `task`.

  Args:
    mngr: the checkpoint manager.
    task: the task index (checkpoint step).
    abstract_state: shapes/dtypes/shardings of the state (jax.eval_shape of its initialiser).

  Returns:
    (state, accuracy_matrix as a float array with NaN for unmeasured entries, the run's
    wall seconds at the checkpoint or None if not recorded).

  Raises:
    CheckpointError: there is no checkpoint for `task`, or it is damaged (unreadable,
      incomplete, or its arrays do not match the digest written with them).
    WorkdirError: the checkpoint's arrays have other shapes than `abstract_state`.
  """
  if task not in mngr.all_steps():
    raise CheckpointError(
      f"no checkpoint for task {task} in {mngr.directory}; "
      f"available: {sorted(mngr.all_steps()) or 'none'}"
    )
  check_shapes(mngr, task, abstract_state)
  try:
    restored = mngr.restore(
      task,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()
      ),
    )
    metadata = restored.metadata
    matrix = np.array(metadata["accuracy_matrix"], dtype=np.float64)
    expected_digest = metadata["state_sha256"]
    wall_seconds = metadata.get("wall_seconds")
  except Exception as error:  # Orbax, tensorstore and JSON all raise their own types.
    detail = " ".join(str(error).split())
    detail = detail if len(detail) <= 160 else detail[:160] + "..."
    raise CheckpointError(
      f"checkpoint of task {task} in {mngr.directory} is damaged: {type(error).__name__}: {detail}"
    ) from error
  if state_digest(restored.state) != expected_digest:
    raise CheckpointError(
      f"checkpoint of task {task} in {mngr.directory} is damaged: its arrays do not match "
      f"the digest written with them"
    )
  return restored.state, matrix, wall_seconds


def move_aside(mngr: ocp.CheckpointManager, task: int, is_writer: bool = True) -> epath.Path:
  """Moves task's checkpoint into `damaged_checkpoints/` beside the checkpoint directory.

  Only the writing process (process 0) moves it; every process then waits for the others
  and rereads the checkpoint directory.

  Returns:
    Where the checkpoint went.
  """
  target_dir = epath.Path(mngr.directory).parent / DAMAGED_DIR
  target = workdir_lib.unused_path(target_dir, str(task))
  if is_writer:
    target_dir.mkdir(parents=True, exist_ok=True)
    (epath.Path(mngr.directory) / str(task)).rename(target)
  multihost_utils.sync_global_devices(f"moved aside the checkpoint of task {task}")
  mngr.reload()
  return target


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, is_writer: bool = True):
  """The newest checkpoint that restores intact, falling back past damaged ones.

  Each damaged checkpoint is logged with its task index and moved aside (move_aside), so
  that the task can be trained and saved again.

  Returns:
    (task, state, accuracy_matrix, wall_seconds) as `restore` gives them after the task,
    or None when no intact checkpoint exists.
  """
  for task in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = restore(mngr, task, abstract_state)
    except CheckpointError as error:
      target = move_aside(mngr, task, is_writer)
      logging.warning("%s; moved it to %s and falling back to the previous task", error, target)
      continue
    return task, *restored
  return None

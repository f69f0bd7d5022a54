"""How far a run's knowledge base moved after task 0: |KB_last - KB_0| / |KB_0|.

Usage (from the repository root): python -m scripts.kb_drift WORKDIR [WORKDIR ...]

Reads the checkpoints after the first and the last finished task (docs/results.md:
metalearning barely moves the KB on the CPU fidelity protocol, plain SGD moves it far).
"""

import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from mark_jax.runtime import checkpointing


def knowledge_base_vector(mngr: ocp.CheckpointManager, task: int) -> np.ndarray:
  """The KB's variables after `task`, flattened into one vector."""
  restored = mngr.restore(task, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  leaves = jax.tree.leaves(restored.state["knowledge_base"])
  return np.concatenate([np.ravel(leaf) for leaf in leaves])


def main(workdirs: list[str]) -> None:
  for workdir in workdirs:
    mngr = checkpointing.manager(f"{workdir}/checkpoints")
    tasks = sorted(mngr.all_steps())
    if len(tasks) < 2:
      print(f"{workdir}: needs checkpoints of two tasks, has {tasks}")
      continue
    first, last = knowledge_base_vector(mngr, tasks[0]), knowledge_base_vector(mngr, tasks[-1])
    drift = np.linalg.norm(last - first) / np.linalg.norm(first)
    print(
      f"{workdir}: KB after task {tasks[-1]} vs after task {tasks[0]}: relative change {drift:.2e}"
    )


if __name__ == "__main__":
  main(sys.argv[1:])

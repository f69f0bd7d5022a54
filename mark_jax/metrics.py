"""Continual-learning metrics of an accuracy matrix.

acc[t, u] is the test accuracy on task u after training task t (NaN for u > t).
"""

import numpy as np


def average_accuracy(acc: np.ndarray) -> float:
  """ACC: mean accuracy over all tasks after the last one (mean of the last row)."""
  return float(np.mean(acc[-1]))


def backward_transfer(acc: np.ndarray) -> float:
  """BWT (GEM): mean over u < T-1 of acc[T-1, u] - acc[u, u]; 0 for a single task."""
  num_tasks = acc.shape[0]
  if num_tasks < 2:
    return 0.0
  return float(np.mean([acc[-1, u] - acc[u, u] for u in range(num_tasks - 1)]))


def forgetting(acc: np.ndarray) -> list[float]:
  """Per task u < T-1: best accuracy before the last task minus the final accuracy."""
  num_tasks = acc.shape[0]
  return [float(np.max(acc[u:-1, u]) - acc[-1, u]) for u in range(num_tasks - 1)]


def matrix_to_json(acc: np.ndarray) -> list[list[float | None]]:
  """The matrix as nested lists, None for NaN (not yet measured)."""
  return [[None if np.isnan(v) else float(v) for v in row] for row in acc]


def summarize(acc: np.ndarray, tasks_completed: int) -> dict:
  """JSON-ready results of the first `tasks_completed` tasks of the (T, T) matrix."""
  seen = acc[:tasks_completed, :tasks_completed]
  summary = {
    "accuracy_matrix": matrix_to_json(acc[:tasks_completed]),
    "tasks_completed": tasks_completed,
  }
  if tasks_completed:
    summary.update(
      acc=average_accuracy(seen),
      bwt=backward_transfer(seen),
      forgetting=forgetting(seen),
      final_accuracies=[float(v) for v in seen[-1]],
    )
  return summary

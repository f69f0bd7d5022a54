"""The report's plots (mark_jax.report): accuracy matrices and accuracy over time.

Each function takes the report's groups of runs (seeds of one variant) and writes one PNG.
"""

import textwrap

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

MAX_TASKS_WITH_CELL_VALUES = 20


def _title(group) -> str:
  run = group.runs[0]
  progress = f" ({run.progress})" if run.tasks_completed < run.num_tasks else ""
  return textwrap.fill(group.label + progress, width=40)


def _task_ticks(ax, num_tasks: int, axis: str) -> None:
  """Every task numbered up to MAX_TASKS_WITH_CELL_VALUES tasks, else every fifth."""
  step = 1 if num_tasks <= MAX_TASKS_WITH_CELL_VALUES else 5
  ticks = range(0, num_tasks, step)
  fontsize = 9 if num_tasks <= 10 else 7
  getattr(ax, f"set_{axis}ticks")(ticks, [str(t) for t in ticks], fontsize=fontsize)


def plot_heatmaps(groups: list, path: str) -> None:
  """Writes one heatmap per group (seed-averaged matrix, unseen cells blank) to `path`."""
  sizes = [group.mean_accuracy.shape[0] for group in groups]
  width = sum(max(3.0, 0.32 * n + 1.2) for n in sizes) + 1.0
  height = max(3.5, 0.32 * max(sizes) + 1.5)
  fig, axes = plt.subplots(1, len(groups), figsize=(width, height), layout="constrained")
  axes = np.atleast_1d(axes)
  cmap = plt.get_cmap("viridis").with_extremes(bad="white")
  for ax, group in zip(axes, groups, strict=True):
    accuracy = group.mean_accuracy
    image = ax.imshow(np.ma.masked_invalid(accuracy), cmap=cmap, vmin=0.0, vmax=1.0)
    num_tasks = accuracy.shape[0]
    if num_tasks <= MAX_TASKS_WITH_CELL_VALUES:
      _write_cell_values(ax, accuracy)
    _task_ticks(ax, num_tasks, "x")
    _task_ticks(ax, num_tasks, "y")
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after training task")
    ax.set_title(_title(group), fontsize=10)
  fig.colorbar(image, ax=axes.tolist(), label="test accuracy", shrink=0.9)
  fig.savefig(path, dpi=150)
  plt.close(fig)


def _write_cell_values(ax, accuracy: np.ndarray) -> None:
  fontsize = 7 if accuracy.shape[0] <= 10 else 6
  for (t, u), value in np.ndenumerate(accuracy):
    if not np.isnan(value):
      color = "black" if value > 0.55 else "white"
      ax.text(u, t, f"{value:.2f}", ha="center", va="center", fontsize=fontsize, color=color)


def plot_over_time(groups: list, path: str) -> None:
  """Writes, per group, each task's seed-averaged accuracy after every later task to `path`.

  Tasks share colours across panels and one legend at the right.
  """
  most_tasks = max(group.mean_accuracy.shape[0] for group in groups)
  colors = _task_colors(most_tasks)
  width = len(groups) * max(4.0, 0.2 * most_tasks + 2.0) + 1.2
  fig, axes = plt.subplots(1, len(groups), figsize=(width, 4.0), layout="constrained", sharey=True)
  axes = np.atleast_1d(axes)
  handles = {}
  for ax, group in zip(axes, groups, strict=True):
    accuracy = group.mean_accuracy
    num_tasks = accuracy.shape[0]
    for u in range(num_tasks):
      (line,) = ax.plot(
        range(u, num_tasks), accuracy[u:, u], marker="o", markersize=3, color=colors[u]
      )
      handles.setdefault(u, line)
    ax.set_xlim(-0.5, num_tasks - 0.5)
    ax.set_ylim(0.0, 1.0)
    _task_ticks(ax, num_tasks, "x")
    ax.set_xlabel("after training task")
    ax.set_title(_title(group), fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  fig.legend(
    [handles[u] for u in sorted(handles)],
    [str(u) for u in sorted(handles)],
    title="task",
    loc="outside right upper",
    ncols=1 if most_tasks <= 10 else 2,
    fontsize=7,
    title_fontsize=8,
    columnspacing=0.8,
    handlelength=1.5,
  )
  fig.savefig(path, dpi=150)
  plt.close(fig)


def _task_colors(num_tasks: int) -> list:
  """Distinct colours up to 10 tasks, else a sequential colormap in task order."""
  if num_tasks <= 10:
    return [plt.get_cmap("tab10")(u) for u in range(num_tasks)]
  return list(plt.get_cmap("viridis")(np.linspace(0.0, 0.95, num_tasks)))

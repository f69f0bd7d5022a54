r"""Tables and plots of finished (or running) MARK runs, seeds of one variant pooled.

  python -m mark_jax.report /tmp/mark_s48 /tmp/mark_s49 /tmp/mark_s51
  python -m mark_jax.report /tmp/mark_s48 /tmp/mark_s49 /tmp/nomask_s48 /tmp/nomask_s49 \
      --out /tmp/report --labels MARK,"no masks"

Each WORKDIR holds the results.json of a run (launch.py writes it after every task). Runs
whose configs are equal except for the seed, restore, data-location and device keys are
seeds of one variant: a group. ACC, BWT and forgetting are recomputed from each accuracy
matrix and reported per group as mean ± sample std over seeds; a run stopped early counts
the tasks it finished ("3/20 (partial)").

Writes into --out (default: the first WORKDIR):
  accuracy_matrix.png     one heatmap per group of the seed-averaged accuracy matrix
  accuracy_over_time.png  one panel per group: each task's accuracy after every later task
  report.md               the groups' table, then per-task final accuracy and forgetting
  report.json             the same numbers as fractions, keyed by group label
and prints the groups' table.
"""

import dataclasses
import json
import math
import os
import textwrap

import matplotlib
import numpy as np
from absl import app, flags

from mark_jax import metrics
from mark_jax import workdir as workdir_lib
from mark_jax.errors import UserError, run_or_exit

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

_OUT = flags.DEFINE_string(
  "out",
  None,
  "Directory for the plots, report.md and report.json (created if needed); "
  "default: the first WORKDIR.",
)
_LABELS = flags.DEFINE_list(
  "labels",
  None,
  "Comma-separated names of the groups of runs, one per group in order of first "
  "appearance on the command line; default: the config values that differ between "
  "groups (key=value), or the dataset name when there is a single group.",
)

RESULTS_FILE = "results.json"
# Seeds of one variant differ only in these keys.
IGNORED_CONFIG_KEYS = workdir_lib.CHANGEABLE_KEYS | {"seed"}
MAX_TASKS_WITH_CELL_VALUES = 20
UNSET = object()


class ReportError(UserError):
  """A WORKDIR or the command line cannot give a report."""

  exit_code = 2


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run.

  Attributes:
    workdir: the directory holding its results.json.
    config: the run's config, nested dicts as written by training.
    accuracy: (tasks completed, tasks in the benchmark) matrix, NaN where not yet seen.
    wall_seconds: the run's wall time so far, None if not recorded.
  """

  workdir: str
  config: dict
  accuracy: np.ndarray
  wall_seconds: float | None

  @property
  def tasks_completed(self) -> int:
    return self.accuracy.shape[0]

  @property
  def num_tasks(self) -> int:
    return self.accuracy.shape[1]

  @property
  def seen_accuracy(self) -> np.ndarray:
    """The square matrix of the completed tasks."""
    return self.accuracy[:, : self.tasks_completed]


@dataclasses.dataclass(frozen=True)
class Group:
  """Seeds of one variant: runs with equal configs up to IGNORED_CONFIG_KEYS."""

  label: str
  runs: tuple[Run, ...]

  @property
  def mean_accuracy(self) -> np.ndarray:
    """The seen part of the accuracy matrix, averaged element-wise over seeds."""
    return np.mean([run.seen_accuracy for run in self.runs], axis=0)


def load_run(workdir: str) -> Run:
  """Reads and checks WORKDIR/results.json.

  Raises:
    ReportError: the file is missing, not JSON, or its accuracy matrix is malformed.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: no such directory")
  if not os.path.isfile(path):
    raise ReportError(f"{path}: not found (is {workdir} a training workdir with a finished task?)")
  try:
    with open(path) as f:
      results = json.load(f)
  except json.JSONDecodeError as error:
    raise ReportError(f"{path}: not valid JSON ({error})") from None
  except (OSError, UnicodeDecodeError) as error:
    raise ReportError(f"{path}: cannot be read ({error})") from None
  if not isinstance(results, dict):
    raise ReportError(f"{path}: expected a JSON object, got {type(results).__name__}")
  config = results.get("config", {})
  if not isinstance(config, dict):
    raise ReportError(f"{path}: 'config' is not an object")
  wall_seconds = results.get("wall_seconds")
  if wall_seconds is not None and not _is_number(wall_seconds):
    raise ReportError(f"{path}: 'wall_seconds' is not a number")
  accuracy = _parse_accuracy_matrix(results.get("accuracy_matrix"), path)
  tasks_completed = results.get("tasks_completed", accuracy.shape[0])
  if tasks_completed != accuracy.shape[0]:
    raise ReportError(
      f"{path}: tasks_completed is {tasks_completed} but accuracy_matrix has "
      f"{accuracy.shape[0]} rows"
    )
  return Run(workdir, config, accuracy, wall_seconds)


def _is_number(value) -> bool:
  return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_accuracy_matrix(rows, path: str) -> np.ndarray:
  """Row t: accuracies in [0, 1] on tasks 0..t after task t, then null for unseen tasks."""
  if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows):
    raise ReportError(f"{path}: accuracy_matrix must be a non-empty list of rows")
  num_tasks = len(rows[0])
  if len(rows) > num_tasks:
    raise ReportError(f"{path}: accuracy_matrix has {len(rows)} rows but {num_tasks} columns")
  for t, row in enumerate(rows):
    if len(row) != num_tasks:
      raise ReportError(
        f"{path}: accuracy_matrix row {t} has {len(row)} entries, row 0 has {num_tasks}"
      )
    for u, value in enumerate(row):
      if u <= t and not (_is_number(value) and 0 <= value <= 1):
        raise ReportError(
          f"{path}: accuracy_matrix[{t}][{u}] is {value!r}, expected an accuracy in [0, 1]"
        )
      if u > t and value is not None:
        raise ReportError(
          f"{path}: accuracy_matrix[{t}][{u}] is {value!r}, expected null (task {u} unseen)"
        )
  return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def variant(config: dict) -> dict:
  """The flattened config without the keys that do not change what a run computes.

  A key the run's config lacks (added to the code after it ran) counts as the value that
  run used, as when a workdir resumes (workdir.flatten_as_run).
  """
  flat = workdir_lib.flatten_as_run(config)
  return {k: v for k, v in flat.items() if k not in IGNORED_CONFIG_KEYS}


def group_runs(runs: list[Run], labels: list[str] | None = None) -> list[Group]:
  """Groups runs by variant, in order of first appearance.

  Args:
    runs: the runs to group.
    labels: one name per group; None names groups by `group_labels`.

  Returns:
    The groups, each of runs with matrices of one shape.

  Raises:
    ReportError: a wrong number of labels, repeated labels, or runs of one group with
      different numbers of tasks.
  """
  variants, members = [], []
  for run in runs:
    config = variant(run.config)
    if config in variants:
      members[variants.index(config)].append(run)
    else:
      variants.append(config)
      members.append([run])
  if labels is None:
    labels = group_labels(variants, runs[0].config.get("dataset", "run"))
  elif len(labels) != len(variants):
    raise ReportError(f"--labels names {len(labels)} groups but the runs form {len(variants)}")
  if len(set(labels)) != len(labels):
    raise ReportError(f"group labels are not unique: {', '.join(labels)}")
  for label, group in zip(labels, members, strict=True):
    shapes = {run.accuracy.shape for run in group}
    if len(shapes) > 1:
      tasks = ", ".join(f"{run.workdir}: {_progress(run)}" for run in group)
      raise ReportError(f"runs of group '{label}' have different numbers of tasks ({tasks})")
  return [Group(label, tuple(group)) for label, group in zip(labels, members, strict=True)]


def group_labels(variants: list[dict], dataset: str) -> list[str]:
  """'key=value, ...' of the flattened config keys that differ between variants.

  A single variant is labelled by its dataset name.
  """
  if len(variants) == 1:
    return [str(dataset)]
  keys = list(dict.fromkeys(key for config in variants for key in config))
  first = variants[0]
  differing = [k for k in keys if any(c.get(k, UNSET) != first.get(k, UNSET) for c in variants)]
  return [", ".join(f"{k}={'unset' if k not in c else c[k]}" for k in differing) for c in variants]


def _progress(run: Run) -> str:
  return f"{run.tasks_completed}/{run.num_tasks} tasks"


def _mean_std(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (ddof=1) over seeds; std None for one seed."""
  values = np.asarray(values, dtype=np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def _mean_std_per_task(values) -> tuple[list[float], list[float] | None]:
  """Per-task mean and sample std over seeds (rows); std None for one seed."""
  values = np.asarray(values, dtype=np.float64)
  std = np.std(values, axis=0, ddof=1).tolist() if len(values) > 1 else None
  return np.mean(values, axis=0).tolist(), std


def summarize_group(group: Group) -> dict:
  """The group's metrics over seeds, recomputed from the accuracy matrices.

  Returns:
    A JSON-ready dict of fractions: seeds, workdirs, tasks_completed, num_tasks, partial,
    acc_mean/std, bwt_mean/std, final_accuracy_mean/std and forgetting_mean/std (per
    task, forgetting for all tasks but the last), wall_seconds_mean. Stds are sample
    stds over seeds, None for a single seed.
  """
  runs = group.runs
  seen = [run.seen_accuracy for run in runs]
  acc_mean, acc_std = _mean_std([metrics.average_accuracy(a) for a in seen])
  bwt_mean, bwt_std = _mean_std([metrics.backward_transfer(a) for a in seen])
  final_mean, final_std = _mean_std_per_task([a[-1] for a in seen])
  forgetting_mean, forgetting_std = _mean_std_per_task([metrics.forgetting(a) for a in seen])
  wall = [run.wall_seconds for run in runs if run.wall_seconds is not None]
  return {
    "seeds": [run.config.get("seed") for run in runs],
    "workdirs": [os.path.abspath(run.workdir) for run in runs],
    "tasks_completed": runs[0].tasks_completed,
    "num_tasks": runs[0].num_tasks,
    "partial": runs[0].tasks_completed < runs[0].num_tasks,
    "acc_mean": acc_mean,
    "acc_std": acc_std,
    "bwt_mean": bwt_mean,
    "bwt_std": bwt_std,
    "final_accuracy_mean": final_mean,
    "final_accuracy_std": final_std,
    "forgetting_mean": forgetting_mean,
    "forgetting_std": forgetting_std,
    "wall_seconds_mean": float(np.mean(wall)) if wall else None,
  }


def _percent(mean: float, std: float | None) -> str:
  return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "n/a"
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.2f} h"


def _escape(text: str) -> str:
  return text.replace("|", "\\|")


def markdown_table(summaries: dict[str, dict]) -> str:
  """One row per group: label, seeds, tasks, ACC and BWT (%, mean ± std), mean wall time."""
  lines = [
    "| Run | Seeds | Tasks | ACC (%) | BWT (%) | Wall time |",
    "|---|---|---|---:|---:|---:|",
  ]
  for label, s in summaries.items():
    seeds = f"{len(s['seeds'])} ({', '.join(str(seed) for seed in s['seeds'])})"
    tasks = f"{s['tasks_completed']}/{s['num_tasks']}" + (" (partial)" if s["partial"] else "")
    lines.append(
      f"| {_escape(label)} | {seeds} | {tasks} | {_percent(s['acc_mean'], s['acc_std'])} | "
      f"{_percent(s['bwt_mean'], s['bwt_std'])} | {_duration(s['wall_seconds_mean'])} |"
    )
  return "\n".join(lines)


def per_task_table(summary: dict) -> str:
  """One row per completed task: final accuracy and forgetting (%, mean ± std over seeds)."""
  lines = ["| Task | Final accuracy (%) | Forgetting (%) |", "|---:|---:|---:|"]
  for u in range(summary["tasks_completed"]):
    final = _percent(*_task_stat(summary, "final_accuracy", u))
    forgetting = "–"
    if u < len(summary["forgetting_mean"]):
      forgetting = _percent(*_task_stat(summary, "forgetting", u))
    lines.append(f"| {u} | {final} | {forgetting} |")
  return "\n".join(lines)


def _task_stat(summary: dict, name: str, task: int) -> tuple[float, float | None]:
  std = summary[f"{name}_std"]
  return summary[f"{name}_mean"][task], None if std is None else std[task]


def markdown_report(summaries: dict[str, dict]) -> str:
  """report.md: the groups' table, then each group's per-task table."""
  sections = ["# MARK results", markdown_table(summaries)]
  for label, summary in summaries.items():
    sections += [f"## {label}", per_task_table(summary)]
  sections.append(
    "ACC: mean final accuracy over tasks. BWT: mean over tasks but the last of final minus "
    "just-learned accuracy. Forgetting: best accuracy before the last task minus final "
    "accuracy. Mean ± sample std (ddof=1) over seeds."
  )
  return "\n\n".join(sections) + "\n"


def _title(group: Group) -> str:
  run = group.runs[0]
  progress = f" ({_progress(run)})" if run.tasks_completed < run.num_tasks else ""
  return textwrap.fill(group.label + progress, width=40)


def _task_ticks(ax, num_tasks: int, axis: str) -> None:
  """Every task numbered up to MAX_TASKS_WITH_CELL_VALUES tasks, else every fifth."""
  step = 1 if num_tasks <= MAX_TASKS_WITH_CELL_VALUES else 5
  ticks = range(0, num_tasks, step)
  fontsize = 9 if num_tasks <= 10 else 7
  getattr(ax, f"set_{axis}ticks")(ticks, [str(t) for t in ticks], fontsize=fontsize)


def plot_heatmaps(groups: list[Group], path: str) -> None:
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


def plot_over_time(groups: list[Group], path: str) -> None:
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


def build_report(workdirs: list[str], out_dir: str, labels: list[str] | None = None) -> str:
  """Loads the runs, writes the plots, report.md and report.json into `out_dir`.

  Returns:
    The groups' Markdown table.

  Raises:
    ReportError: a WORKDIR is unusable, or the runs cannot be grouped as asked.
  """
  groups = group_runs([load_run(workdir) for workdir in workdirs], labels)
  summaries = {group.label: summarize_group(group) for group in groups}
  try:
    os.makedirs(out_dir, exist_ok=True)
    plot_heatmaps(groups, os.path.join(out_dir, "accuracy_matrix.png"))
    plot_over_time(groups, os.path.join(out_dir, "accuracy_over_time.png"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
      f.write(markdown_report(summaries))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
      json.dump(summaries, f, indent=2)
  except OSError as error:
    raise ReportError(f"{out_dir}: cannot write the report ({error})") from None
  return markdown_table(summaries)


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give at least one WORKDIR")
  out_dir = _OUT.value or workdirs[0]
  table = build_report(workdirs, out_dir, _LABELS.value)
  print(table)
  print(f"wrote accuracy_matrix.png, accuracy_over_time.png, report.md, report.json to {out_dir}")


if __name__ == "__main__":
  run_or_exit(main)

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
import os

import numpy as np
from absl import app, flags

from mark_jax import metrics, paired, report_markdown, report_plots
from mark_jax.runtime import workdir as workdir_lib
from mark_jax.runtime.errors import UserError, run_or_exit

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

_BASELINE = flags.DEFINE_string(
  "baseline",
  None,
  "Label of the group the others are compared with, seed by seed (paired differences of ACC "
  "and BWT with t intervals, Holm-adjusted); default: the first group.",
)
_PAIR_BY = flags.DEFINE_enum(
  "pair_by",
  "seed",
  paired.UNITS,
  "What a paired interval counts: seeds (independent draws), or each seed's tasks (sound "
  "against a KB frozen after task 0; tasks of one seed are not independent).",
)

_TASKS = flags.DEFINE_integer(
  "tasks",
  None,
  "Report only the first TASKS tasks of every run, as a run with --config.max_tasks=TASKS "
  "would have trained them (a run's first tasks do not depend on how many follow); every "
  "run must have finished them.",
  lower_bound=1,
)

RESULTS_FILE = "results.json"
# Seeds of one variant differ only in these keys.
IGNORED_CONFIG_KEYS = workdir_lib.CHANGEABLE_KEYS | {"seed"}
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
  def progress(self) -> str:
    return f"{self.tasks_completed}/{self.num_tasks} tasks"

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


def load_run(workdir: str, tasks: int | None = None) -> Run:
  """Reads WORKDIR/results.json, as training wrote it.

  Args:
    workdir: the run's directory.
    tasks: keep only the first `tasks` tasks, and count the run as one with max_tasks=tasks;
      None keeps them all.

  Raises:
    ReportError: the directory or file is missing, it is not a results.json of training, or
      the run has not finished `tasks` tasks.
  """
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: no such directory")
  if not os.path.isfile(path):
    raise ReportError(f"{path}: not found (is {workdir} a training workdir with a finished task?)")
  try:
    with open(path) as f:
      results = json.load(f)
    rows = results["accuracy_matrix"]
    accuracy = np.array([[np.nan if v is None else v for v in row] for row in rows], np.float64)
    config, wall_seconds = results.get("config", {}), results.get("wall_seconds")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    raise ReportError(f"{path}: not a results.json written by training ({error!r})") from None
  if accuracy.ndim != 2 or not 0 < accuracy.shape[0] <= accuracy.shape[1]:
    raise ReportError(f"{path}: accuracy_matrix is not a (tasks done, tasks) matrix")
  if tasks is not None:
    if accuracy.shape[0] < tasks:
      raise ReportError(f"{workdir}: --tasks={tasks} but the run finished {accuracy.shape[0]}")
    accuracy, config, wall_seconds = accuracy[:tasks, :tasks], {**config, "max_tasks": tasks}, None
  return Run(workdir, config, accuracy, wall_seconds)


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
      tasks = ", ".join(f"{run.workdir}: {run.progress}" for run in group)
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


def paired_comparisons(groups: list[Group], baseline: str | None, unit: str) -> tuple[str, dict]:
  """Every group with the baseline's task count against the baseline, on shared seeds.

  Returns:
    (the baseline's label, label -> paired.compare's entry).
  """
  by_label = {group.label: group for group in groups}
  baseline = groups[0].label if baseline is None else baseline
  if baseline not in by_label:
    raise ReportError(f"--baseline={baseline}: no such group; groups: {', '.join(by_label)}")

  def by_seed(group: Group) -> dict:
    return {run.config.get("seed"): run.seen_accuracy for run in group.runs}

  tasks = by_label[baseline].runs[0].tasks_completed
  others = {
    g.label: by_seed(g)
    for g in groups
    if g.label != baseline and g.runs[0].tasks_completed == tasks
  }
  return baseline, paired.compare(by_seed(by_label[baseline]), others, unit)


def build_report(
  workdirs: list[str],
  out_dir: str,
  labels: list[str] | None = None,
  baseline: str | None = None,
  pair_by: str = "seed",
  tasks: int | None = None,
) -> str:
  """Loads the runs (their first `tasks` tasks), writes plots, report.md and report.json.

  Returns:
    The groups' Markdown table.

  Raises:
    ReportError: a WORKDIR is unusable, or the runs cannot be grouped as asked.
  """
  groups = group_runs([load_run(workdir, tasks) for workdir in workdirs], labels)
  summaries = {group.label: summarize_group(group) for group in groups}
  table = report_markdown.summary_table(summaries)
  if len(groups) > 1:
    baseline, comparisons = paired_comparisons(groups, baseline, pair_by)
    for label, comparison in comparisons.items():
      summaries[label]["paired_to_baseline"] = {"baseline": baseline, **comparison}
    table += "\n\n" + paired.markdown(comparisons, baseline)
  try:
    os.makedirs(out_dir, exist_ok=True)
    report_plots.plot_heatmaps(groups, os.path.join(out_dir, "accuracy_matrix.png"))
    report_plots.plot_over_time(groups, os.path.join(out_dir, "accuracy_over_time.png"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
      f.write(report_markdown.report(summaries, table))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
      json.dump(summaries, f, indent=2)
  except OSError as error:
    raise ReportError(f"{out_dir}: cannot write the report ({error})") from None
  return table


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give at least one WORKDIR")
  out_dir = _OUT.value or workdirs[0]
  table = build_report(
    workdirs, out_dir, _LABELS.value, _BASELINE.value, _PAIR_BY.value, _TASKS.value
  )
  print(table)
  print(f"wrote accuracy_matrix.png, accuracy_over_time.png, report.md, report.json to {out_dir}")


if __name__ == "__main__":
  run_or_exit(main)

"""The report's Markdown (mark_jax.report): the groups' table and each group's tasks.

Each function takes the summaries of mark_jax.report.summarize_group, keyed by group label.
"""


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


def summary_table(summaries: dict[str, dict]) -> str:
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


def report(summaries: dict[str, dict], table: str) -> str:
  """report.md: the groups' table (and paired differences), then each group's tasks."""
  sections = ["# MARK results", table]
  for label, summary in summaries.items():
    sections += [f"## {label}", per_task_table(summary)]
  sections.append(
    "ACC: mean final accuracy over tasks. BWT: mean over tasks but the last of final minus "
    "just-learned accuracy. Forgetting: best accuracy before the last task minus final "
    "accuracy. Mean ± sample std (ddof=1) over seeds."
  )
  return "\n\n".join(sections) + "\n"

"""Paired comparisons of variants that share seeds: differences, t intervals, Holm.

Runs with the same seed train the same classes in each task (the same class permutation),
so two variants' results pair seed by seed. The unit an interval counts is either the seed
(one ACC or BWT difference per seed: each seed's KB and split are one random draw shared
by all its tasks, so seeds are the independent units) or the task (one difference per seed
and task, sound where the variants share the same task-0 KB, as against a KB frozen after
task 0; tasks of one seed are not independent draws, so its intervals are narrower than
the evidence and say so). Intervals are Student's t on the paired differences; with several
variants against one baseline the p-values are Holm-adjusted for the multiple comparisons.
"""

import math

import numpy as np
from scipy import stats

from mark_jax import metrics

UNITS = ("seed", "task")
CONFIDENCE = 0.95


def t_interval(differences, confidence: float = CONFIDENCE) -> dict:
  """Mean, sample std and a two-sided Student's t interval and p-value of paired differences.

  Args:
    differences: one difference per unit (variant minus baseline).
    confidence: the interval's coverage.

  Returns:
    {'n', 'mean', 'std', 'low', 'high', 'p'}; std, low, high and p are None for fewer than
    two units.
  """
  d = np.asarray(differences, np.float64)
  n, mean = len(d), float(np.mean(d))
  if n < 2:
    return {"n": n, "mean": mean, "std": None, "low": None, "high": None, "p": None}
  std = float(np.std(d, ddof=1))
  error = std / math.sqrt(n)
  half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * error
  if error > 0:
    p = float(2 * stats.t.sf(abs(mean) / error, n - 1))
  else:
    p = 1.0 if mean == 0 else 0.0
  return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "p": p}


def holm(p_values: list[float | None]) -> list[float | None]:
  """Holm's step-down adjustment of p-values (None stays None)."""
  present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
  adjusted, running = [None] * len(p_values), 0.0
  for rank, (p, i) in enumerate(present):
    running = max(running, min(1.0, (len(present) - rank) * p))
    adjusted[i] = running
  return adjusted


def differences(baseline: dict, variant: dict, unit: str) -> dict[str, list[float]]:
  """Paired differences (variant minus baseline) of ACC and BWT on their shared seeds.

  Args:
    baseline: seed -> seen accuracy matrix (tasks done x tasks done) of the baseline.
    variant: likewise, of the other variant.
    unit: 'seed' (ACC and BWT of each seed) or 'task' (each seed's final accuracy of each
      task for ACC; final minus just-learned accuracy of each task but the last for BWT).

  Returns:
    {'seeds': the shared seeds, 'acc': [...], 'bwt': [...]}.
  """
  seeds = sorted(set(baseline) & set(variant))
  acc, bwt = [], []
  for seed in seeds:
    a, b = variant[seed], baseline[seed]
    if unit == "seed":
      acc.append(metrics.average_accuracy(a) - metrics.average_accuracy(b))
      bwt.append(metrics.backward_transfer(a) - metrics.backward_transfer(b))
    else:
      acc.extend((a[-1] - b[-1]).tolist())
      learned_a, learned_b = np.diag(a)[:-1], np.diag(b)[:-1]
      bwt.extend(((a[-1, :-1] - learned_a) - (b[-1, :-1] - learned_b)).tolist())
  return {"seeds": seeds, "acc": acc, "bwt": bwt}


def compare(baseline: dict, variants: dict[str, dict], unit: str = "seed") -> dict[str, dict]:
  """Every variant against the baseline: intervals of ACC and BWT differences, Holm's p.

  Args:
    baseline: seed -> seen accuracy matrix of the baseline.
    variants: label -> (seed -> seen accuracy matrix), each with the baseline's tasks.
    unit: what an interval counts (UNITS).

  Returns:
    label -> {'seeds', 'unit', 'acc': t_interval + 'p_holm', 'bwt': likewise}.
  """
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
  result = {}
  for label, variant in variants.items():
    diffs = differences(baseline, variant, unit)
    result[label] = {
      "seeds": diffs["seeds"],
      "unit": unit,
      "acc": t_interval(diffs["acc"]),
      "bwt": t_interval(diffs["bwt"]),
    }
  for metric in ("acc", "bwt"):
    adjusted = holm([result[label][metric]["p"] for label in result])
    for label, p in zip(result, adjusted, strict=True):
      result[label][metric]["p_holm"] = p
  return result


def _points(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:+.2f}"


def _interval(summary: dict) -> str:
  if summary["low"] is None:
    return "n/a"
  return f"[{100 * summary['low']:+.2f}, {100 * summary['high']:+.2f}]"


def _p(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def markdown(comparisons: dict[str, dict], baseline: str) -> str:
  """The comparisons as a Markdown table (points: percentages of accuracy)."""
  lines = [
    f"Paired differences to {baseline} (points; {int(100 * CONFIDENCE)}% Student's t "
    "interval; p two-sided, Holm-adjusted over the variants):",
    "",
    "| Variant | Seeds | Unit (n) | ACC diff | ACC 95% CI | ACC p (Holm) | BWT diff | "
    "BWT 95% CI | BWT p (Holm) |",
    "|---|---|---|---:|---|---:|---:|---|---:|",
  ]
  for label, c in comparisons.items():
    seeds = ", ".join(str(s) for s in c["seeds"]) or "none shared"
    acc, bwt, name = c["acc"], c["bwt"], label.replace("|", "\\|")
    lines.append(
      f"| {name} | {seeds} | {c['unit']} ({acc['n']}) | "
      f"{_points(acc['mean'])} | {_interval(acc)} | {_p(acc['p_holm'])} | "
      f"{_points(bwt['mean'])} | {_interval(bwt)} | {_p(bwt['p_holm'])} |"
    )
  return "\n".join(lines)

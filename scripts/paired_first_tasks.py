r"""Paired comparison of variants by their first tasks' accuracies, seed by seed.

For each variant (a label and result files: mark_jax's results.json, or an accuracy
matrix of the same form written for the authors' code) it takes the test accuracy of tasks
0..N-1 after task N-1, averages it per seed, and prints: the per-seed means, each variant's
mean ± sample std over seeds, and every variant's paired difference to the first one
(mean ± std of the per-seed differences; seeds are the unit, since each seed's KB is one
random draw shared by all its tasks). With the KB frozen after task 0 each task keeps its
own accuracy, so the first N tasks of a 20-task run compare with an N-task run.

Usage (from the repository root):
  python scripts/paired_first_tasks.py --tasks 10 \
    "running=results/miniimagenet32_cpu/kb_frozen_after_task0_bn_running_seed*/results.json" \
    "recomputed=results/miniimagenet32_cpu_first10/kb_frozen_bn_recomputed_10tasks_seed*/results.json"
"""

import argparse
import glob
import json
import statistics


def first_tasks_mean(path: str, num_tasks: int) -> tuple[int, float]:
  """(seed, mean test accuracy of tasks 0..num_tasks-1 after task num_tasks-1) of a file."""
  with open(path) as f:
    results = json.load(f)
  seed = results["config"]["seed"]
  row = results["accuracy_matrix"][num_tasks - 1]
  values = row[:num_tasks]
  if any(v is None for v in values):
    raise ValueError(f"{path}: tasks 0..{num_tasks - 1} not all tested after task {num_tasks - 1}")
  return seed, sum(values) / num_tasks


def spread(values: list[float]) -> str:
  """Mean ± sample std in percent (points), over seeds."""
  mean = statistics.fmean(values)
  if len(values) < 2:
    return f"{100 * mean:.2f} (one seed)"
  return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", type=int, default=10)
  parser.add_argument("variants", nargs="+", help="LABEL=GLOB of result files")
  args = parser.parse_args()
  per_seed = {}
  for variant in args.variants:
    label, pattern = variant.split("=", 1)
    paths = sorted(glob.glob(pattern))
    if not paths:
      raise SystemExit(f"error: {pattern} matches no file")
    per_seed[label] = dict(first_tasks_mean(p, args.tasks) for p in paths)
  seeds = sorted(set().union(*per_seed.values()))
  print(f"Mean test accuracy (%) of tasks 0..{args.tasks - 1} after task {args.tasks - 1}\n")
  print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
  print("|---|" + "---:|" * (len(seeds) + 1))
  for label, by_seed in per_seed.items():
    cells = [f"{100 * by_seed[s]:.2f}" if s in by_seed else "-" for s in seeds]
    print(f"| {label} | " + " | ".join(cells) + f" | {spread(list(by_seed.values()))} |")
  base_label, base = next(iter(per_seed.items()))
  print(f"\nPaired by seed, minus {base_label} (points):\n")
  print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
  print("|---|" + "---:|" * (len(seeds) + 1))
  for label, by_seed in list(per_seed.items())[1:]:
    shared = [s for s in seeds if s in by_seed and s in base]
    diffs = {s: by_seed[s] - base[s] for s in shared}
    cells = [f"{100 * diffs[s]:+.2f}" if s in diffs else "-" for s in seeds]
    print(f"| {label} | " + " | ".join(cells) + f" | {spread(list(diffs.values()))} |")


if __name__ == "__main__":
  main()

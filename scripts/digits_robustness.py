r"""How much numerical margin the out-of-the-box digits run has: many seeds, and its neighbours.

Runs README's first command (`python launch.py --config configs/digits.py`) as shipped for
`--seeds` seeds (48, 49, ...), then for three seeds (48, 49, 51) each of: one XLA device,
twice the mask bias (larger masks from the start: the direction in which the run used to
diverge), XLA's Eigen dot kernels instead of its default YNNPACK ones, and twice the
learning rates. Each run is its own process in WORKDIR/<case>_seed<seed> (a finished run is
not run again). Prints one row per run: ACC, whether it finished, the largest mask value
and masked latent norm after steps 3 and 5 (over tasks, on validation images), the largest
mean first inner-loop loss (over tasks and rounds), and its seconds; then the failures: runs
that stopped or scored ACC < 0.95. A benchmark (about an hour on a 2-core CPU), not a test.

Usage (from the repository root):
  python scripts/digits_robustness.py --workdir /tmp/digits_robustness [--seeds 20]
"""

import argparse
import json
import os
import subprocess
import sys
import time

# The option that switches XLA:CPU's dots from YNNPACK (its default) to its own Eigen kernels.
EIGEN_DOTS = "--xla_cpu_experimental_ynn_fusion_type="
MIN_ACC = 0.95


def cases(num_seeds: int) -> list[tuple[str, int, list[str], dict]]:
  """(case, seed, extra launch flags, extra environment) of every run."""
  from configs import digits

  config = digits.get_config()
  twice_lr = [
    f"--config.learning_rate={2 * config.learning_rate}",
    f"--config.inner_learning_rate={2 * config.inner_learning_rate}",
  ]
  variants = {
    "one_device": (["--config.cpu_devices=0"], {}),
    "mask_bias_2": ([f"--config.mask_bias_init={2 * config.mask_bias_init}"], {}),
    "eigen_dots": ([], {"XLA_FLAGS": EIGEN_DOTS}),
    "twice_lr": (twice_lr, {}),
  }
  runs = [("shipped", seed, [], {}) for seed in range(48, 48 + num_seeds)]
  for name, (flags, env) in variants.items():
    runs += [(name, seed, flags, env) for seed in (48, 49, 51)]
  return runs


def diagnostics(workdir: str) -> dict:
  """Largest mask, latent norm and first inner loss in the run's metrics.jsonl."""
  found = {"mask_max": float("nan"), "latent_norm": float("nan"), "first_inner_loss": float("nan")}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return found
  with open(path) as f:
    records = [json.loads(line) for line in f]
  for key in found:
    values = [r[key] for r in records if key in r]
    if values:
      found[key] = max(values)
  return found


def run(workdir: str, flags: list[str], env: dict) -> tuple[str, float | None, float]:
  """Runs (or finds finished) one digits run; returns (status, ACC, seconds)."""
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      done = json.load(f)
    if done.get("tasks_completed") == len(done["accuracy_matrix"][0]):
      return "finished", done["acc"], done.get("wall_seconds") or float("nan")
  command = [sys.executable, "launch.py", "--config", "configs/digits.py", "--workdir", workdir]
  start = time.perf_counter()
  with open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "w") as log:
    proc = subprocess.run(
      command + flags, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
    )
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    return f"stopped (exit {proc.returncode})", None, seconds
  with open(results) as f:
    return "finished", json.load(f)["acc"], seconds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, default=20, help="seeds of the shipped config")
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  header = "| case | seed | status | ACC | max mask | latent norm | first inner loss | s |"
  print(header + "\n|" + "---|" * 8, flush=True)
  failures = total = 0
  for case, seed, flags, env in cases(args.seeds):
    workdir = os.path.join(args.workdir, f"{case}_seed{seed}")
    status, acc, seconds = run(workdir, [f"--config.seed={seed}", *flags], env)
    found = diagnostics(workdir)
    total += 1
    failures += acc is None or acc < MIN_ACC
    shown_acc = "-" if acc is None else f"{acc:.4f}"
    print(
      f"| {case} | {seed} | {status} | {shown_acc} | {found['mask_max']:.2f} | "
      f"{found['latent_norm']:.1f} | {found['first_inner_loss']:.3f} | {seconds:.0f} |",
      flush=True,
    )
  print(f"\nruns: {total}, failures (stopped or ACC < {MIN_ACC}): {failures}")


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  main()

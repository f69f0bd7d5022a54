#!/usr/bin/env bash
# The 12-run table of 20-Split CIFAR-100 (synthetic data of its shape: 100 classes, 500 train /
# 100 test images per class, 32x32) on one accelerator, end to end, timed as a whole.
#
# Usage: bash scripts/gpu_ablation_table.sh OUTDIR [SECONDS [LAUNCH_FLAGS...]]
#
# Three programs, started together (seeds and the Reptile step size are inputs of a program;
# the ablations change its structure):
#   MARK, and the KB frozen after task 0 as meta_step_size=0: seeds 48, 49, 51 x both step
#     sizes, one program of 6 runs;
#   no metalearning (configs/ablations.py:no_metalearning): one program of 3 seeds;
#   no masks (configs/ablations.py:no_masks): one program of 3 seeds.
# SECONDS > 0 stops every launch cleanly (SIGTERM) at that time: each run's results.json
# then says how many tasks it finished. LAUNCH_FLAGS go to every launch (e.g. a smaller
# synthetic dataset to try the script on a CPU).
# OUTDIR gets gpu.txt (device and versions), one log per program and table.json (every run:
# tasks completed, wall seconds, ACC, BWT; the whole table's wall seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?give OUTDIR}"
limit="${2:-0}"
shift $(($# < 2 ? $# : 2))
mkdir -p "$out"
work="$(mktemp -d)"
# Three processes share the device: each takes memory as it needs it, instead of JAX's
# default of most of the device's memory for the first one.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
} > "$out/gpu.txt" 2>&1

launch() {  # NAME CONFIG [FLAGS...]: one program of runs, in the background
  local name="$1" config="$2"
  shift 2
  local stop=()
  if [ "$limit" -gt 0 ]; then stop=(timeout -s TERM "$limit"); fi
  "${stop[@]}" python launch.py --config "$config" --workdir "$work/$name" \
    --config.dataset=synthetic --seeds=48,49,51 --config.runs_in_one_program=True "$@" \
    > "$out/$name.log" 2>&1 &
}

start=$(date +%s.%N)
launch mark_and_kb_frozen configs/cifar100.py --sweep=meta_step_size=0.001,0 "$@"
launch no_metalearning configs/ablations.py:no_metalearning "$@"
launch no_masks configs/ablations.py:no_masks "$@"
statuses=()
for job in $(jobs -p); do
  wait "$job"
  statuses+=($?)
done
end=$(date +%s.%N)

python - "$work" "$out/table.json" "$start" "$end" "${statuses[*]}" <<'PY'
import glob, json, os, sys

work, table, start, end, statuses = sys.argv[1:]
runs = []
for path in sorted(glob.glob(os.path.join(work, "**", "results.json"), recursive=True)):
  r = json.load(open(path))
  runs.append({
    "run": os.path.relpath(os.path.dirname(path), work),
    "seed": r["config"]["seed"],
    "meta_step_size": r["config"]["meta_step_size"],
    "tasks_completed": r["tasks_completed"],
    "wall_seconds": r.get("wall_seconds"),
    "acc": r.get("acc"),
    "bwt": r.get("bwt"),
    "stopped": r.get("stopped"),
  })
summary = {
  "table_wall_seconds": float(end) - float(start),
  "launch_exit_statuses": [int(s) for s in statuses.split()],
  "runs": runs,
}
json.dump(summary, open(table, "w"), indent=1)
print(f"{len(runs)} runs in {summary['table_wall_seconds']:.0f} s, exit statuses {statuses}")
for r in runs:
  print(f"  {r['run']:<40} tasks {r['tasks_completed']:>2}  ACC {r['acc']}  wall {r['wall_seconds']}")
PY

#!/usr/bin/env bash
# GPU/TPU speed check (issue: the full 20-task CIFAR-100 protocol in under 5 minutes on an H100).
# Usage: bash scripts/gpu_check.sh [WORKDIR]
# 1. The benchmark at the paper configuration: step times, a meta round, TFLOP/s (about a
#    minute, mostly compilation).
# 2. The whole 20-task paper protocol on synthetic data of CIFAR-100's shape (100 classes,
#    500 train / 100 test images per class, 32x32): its wall time is in results.json, and its
#    achieved TFLOP/s is the model FLOPs of every training step (from the benchmark's
#    counts) over that wall time, compilation and evaluation included.
# 3. Runs as one program (mark_jax.bench_runs) on the same data: R = 1, 3, 9 seeds of the
#    first MARK_RUN_TASKS tasks (default 5) as one compiled program, and one run alone; their
#    seconds per task after task 0 extrapolate a whole protocol.
# Each part logs into WORKDIR as it goes, so an interrupted check still leaves its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir="${1:-/tmp/mark_gpu_check_$(date +%s)}"
if [ -e "$workdir" ]; then
  echo "$workdir already exists: give a new directory" >&2
  exit 2
fi
mkdir -p "$workdir"
python -m mark_jax.bench --config configs/cifar100.py --notime_task --repeats 2 \
  --json "$workdir/bench.json" 2>&1 | tee "$workdir/bench.log"
python launch.py --config configs/cifar100.py --config.dataset=synthetic --workdir "$workdir/run" \
  2>&1 | tee "$workdir/run.log"
python -m mark_jax.bench_runs --config configs/cifar100.py --config.dataset=synthetic \
  --config.max_tasks="${MARK_RUN_TASKS:-5}" --runs=1,3,9 --modes=one_program \
  --json "$workdir/bench_runs_one_program.json" 2>&1 | tee "$workdir/bench_runs.log"
python -m mark_jax.bench_runs --config configs/cifar100.py --config.dataset=synthetic \
  --config.max_tasks="${MARK_RUN_TASKS:-5}" --runs=1 --modes=separate \
  --json "$workdir/bench_runs_separate.json" 2>&1 | tee -a "$workdir/bench_runs.log"
python - "$workdir" <<'PY'
import json, sys
bench = json.load(open(f"{sys.argv[1]}/bench.json"))
results = json.load(open(f"{sys.argv[1]}/run/results.json"))
tasks = results["tasks_completed"]
total = 1e9 * (tasks * bench["model_gflop_per_task"] + bench["model_gflop_kb_pretrain"])
wall = results["wall_seconds"]
print(f"{results['tasks_completed']} tasks in {wall:.0f} s (target: under 300 s on one H100); "
      f"{total / 1e15:.2f} PFLOP of training steps, {total / wall / 1e12:.1f} TFLOP/s overall")
PY

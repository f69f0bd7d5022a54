#!/usr/bin/env bash
# The CPU fidelity runs of README's results table, one after another (hours on a CPU).
# Usage: bash scripts/fidelity_miniimagenet32_cpu.sh [RUNS_DIR [VARIANT:SEED ...]]
# Needs MiniImageNet prepared once: python -m mark_jax.data prepare miniimagenet --source PATH
# Each run trains in RUNS_DIR/<variant>_seed<seed> (default RUNS_DIR /tmp/mark_fidelity;
# relaunching resumes after the last finished task) and its results.json is copied to
# results/miniimagenet32_cpu/<variant>_seed<seed>/ (the 10-task runs to
# results/miniimagenet32_cpu_first10/). Without VARIANT:SEED arguments it runs
# README's main rows with the current defaults; giving some lets two processes share the list
# (one per core, e.g. `taskset -c 0 bash scripts/... kb_frozen_bn_batch_10tasks:48`). Then:
#   python -m mark_jax.report results/miniimagenet32_cpu/*/ --out results/miniimagenet32_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
runs_dir="${1:-/tmp/mark_fidelity}"
shift || true
frozen="--config.mask_bias_init=1.0 --config.meta_rounds=0"
running="--config.feature_bn_statistics=running"
declare -A variants=(
  # README's main rows, with the defaults (F^t's statistics recomputed after its phase).
  [mark]="--config.mask_bias_init=1.0"
  [kb_frozen_after_task0]="$frozen"
  [no_metalearning]="--config.mask_bias_init=1.0 --config.use_metalearning=False"
  # Rows measured before the default became 'recomputed': F^t's running statistics.
  [mark_bn_running]="--config.mask_bias_init=1.0 $running"
  [kb_frozen_after_task0_bn_running]="$frozen $running"
  [no_metalearning_bn_running]="--config.mask_bias_init=1.0 --config.use_metalearning=False $running"
  [mark_default_init_bn_running]="$running"
  # F^t's batch-norm modes compared over the first ten tasks with the KB frozen ('running'
  # of seeds 48, 49, 51 is read from the 20-task kb_frozen_after_task0_bn_running runs).
  [kb_frozen_bn_running_10tasks]="$frozen --config.max_tasks=10 $running"
  [kb_frozen_bn_recomputed_10tasks]="$frozen --config.max_tasks=10 --config.feature_bn_statistics=recomputed"
  [kb_frozen_bn_batch_10tasks]="$frozen --config.max_tasks=10 --config.feature_bn_statistics=batch"
)
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=(mark:48 kb_frozen_after_task0:48 no_metalearning:48 mark:49 kb_frozen_after_task0:49
    no_metalearning:49 mark:51 kb_frozen_after_task0:51 no_metalearning:51)
fi
for run in "${runs[@]}"; do
  variant="${run%%:*}"
  seed="${run##*:}"
  name="${variant}_seed${seed}"
  # shellcheck disable=SC2086  # the variant's flags are meant to split
  python launch.py --config configs/miniimagenet32_cpu.py --workdir "$runs_dir/$name" \
    --config.seed="$seed" ${variants[$variant]}
  results="results/miniimagenet32_cpu"
  [[ $variant == *_10tasks ]] && results="results/miniimagenet32_cpu_first10"
  mkdir -p "$results/$name"
  cp "$runs_dir/$name/results.json" "$results/$name/results.json"
done

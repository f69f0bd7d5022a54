r"""Runs MARK: `python launch.py --config configs/cifar100.py --workdir DIR`.

Config values are overridden as `--config.key=value` (every key is listed in the config
file). Relaunching the same command on the same DIR resumes after the last finished task;
Ctrl-C (SIGINT) or SIGTERM stops between two steps and says where the run will resume.

The paper's protocol, three seeds in one command (each seed in DIR/seed_<seed>, resumable;
then DIR gets the report of mark_jax.report, mean ± std over the seeds):
  python launch.py --config configs/cifar100.py --workdir DIR --seeds=48,49,51
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from mark_jax import train
from mark_jax.runtime import devices, errors, logs

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py); override its keys as --config.key=value."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory: config, checkpoints, metrics, results.json (or a gs:// URL)."
)
_SEEDS = flags.DEFINE_list(
  "seeds",
  None,
  "Run these seeds one after another, each in WORKDIR/seed_<seed>, then report them together "
  "in WORKDIR (the authors' protocol: 48,49,51).",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Continue in a workdir that was started with a different config (the old config.json is "
  "kept under another name).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  "",
  "host:port of process 0, to join processes started by hand (scripts/multihost_local.sh); "
  "empty: one process, or, with --config.distributed=True, a TPU slice that finds its hosts.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", 1, "Processes of the run (with --coordinator_address).", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id",
  0,
  "This process's number, 0..num_processes-1 (with --coordinator_address).",
  lower_bound=0,
)
flags.mark_flags_as_required(["config", "workdir"])


def run_seeds(config, workdir: str, seeds: list[int]) -> None:
  """Runs `config` once per seed in workdir/seed_<seed>, then reports them in workdir."""
  import jax

  from mark_jax import report  # Its flags only matter here.

  seed_dirs = []
  for seed in seeds:
    seeded = config.copy_and_resolve_references()
    seeded.seed = seed
    seed_dirs.append(os.path.join(workdir, f"seed_{seed}"))
    logging.info("=== seed %d in %s", seed, seed_dirs[-1])
    train.train_and_evaluate(seeded, seed_dirs[-1], _ALLOW_CONFIG_CHANGE.value)
  if jax.process_index() == 0:
    print(report.build_report(seed_dirs, workdir))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logs.quiet_logs()
  import jax  # After flag parsing, so --help stays fast.

  devices.set_cpu_devices(_CONFIG.value.cpu_devices)
  if _COORDINATOR.value or _CONFIG.value.distributed:
    if _PROCESS_ID.value >= _NUM_PROCESSES.value:
      raise app.UsageError(f"--process_id={_PROCESS_ID.value}: must be below --num_processes")
    devices.join_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logs.label_process(jax.process_index(), jax.process_count())
  logging.info(
    "JAX %s on %s: process %d of %d, %d devices",
    jax.__version__,
    jax.default_backend(),
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
  )
  if _SEEDS.value:
    try:
      seeds = [int(seed) for seed in _SEEDS.value]
    except ValueError:
      raise errors.ConfigError(f"--seeds={','.join(_SEEDS.value)}: not integers") from None
    run_seeds(_CONFIG.value, _WORKDIR.value, seeds)
  else:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)


if __name__ == "__main__":
  errors.run_or_exit(main, _CONFIG)

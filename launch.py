r"""Runs MARK: `python launch.py --config configs/cifar100.py --workdir DIR`.

Config values are overridden as `--config.key=value` (every key is listed in the config
file). Relaunching the same command on the same DIR resumes after the last finished task;
Ctrl-C (SIGINT) or SIGTERM stops between two steps and says where the run will resume.

The paper's protocol, three seeds in one command (each seed in DIR/seed_<seed>, resumable;
then DIR gets the report of mark_jax.report, mean ± std over the seeds):
  python launch.py --config configs/cifar100.py --workdir DIR --seeds=48,49,51

Seeds crossed with step sizes of the metalearning round, all trained as one compiled
program (mark_jax.runs; each run in DIR/meta_step_size=<value>/seed_<seed>):
  python launch.py --config configs/cifar100.py --workdir DIR --seeds=48,49,51 \
    --sweep=meta_step_size=0,0.001,0.01 --config.runs_in_one_program=True
"""

import os
import re

from absl import app, flags, logging
from ml_collections import config_flags

from mark_jax.runtime import errors

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py); override its keys as --config.key=value."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory: config, checkpoints, metrics, results.json (or a gs:// URL)."
)
_SEEDS = flags.DEFINE_list(
  "seeds",
  None,
  "Run these seeds, each in WORKDIR/seed_<seed>, then report them together in WORKDIR (the "
  "authors' protocol: 48,49,51): as one program with --config.runs_in_one_program=True "
  "(default on GPU/TPU), else one after another.",
)
_SWEEP = flags.DEFINE_multi_string(
  "sweep",
  [],
  "KEY=V1,V2,...: also run each value of this step size of the metalearning round "
  "(meta_step_size, meta_sign, meta_weight_decay, inner_learning_rate, inner_weight_decay), "
  "crossed with the seeds and with other --sweep flags, each in WORKDIR/KEY=VALUE/seed_<seed>.",
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


def run_many(config, workdir: str, seeds: list[int], sweeps: list[str]) -> None:
  """Runs every seed x swept setting in its own folder of `workdir`, then reports them there."""
  import jax

  from mark_jax import report, runs, train  # Their flags and imports only matter here.

  planned = runs.expand(config, seeds, runs.parse_sweeps(config, sweeps))
  run_dirs = [os.path.join(workdir, folder) for folder, _ in planned]
  configs = [run_config for _, run_config in planned]
  if len(planned) > 1 and runs.in_one_program(config):
    logging.info("=== %d runs as one program in %s", len(planned), workdir)
    runs.train_and_evaluate_runs(configs, run_dirs, _ALLOW_CONFIG_CHANGE.value)
  else:
    for run_dir, run_config in zip(run_dirs, configs, strict=True):
      logging.info("=== seed %d in %s", run_config.seed, run_dir)
      train.train_and_evaluate(run_config, run_dir, _ALLOW_CONFIG_CHANGE.value)
  stopped = {run_dir: runs.stopped_results(run_dir) for run_dir in run_dirs}
  finished = [run_dir for run_dir, results in stopped.items() if results is None]
  for run_dir, results in stopped.items():
    if results is not None:
      logging.warning("%s stopped: %s", run_dir, results[runs.STOPPED])
  if jax.process_index() == 0 and finished:
    print(report.build_report(finished, workdir))


def check_process_flags(distributed: bool) -> None:
  """Refuses a half-given or malformed process group (app.UsageError, one line).

  --coordinator_address, --num_processes and --process_id come together; without them a
  process would train alone (on a slice, each worker as process 0 in the shared workdir).
  """
  given = [
    f"--{name}={flags.FLAGS[name].value}"
    for name in ("coordinator_address", "num_processes", "process_id")
    if flags.FLAGS[name].present
  ]
  address = _COORDINATOR.value
  if address:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise app.UsageError(f"--coordinator_address={address}: expected HOST:PORT")
    missing = [f"--{n}" for n in ("num_processes", "process_id") if not flags.FLAGS[n].present]
    if missing:
      raise app.UsageError(f"--coordinator_address={address}: give {' and '.join(missing)} too")
  elif given and not distributed:
    raise app.UsageError(
      f"{' '.join(given)}: give --coordinator_address=HOST:PORT of process 0 as well "
      "(or --config.distributed=True on a TPU slice)"
    )
  if (address or distributed) and _PROCESS_ID.value >= _NUM_PROCESSES.value:
    raise app.UsageError(f"--process_id={_PROCESS_ID.value}: must be below --num_processes")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  check_process_flags(_CONFIG.value.distributed)
  # Imported after flag parsing, so that --help and flag mistakes answer at once.
  import jax

  from mark_jax import train
  from mark_jax.runtime import devices, logs

  logs.quiet_logs()

  devices.set_cpu_devices(_CONFIG.value.cpu_devices)
  if _COORDINATOR.value or _CONFIG.value.distributed:
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
  try:
    if _SEEDS.value or _SWEEP.value:
      try:
        seeds = [int(seed) for seed in _SEEDS.value or [_CONFIG.value.seed]]
      except ValueError:
        raise errors.ConfigError(f"--seeds={','.join(_SEEDS.value)}: not integers") from None
      run_many(_CONFIG.value, _WORKDIR.value, seeds, _SWEEP.value)
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except (jax.errors.JaxRuntimeError, ValueError) as error:
    if jax.process_count() == 1 or not _failed_collective(error):
      raise
    # A collective failed: another process of the group stopped or lost its connection.
    raise errors.TrainingError(
      f"a collective operation failed ({errors.one_line(error)}): another process of the "
      "run has stopped; relaunch every process with the same command to resume after the "
      "last saved task"
    ) from None


# How the runtime's statuses begin; device_put's cross-process check re-raises one as a
# ValueError (e.g. "UNKNOWN: Gloo AllGather failed: ... Connection reset by peer").
_RUNTIME_STATUS = re.compile(
  r"(UNKNOWN|INTERNAL|UNAVAILABLE|ABORTED|CANCELLED|DEADLINE_EXCEEDED): "
)


def _failed_collective(error: Exception) -> bool:
  """Whether `error` is the runtime's report of a failed operation across processes."""
  import jax

  return isinstance(error, jax.errors.JaxRuntimeError) or bool(_RUNTIME_STATUS.match(str(error)))


if __name__ == "__main__":
  errors.run_or_exit(main, _CONFIG)

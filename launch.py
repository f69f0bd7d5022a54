r"""Runs MARK: `python launch.py --config configs/cifar100.py --workdir DIR`.

Config values are overridden as `--config.key=value`. Relaunching the same command on the
same DIR resumes after the last finished task.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mark_jax import errors, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-file INFO lines (several dozen per checkpoint); keeps its warnings."""
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import jax  # After flag parsing, so --help stays fast.

  if _CONFIG.value.distributed:
    jax.distributed.initialize()
  logging.info(
    "JAX %s on %s: process %d of %d, %d devices",
    jax.__version__,
    jax.default_backend(),
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
  )
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except errors.UserError as error:
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)

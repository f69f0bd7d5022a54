"""Checks that a workdir can hold a run, before any training.

- `check_writable`: the directory can be created and written.
- `check_free_space`: the disk has room for every task's checkpoint.
- `check_config`: a workdir started with another configuration is refused (the keys in
  `CHANGEABLE_KEYS` may differ), unless the user forces it; the config is then saved. A
  key that the workdir's config lacks (added to the code since) takes the value that run
  used (config_checks.MISSING_KEY_VALUES).
"""

import json
import os
import shutil
import time

from absl import logging
from etils import epath

from mark_jax.config_checks import MISSING_KEY_VALUES
from mark_jax.runtime.errors import WorkdirError

CONFIG_FILE = "config.json"
# Keys that do not change a run's numbers beyond float rounding: where data and
# checkpoints come from, devices, the evaluation chunk size (accuracies are exact counts),
# how a round maps over its mini-tasks.
CHANGEABLE_KEYS = frozenset(
  {
    "data_dir",
    "download",
    "distributed",
    "cpu_devices",
    "runs_in_one_program",
    "restore_task",
    "restore_dir",
    "eval_batch_size",
    "mini_task_map",
  }
)
FORCE_FLAG = "--allow_config_change"


def is_local(path) -> bool:
  """Whether `path` is on this machine (not a cloud URL such as gs://bucket/run)."""
  return "://" not in str(path)


def write_atomically(path: epath.Path, text: str) -> None:
  """Writes through a temporary file, so a reader (or a kill) never leaves half a file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def unused_path(directory: epath.Path, stem: str, suffix: str = "") -> epath.Path:
  """directory/<stem>-<local time><suffix>, with -2, -3, ... added until the name is free."""
  base = f"{stem}-{time.strftime('%Y%m%dT%H%M%S')}"
  path, count = directory / f"{base}{suffix}", 1
  while path.exists():
    count += 1
    path = directory / f"{base}-{count}{suffix}"
  return path


def check_writable(workdir: epath.Path) -> None:
  """Creates `workdir` if needed and writes (then removes) a probe file in it."""
  probe = workdir / f".write_probe_{time.time_ns()}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("probe")
    probe.unlink()
  except OSError as error:
    raise WorkdirError(f"cannot write to workdir {workdir}: {error.strerror or error}") from None


def check_free_space(workdir: epath.Path, needed_bytes: int) -> None:
  """Raises WorkdirError when a local workdir's disk has less than `needed_bytes` free."""
  if not is_local(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise WorkdirError(
      f"the disk of workdir {workdir} has {free / 2**20:.0f} MiB free; the run's checkpoints "
      f"need about {needed_bytes / 2**20:.0f} MiB: free some space or use another --workdir"
    )


def flatten_config(config: dict, prefix: str = "") -> dict:
  """Nested dicts as one dict of dotted keys: {'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def saved_as_run(config: dict) -> dict:
  """A run's saved config with each key it lacks (added to the code after the run started)
  set to the value that run used (MISSING_KEY_VALUES, whose keys are all top-level)."""
  return {**MISSING_KEY_VALUES, **config}


def flatten_as_run(config: dict) -> dict:
  """A run's saved config flattened, as that run used it (saved_as_run)."""
  return flatten_config(saved_as_run(config))


def config_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
  """(key, saved value, current value) for every key that differs, changeable keys aside.

  A key that `saved` lacks counts as the value its run used (flatten_as_run).
  """
  saved, current = flatten_as_run(saved), flatten_config(current)
  return [
    (key, saved.get(key, "<absent>"), current.get(key, "<absent>"))
    for key in sorted(set(saved) | set(current))
    if key not in CHANGEABLE_KEYS and saved.get(key) != current.get(key)
  ]


def same_place(a, b) -> bool:
  """Whether two workdir paths or URLs name the same directory."""
  if is_local(str(a)) and is_local(str(b)):
    return os.path.realpath(a) == os.path.realpath(b)
  return str(a).rstrip("/") == str(b).rstrip("/")


def read_saved_config(workdir: epath.Path) -> dict | None:
  """The workdir's config.json as a dict, None if it has none.

  Raises:
    WorkdirError: config.json is not valid JSON.
  """
  path = workdir / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise WorkdirError(f"{path} is not valid JSON ({error}); move it away to go on") from None


def fill_keys_as_run(workdir: epath.Path, config) -> dict | None:
  """Sets each key that the workdir's config.json lacks (added to the code after its run
  started) in `config` to the value that run used (MISSING_KEY_VALUES).

  Returns:
    The workdir's config.json as a dict, None if it has none.
  """
  saved = read_saved_config(workdir)
  if saved is None:
    return None
  for key in MISSING_KEY_VALUES.keys() - flatten_config(saved).keys() - CHANGEABLE_KEYS:
    if config[key] != MISSING_KEY_VALUES[key]:
      logging.info(
        "%s started before config.%s existed: it goes on as it ran, with %r",
        workdir,
        key,
        MISSING_KEY_VALUES[key],
      )
      config[key] = MISSING_KEY_VALUES[key]
  return saved


def check_config(workdir: epath.Path, config, allow_change: bool, is_writer: bool) -> None:
  """Refuses a workdir started with another config; saves the config as config.json.

  Keys missing from the workdir's config.json are first set in `config` to the value that
  run used (fill_keys_as_run).

  Args:
    workdir: the run's directory.
    config: the run's ml_collections config.
    allow_change: continue anyway (the previous config.json is kept as
      config.before-<time>.json).
    is_writer: whether this process writes files (process 0).

  Raises:
    WorkdirError: the workdir's config.json differs in keys outside CHANGEABLE_KEYS.
  """
  path = workdir / CONFIG_FILE
  saved = fill_keys_as_run(workdir, config)
  text = config.to_json_best_effort(indent=2)
  if saved is not None:
    differences = config_differences(saved, json.loads(text))
    if differences and not allow_change:
      listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in differences)
      raise WorkdirError(
        f"workdir {workdir} was started with another config ({listed}); use a new "
        f"--workdir, or pass {FORCE_FLAG} to continue with this one"
      )
    if not differences:
      return
    if is_writer:
      path.rename(unused_path(workdir, "config.before", ".json"))
  if is_writer:
    write_atomically(path, text)

"""Shared fixtures: one compilation cache for the whole session, one reference run.

Most of a tiny run's time is XLA compiling its programs. The session's persistent
compilation cache is set in the environment before any test runs, so that every process
the suite starts (pytest-xdist's workers, launch.py, the multi-host script) loads what an
earlier one compiled, and the tenth launch of the same program compiles nothing.
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import filelock
import jax
import pytest

from tiny import Reference, checkpoint_digests, lowered_programs, read_results, tiny_config

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
CACHE_SIZE_LIMIT = 16 * 2**30  # bytes: far above what the suite writes (tiny_config: ~1 MB)
_made_cache = []  # the cache directory this session made (and removes), if it made one


def pytest_configure(config):
  """Gives this process and its children one compilation cache.

  A cache the user set (JAX_COMPILATION_CACHE_DIR) is used as it is, and kept.
  """
  del config
  if not os.environ.get(CACHE_VARIABLE):
    _made_cache.append(tempfile.mkdtemp(prefix="mark_jax_tests_cache_"))
    os.environ[CACHE_VARIABLE] = _made_cache[0]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  # By default JAX names a folder inside the cache (for GPU autotuning results) in every
  # program's compile options, and so in its cache key: a copy of the cache at another path
  # (killable_env) would then miss every entry. The suite runs on CPU and needs no such folder.
  os.environ["JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES"] = "none"
  # A size limit makes JAX lock the cache (filelock) while it reads or writes an entry, so
  # that one worker never reads an entry another is still writing.
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(CACHE_SIZE_LIMIT)
  jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  jax.config.update("jax_compilation_cache_max_size", CACHE_SIZE_LIMIT)


# The files whose tests take longest, longest first (their summed times in
# results/test_suite/ci_run_316552b_durations.log): pytest-xdist (--dist loadfile
# --no-loadscope-reorder) hands out files in this order, so the long ones start at once and
# short ones fill the end. test_runs.py first makes the reference while the other worker
# runs README's command, which needs none.
LONGEST_FIRST = (
  "test_runs.py",
  "test_digits_run.py",
  "test_multihost.py",
  "test_devices.py",
  "test_prepare.py",
  "test_resnet18.py",
  "test_metalearning.py",
  "test_experience.py",
  "test_reliability.py",
  "test_bench.py",
  "test_train.py",
  "test_feature_statistics.py",
  "test_models.py",
  "test_report.py",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  del config
  for directory in _made_cache:
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def killable_env(tmp_path) -> dict[str, str]:
  """The environment of a subprocess that may be SIGKILLed: a copy of the session's cache.

  JAX writes cache entries in place, not atomically; a kill while writing would leave a
  truncated entry for every later process. The copy starts warm and is thrown away.
  """
  copy = tmp_path / "killable_cache"
  shutil.copytree(os.environ[CACHE_VARIABLE], copy)
  return {**os.environ, CACHE_VARIABLE: str(copy)}


def _session_dir(tmp_path_factory) -> Path:
  """A folder that every pytest-xdist worker of this session shares."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
  """The session's one in-process run of tiny_config(), read by every test comparing to it.

  The first worker that needs it trains it, counting the programs lowered by the end of
  each task (kept in reference.finished); the others wait for it and read it.
  """
  from mark_jax import programs, train

  workdir = _session_dir(tmp_path_factory) / "reference"
  finished = workdir.with_name("reference.finished")
  with filelock.FileLock(f"{workdir}.lock"):
    if not finished.exists():
      shutil.rmtree(workdir, ignore_errors=True)
      programs.forget_programs()  # its own programs, lowered (and counted) by this run
      lowered_by_task = []
      with lowered_programs() as lowered:

        @contextlib.contextmanager
        def count_lowered_by_task(part):
          yield
          if part == "task":
            lowered_by_task.append(len(lowered))

        train.train_and_evaluate(tiny_config(), str(workdir), timer=count_lowered_by_task)
      finished.write_text(json.dumps(lowered_by_task))
  return Reference(
    workdir,
    read_results(workdir),
    checkpoint_digests(workdir),
    json.loads(finished.read_text()),
  )


@pytest.fixture
def copy_workdir(tmp_path):
  def copy(source: str) -> str:
    target = os.path.join(tmp_path, "copy")
    shutil.copytree(source, target)
    return target

  return copy

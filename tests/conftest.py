"""Shared fixtures: one compilation cache for the whole session, one reference run.

Most of a tiny run's time is XLA compiling its programs. The session's persistent
compilation cache is set in the environment before any test runs, so that every process
the suite starts (launch.py, the multi-host script) loads what an earlier one compiled,
and the tenth launch of the same program compiles nothing.
"""

import os
import shutil
import tempfile

import jax
import pytest

from tiny import Reference, checkpoint_digests, read_results, tiny_config

CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
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
  jax.config.update("jax_compilation_cache_dir", os.environ[CACHE_VARIABLE])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


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


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Reference:
  """The session's one in-process run of tiny_config(), read by every test comparing to it."""
  from mark_jax import train

  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(tiny_config(), str(workdir))
  return Reference(workdir, read_results(workdir), checkpoint_digests(workdir))


@pytest.fixture
def copy_workdir(tmp_path):
  def copy(source: str) -> str:
    target = os.path.join(tmp_path, "copy")
    shutil.copytree(source, target)
    return target

  return copy

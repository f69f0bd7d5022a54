"""Shared fixtures: a compilation cache, one finished smoke run reused by several tests."""

import os
import shutil

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache


@pytest.fixture(scope="session", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for the session: tests that build the same programs
  again (a new Trainer of the same config, a relaunch) load them instead of compiling.

  Never give it to a process that gets SIGKILLed: JAX does not write cache entries
  atomically.
  """
  cache_dir = tmp_path_factory.mktemp("jax_cache")
  compilation_cache.reset_cache()
  compilation_cache.set_cache_dir(str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield cache_dir
  compilation_cache.reset_cache()


@pytest.fixture
def cached_env(compilation_cache_dir) -> dict[str, str]:
  """The environment of a subprocess that uses (and fills) the session's compilation cache."""
  return {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(compilation_cache_dir),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """(workdir, results) of one uninterrupted run of configs/smoke.py."""
  from configs import smoke
  from mark_jax import train

  workdir = str(tmp_path_factory.mktemp("smoke"))
  results = train.train_and_evaluate(smoke.get_config(), workdir)
  return workdir, results


@pytest.fixture
def copy_workdir(tmp_path):
  def copy(source: str) -> str:
    target = os.path.join(tmp_path, "copy")
    shutil.copytree(source, target)
    return target

  return copy

"""Shared fixtures: tiny configs and one finished smoke run reused by several tests."""

import os
import shutil

import pytest


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

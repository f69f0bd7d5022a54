"""mark_jax.runtime.devices: the host CPU as several devices, multi-device runs (8 fake CPU
devices), and compilation across tasks."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mark_jax.runtime import checkpointing, devices

from tiny import abstract_state, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_TASK = """
import json, sys
import jax, numpy as np
sys.path[:0] = [{root!r}, {tests!r}]
from tiny import fresh_run, tiny_config
from mark_jax import mark
from mark_jax import programs as programs_lib

benchmark, run, state = fresh_run(tiny_config(eval_batch_size=40))  # divisible by 8
state = mark.train_task(run, 0, state, benchmark.tasks[0])
test = programs_lib.device_test_data(run.config, run.programs.mesh, benchmark.tasks)
accuracy = run.programs.evaluate_all(state["knowledge_base"], state["tasks"], test, 1)
leaves = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state["knowledge_base"])]
print(json.dumps({{"devices": jax.device_count(), "mesh": dict(run.programs.mesh.shape),
                  "accuracy": float(accuracy[0]), "kb": leaves}}))
"""


def _start_one_task(device_count: int) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}")
  code = ONE_TASK.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
  return subprocess.Popen(
    [sys.executable, "-c", code],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def _result(process: subprocess.Popen) -> dict:
  stdout, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


def test_eight_devices_give_the_one_device_results(reference):
  """Task 0 on eight devices against the reference's checkpoint of task 0 (one device)."""
  eight = _result(_start_one_task(8))
  assert eight["devices"] == 8
  assert eight["mesh"] == {"mini_tasks": 4, "batch": 2}
  run_state, matrix, _ = checkpointing.restore(
    checkpointing.manager(reference.workdir / "checkpoints"), 0, abstract_state(tiny_config())
  )
  assert abs(matrix[0, 0] - eight["accuracy"]) <= 1 / 100 + 1e-6  # one test image at most
  one = [np.asarray(x).ravel() for x in jax.tree.leaves(run_state["knowledge_base"])]
  for a, b in zip(one, eight["kb"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_mesh_splits_mini_tasks_then_batch():
  cpus = np.array(jax.devices() * 8)[:8]
  sizes = {"batch_size": 128, "eval_batch_size": 64}
  mesh = devices.make_mesh(10, sizes, devices=cpus)
  assert dict(mesh.shape) == {"mini_tasks": 2, "batch": 4}
  with pytest.raises(ValueError, match="eval_batch_size 100 is not divisible by the 8"):
    devices.make_mesh(10, {**sizes, "eval_batch_size": 100}, devices=cpus)


def test_nothing_recompiles_between_tasks(reference):
  """Tasks 1 and 2 of the reference run (trained, evaluated, saved) lowered no program."""
  counts = reference.lowered_by_task
  assert len(counts) == 3 and counts[0] > 0  # the listener does see compilations
  assert counts[1] == counts[0], f"task 1 compiled {counts[1] - counts[0]} programs"
  assert counts[2] == counts[1], f"task 2 compiled {counts[2] - counts[1]} programs"


@pytest.mark.parametrize(
  "user_env, expected",
  [
    ({}, 2),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),
    ({"JAX_NUM_CPU_DEVICES": "4"}, 4),
  ],
)
def test_cpu_devices_unless_the_user_chose_a_count(user_env, expected):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(user_env, JAX_PLATFORMS="cpu")
  code = (
    "from mark_jax.runtime import devices; devices.set_cpu_devices(2); "
    "import jax; print(jax.device_count())"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert int(result.stdout.split()[-1]) == expected

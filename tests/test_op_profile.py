"""mark_jax.op_profile on small compiled programs traced into one folder."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from mark_jax import op_profile


def _report(program, args, trace_dir) -> dict:
  compiled = jax.jit(program).lower(*args).compile()
  outputs, report = op_profile.profile(compiled, args, trace_dir)
  np.testing.assert_allclose(outputs, program(*args), rtol=1e-6)  # the program's outputs
  seconds = [op["seconds"] for op in report["ops"]]
  assert seconds == sorted(seconds, reverse=True)
  names = op_profile.instructions(compiled.as_text())
  assert all(op["name"] in names for op in report["ops"])
  return report


def test_a_trace_lists_its_programs_ops_slowest_first_and_the_newest_is_read(tmp_path):
  small, large = jnp.ones((8, 8)), jnp.ones((2048, 2048))
  _report(lambda a: jnp.tanh(a).sum(), (small,), str(tmp_path))
  time.sleep(1.1)  # the profiler names each trace's folder by the second
  report = _report(lambda a: jnp.tanh(a @ a).sum(), (large,), str(tmp_path))
  assert len(list(tmp_path.rglob("*.xplane.pb"))) == 2
  # The newest trace, the matmul's, is read: its ops account for most of its time.
  named = sum(op["seconds"] for op in report["ops"])
  assert 0.3 * report["seconds"] < named <= 4 * report["seconds"]

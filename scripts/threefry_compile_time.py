r"""XLA:CPU compile time of Threefry: JAX's CPU lowering (a loop over the five rounds) vs
the unrolled one that mark_jax.runtime.compilation registers, and whether the bits agree.

  python scripts/threefry_compile_time.py --repeats 3

Times, alternately for the two lowerings in fresh subprocesses, the backend compilation of
one jax.random.bits draw and of init_run_state for configs/cifar100.py (20 tasks), and
prints each time and the sums of the values.
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax
from jax._src.interpreters import mlir
from jax._src.random import threefry2x32
from configs import cifar100
from mark_jax import state
from mark_jax.models import Networks

if sys.argv[1] == "jax":  # undo mark_jax's registration (done on importing mark_jax.models)
  mlir.register_lowering(
    threefry2x32.threefry2x32_p, threefry2x32._threefry2x32_cpu_lowering_rule, platform="cpu"
  )
key = jax.random.PRNGKey(0)
nets = Networks(cifar100.get_config(), 32, 5)
programs = {
  "bits": (jax.jit(lambda k: jax.random.bits(k, (3, 3, 3, 64))), (key,)),
  "init_run_state": (state.init_run_state, (nets, key, 20)),
}
out = {}
for name, (fn, args) in programs.items():
  lowered = fn.lower(*args)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  values = compiled(*[a for a in args if isinstance(a, jax.Array)])
  total = sum(float(x.astype("float64").sum()) for x in jax.tree.leaves(values))
  out[name] = {"compile_s": seconds, "sum": total}
print(json.dumps(out))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  for repeat in range(args.repeats):
    for lowering in ("jax", "unrolled"):
      result = subprocess.run(
        [sys.executable, "-c", CHILD, lowering], capture_output=True, text=True, check=True
      )
      print(json.dumps({"repeat": repeat, "lowering": lowering, **json.loads(result.stdout)}))


if __name__ == "__main__":
  main()

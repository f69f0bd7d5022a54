"""Where a compiled program's time goes, op by op: a jax.profiler trace read back.

  outputs, report = op_profile.profile(compiled, args, "/tmp/trace")

runs `compiled(*args)` once under `jax.profiler`, then sums the trace's events by the name of
the compiled program's HLO instruction they executed (a fusion, a dot, a concatenation)
over all devices and threads, and joins each with its shape and the JAX operation it came
from (the instruction's `op_name`). Events of nested programs and of the runtime
(`ThunkExecutor`, waits) are left out. XLA:CPU runs some dots (Eigen's) asynchronously: the
trace then holds only their launch, so their time shows in no row.
"""

import collections
import pathlib
import re
import time

import jax

_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?P<shape>\S+) (?P<opcode>[\w\-]+)\("
  r"(?:.*?op_name=\"(?P<source>[^\"]*)\")?",
  re.M,
)


def instructions(hlo_text: str) -> dict[str, dict[str, str]]:
  """Each instruction of an HLO module's text by name: its shape, opcode and source op."""
  return {
    m["name"]: {"shape": m["shape"], "opcode": m["opcode"], "source": m["source"] or ""}
    for m in _INSTRUCTION.finditer(hlo_text)
  }


def op_seconds(trace_dir: str, names) -> collections.Counter:
  """Seconds of the trace's events per instruction name, summed over devices and threads.

  Args:
    trace_dir: the folder jax.profiler wrote; its newest trace is read.
    names: the instruction names to count; other events are left out.
  """
  xspace = max(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  seconds = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(str(xspace)).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          seconds[event.name] += event.duration_ns * 1e-9
  return seconds


def profile(compiled, args, trace_dir: str) -> tuple[object, dict]:
  """Runs `compiled(*args)` once under the profiler.

  Returns:
    (the call's outputs, {'seconds': wall time of the call, 'ops': [{'name', 'seconds',
    'shape', 'opcode', 'source'}, ...] slowest first}).
  """
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  outputs = jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - start
  jax.profiler.stop_trace()
  hlo = instructions(compiled.as_text())
  ops = [
    {"name": name, "seconds": spent, **hlo[name]}
    for name, spent in op_seconds(trace_dir, hlo).most_common()
  ]
  return outputs, {"seconds": seconds, "ops": ops}

"""XLA:CPU compile time: jax.random's Threefry hash lowered unrolled.

On CPU, JAX lowers the Threefry-2x32 hash behind every random draw (initialisers, dropout,
shuffles) as a loop over its five rounds; on GPU and TPU it lowers the same rounds
unrolled. XLA:CPU compiles the unrolled form several times faster and both give the same
bits, so every program of a run is registered with the unrolled form
(docs/performance.md has the measurements).
"""

from absl import logging


def unroll_threefry_on_cpu() -> None:
  """Lowers Threefry on CPU as JAX does on other backends: same values, faster compilation.

  Uses JAX internals; if they have moved (a JAX release other than the pinned ones), logs
  and keeps JAX's own lowering, which only costs compile time.
  """
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32

    mlir.register_lowering(
      threefry2x32.threefry2x32_p, threefry2x32._threefry2x32_lowering_rule, platform="cpu"
    )
  except (ImportError, AttributeError) as error:
    logging.info("Threefry keeps JAX's CPU lowering (%s)", error)

"""torch and torchvision (the test extra), the reference some tests compare with."""

import gc


def import_torchvision():
  """torchvision, imported with the garbage collector off.

  Python 3.11's import lock breaks (a KeyError in importlib._bootstrap, cpython gh-91351) when
  a collection during an import runs a finalizer that imports too; torch's long import met
  one from earlier tests' garbage in CI.
  """
  gc.collect()
  gc.disable()
  try:
    import torchvision
  finally:
    gc.enable()
  return torchvision

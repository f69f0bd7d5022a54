"""Loading dataset pickles from the internet without running their code.

`pickle.load` calls whatever importable function a file names, so a crafted file can run
any command. The dataset pickles MARK reads (CIFAR-100's python version, the
MiniImageNet distributions) hold only dicts, lists, strings, numbers and numpy arrays;
`load` admits exactly the globals needed to rebuild those and refuses everything else.
"""

import io
import pickle
from typing import Any, BinaryIO

from mark_jax.runtime.errors import DataError

# (module, name) pairs that rebuild numpy arrays and dtypes, under numpy 1 and 2 names.
_ALLOWED_GLOBALS = frozenset(
  {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 rebuilds arrays from their buffers.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    # Protocol-2 pickles written by Python 3 encode bytes through this call.
    ("_codecs", "encode"),
  }
)


class _RefusedGlobal(pickle.UnpicklingError):
  """The pickle names a global outside _ALLOWED_GLOBALS."""


class _RestrictedUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED_GLOBALS:
      raise _RefusedGlobal(f"{module}.{name}")
    return super().find_class(module, name)


def load(file: BinaryIO, source: str) -> Any:
  """Unpickles numpy arrays, dicts, lists, strings and numbers; refuses anything else.

  Args:
    file: an open binary file.
    source: the file's name, for error messages.

  Returns:
    The unpickled object. Python 2 pickles are read with `encoding='latin1'`.

  Raises:
    DataError: the file is not a pickle, or it names a global outside the allowed set
      (the message names the file and the refused global).
  """
  try:
    return _RestrictedUnpickler(file, encoding="latin1").load()
  except _RefusedGlobal as error:
    raise DataError(
      f"{source}: refused to unpickle: it asks for {error}, which a dataset pickle does not "
      f"need (only numpy arrays, dicts, lists, strings and numbers are admitted); "
      f"the file may be crafted or corrupt"
    ) from None
  except (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
  ) as error:
    detail = " ".join(str(error).split())
    raise DataError(f"{source}: not a readable pickle ({type(error).__name__}: {detail})") from None


def loads(data: bytes, source: str) -> Any:
  """`load` for bytes in memory."""
  return load(io.BytesIO(data), source)

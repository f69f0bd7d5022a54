"""Loading dataset pickles from the internet without running their code.

`pickle.load` calls whatever importable function a file names, so a crafted file can run
any command. The dataset pickles MARK reads (CIFAR-100's python version, the
MiniImageNet distributions) hold only dicts, lists, strings, numbers and numpy arrays;
`load` admits exactly the globals needed to rebuild those and refuses everything else.

Arrays are rebuilt only the way numpy pickles them (`_reconstruct` then `__setstate__` with
the bytes in the file, or `_frombuffer` under protocol 5, copied), never by calling
`ndarray` itself: that call can lay a huge shape with zero strides over a one-byte buffer,
an array that passes every check until the first copy asks for terabytes. Every array must
own its bytes (or keep the file's own) and fit in the file.
"""

import io
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

from mark_jax.runtime.errors import DataError

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1 and 2 names
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")


class _RefusedGlobal(pickle.UnpicklingError):
  """The pickle names a global outside the admitted ones."""


class _ArrayType:
  """What the unpickler hands out for `numpy.ndarray`: a name for `_reconstruct`, not a
  constructor the pickle could call."""

  def __new__(cls, *args, **kwargs):
    raise _RefusedGlobal("a call of numpy.ndarray itself")


class _RestrictedUnpickler(pickle.Unpickler):
  def __init__(self, file: BinaryIO, max_bytes: int):
    super().__init__(file, encoding="latin1")
    self._max_bytes = max_bytes

  def _reconstruct(self, array_type, shape, dtype):
    """numpy's `_reconstruct` for plain arrays no larger than the file."""
    if array_type is not _ArrayType:
      raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    self._check_size(shape, dtype)
    return np.ndarray.__new__(np.ndarray, shape, dtype)

  def _frombuffer(self, buffer, dtype, shape, order):
    """numpy's protocol-5 `_frombuffer`, as an array that owns a copy of its bytes."""
    self._check_size(shape, dtype)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy(order="K")

  def _check_size(self, shape, dtype) -> None:
    claimed = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if claimed > self._max_bytes:
      raise pickle.UnpicklingError(
        f"an array of shape {tuple(shape)} ({claimed:,} bytes) cannot come from a file of "
        f"{self._max_bytes:,} bytes"
      )

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("numpy", "ndarray"):
      return _ArrayType
    if (module, name) == ("numpy", "dtype") or (module, name) == ("_codecs", "encode"):
      # dtypes; protocol-2 pickles written by Python 3 encode bytes through _codecs.encode.
      return super().find_class(module, name)
    if module in _NUMPY_MODULES and name == "scalar":
      return super().find_class(module, name)
    if module in _NUMPY_MODULES and name == "_reconstruct":
      return self._reconstruct
    if module in _NUMERIC_MODULES and name == "_frombuffer":
      return self._frombuffer
    raise _RefusedGlobal(f"{module}.{name}")


def _owns_its_bytes(array: np.ndarray) -> bool:
  """True if `array` owns its data, or lies within the bytes that `__setstate__` read from
  the file (numpy keeps those instead of copying them)."""
  if array.flags.owndata:
    return True
  return isinstance(array.base, bytes) and array.nbytes <= len(array.base)


def _check_arrays(content: Any) -> None:
  """Raises UnpicklingError if an array in `content` does not own its bytes."""
  stack = [content]
  while stack:
    item = stack.pop()
    if isinstance(item, dict):
      stack.extend(item.keys())
      stack.extend(item.values())
    elif isinstance(item, list | tuple):
      stack.extend(item)
    elif isinstance(item, np.ndarray) and not _owns_its_bytes(item):
      raise pickle.UnpicklingError(f"an array of shape {item.shape} does not own its data")


def _size(file: BinaryIO) -> int:
  """The bytes left in `file` from its current position."""
  start = file.tell()
  end = file.seek(0, os.SEEK_END)
  file.seek(start)
  return end - start


def load(file: BinaryIO, source: str) -> Any:
  """Unpickles numpy arrays, dicts, lists, strings and numbers; refuses anything else.

  Args:
    file: an open binary file (seekable).
    source: the file's name, for error messages.

  Returns:
    The unpickled object. Python 2 pickles are read with `encoding='latin1'`.

  Raises:
    DataError: the file is not a pickle, it names a global outside the admitted set, or
      it holds an array that does not own its data or claims more bytes than the file
      has; the message names the file (and the refused global).
  """
  try:
    content = _RestrictedUnpickler(file, _size(file)).load()
    _check_arrays(content)
    return content
  except _RefusedGlobal as error:
    raise DataError(
      f"{source}: refused to unpickle: it asks for {error}, which a dataset pickle does not "
      f"need (only numpy arrays, dicts, lists, strings and numbers are admitted); "
      f"the file may be crafted or corrupt"
    ) from None
  except Exception as error:  # MemoryError and RecursionError included: any file, one line
    detail = " ".join(str(error).split())
    raise DataError(f"{source}: not a readable pickle ({type(error).__name__}: {detail})") from None


def loads(data: bytes, source: str) -> Any:
  """`load` for bytes in memory."""
  return load(io.BytesIO(data), source)

"""Checks of single config values: each returns None when a value is fine, else what is
allowed ("must be ..."). Standard library only."""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from mark_jax.shapes import MIN_IMAGE_SIZE

Check = Callable[[Any], str | None]

SEED_LIMIT = 2**32  # numpy's RandomState takes seeds below 2**32.


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_str(value: Any) -> bool:
  return isinstance(value, str)


def check(ok: Callable[[Any], bool], allowed: str) -> Check:
  """The Check that passes values for which `ok` holds and otherwise says `allowed`."""
  return lambda value: None if ok(value) else allowed


positive_int = check(lambda v: _is_int(v) and v > 0, "must be a positive integer")
non_negative_int = check(lambda v: _is_int(v) and v >= 0, "must be a non-negative integer")
seed = check(lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "must be an integer in [0, 2**32)")
positive_float = check(lambda v: _is_finite_number(v) and v > 0, "must be a positive finite number")
non_negative_float = check(
  lambda v: _is_finite_number(v) and v >= 0, "must be a non-negative finite number"
)
unit_interval = check(lambda v: _is_finite_number(v) and 0 <= v < 1, "must be a number in [0, 1)")
optional_float = check(
  lambda v: v is None or _is_finite_number(v), "must be None or a finite number"
)
optional_non_negative_int = check(
  lambda v: v is None or (_is_int(v) and v >= 0), "must be None or a non-negative integer"
)
boolean = check(lambda v: isinstance(v, bool), "must be True or False")
optional_boolean = check(lambda v: v is None or isinstance(v, bool), "must be None, True or False")
string = check(_is_str, "must be a string")
zero_or_network_size = check(
  lambda v: _is_int(v) and (v == 0 or v >= MIN_IMAGE_SIZE),
  f"must be 0 (the dataset's size) or an integer >= {MIN_IMAGE_SIZE}",
)


def zero_or_min_int(minimum: int, zero: str) -> Check:
  """0 (meaning `zero`) or an integer >= minimum."""
  return check(
    lambda v: _is_int(v) and (v == 0 or v >= minimum),
    f"must be 0 ({zero}) or an integer >= {minimum}",
  )


def min_int(minimum: int) -> Check:
  """An integer >= minimum."""
  return check(lambda v: _is_int(v) and v >= minimum, f"must be an integer >= {minimum}")


def one_of(names: Sequence[str]) -> Check:
  """One of the given names."""
  return check(lambda v: _is_str(v) and v in names, f"must be one of: {', '.join(sorted(names))}")


def positive_ints(length: int) -> Check:
  """A sequence of exactly `length` positive integers."""
  return check(
    lambda v: (
      isinstance(v, Sequence)
      and not _is_str(v)
      and len(v) == length
      and all(_is_int(x) and x > 0 for x in v)
    ),
    f"must be a sequence of exactly {length} positive integers",
  )

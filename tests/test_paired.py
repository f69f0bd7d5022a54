"""Paired comparisons (mark_jax.paired): t intervals, Holm's adjustment, pairing units."""

import numpy as np
import pytest

from mark_jax import paired


def test_t_interval_on_a_hand_made_table():
  # Differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 dof) = 4.302653,
  # half-width 4.302653 / sqrt(3) = 2.484138; t statistic 2 * sqrt(3) = 3.4641, p = 0.0742.
  result = paired.t_interval([0.01, 0.02, 0.03])
  assert result["n"] == 3
  assert result["mean"] == pytest.approx(0.02)
  assert result["std"] == pytest.approx(0.01)
  assert result["low"] == pytest.approx(0.02 - 0.02484138, abs=1e-7)
  assert result["high"] == pytest.approx(0.02 + 0.02484138, abs=1e-7)
  assert result["p"] == pytest.approx(0.0742, abs=5e-4)


def test_t_interval_of_one_unit_has_no_spread():
  assert paired.t_interval([0.5]) == {
    "n": 1,
    "mean": 0.5,
    "std": None,
    "low": None,
    "high": None,
    "p": None,
  }


def test_holm_steps_down_and_keeps_order():
  # Sorted 0.01, 0.02, 0.04 times 3, 2, 1 -> 0.03, 0.04, 0.04 (monotone); None stays.
  adjusted = paired.holm([0.04, 0.01, None, 0.02])
  assert adjusted == pytest.approx([0.04, 0.03, None, 0.04])


def _matrix(final, learned):
  """A seen accuracy matrix with the given last row and diagonal (2 tasks)."""
  return np.array([[learned[0], np.nan], [final[0], final[1]]])


def test_differences_pair_seeds_or_tasks():
  baseline = {48: _matrix([0.8, 0.9], [0.85, 0.9]), 49: _matrix([0.7, 0.9], [0.7, 0.9])}
  variant = {48: _matrix([0.9, 0.9], [0.9, 0.9]), 49: _matrix([0.7, 1.0], [0.75, 1.0]), 50: None}
  by_seed = paired.differences(baseline, variant, "seed")
  assert by_seed["seeds"] == [48, 49]
  assert by_seed["acc"] == pytest.approx([0.05, 0.05])
  assert by_seed["bwt"] == pytest.approx([0.05, -0.05])  # (0 - -0.05), (-0.05 - 0)
  by_task = paired.differences(baseline, variant, "task")
  assert by_task["acc"] == pytest.approx([0.1, 0.0, 0.0, 0.1])
  assert by_task["bwt"] == pytest.approx([0.05, -0.05])


def test_compare_adjusts_each_metric_over_the_variants():
  baseline = {s: _matrix([0.8, 0.8], [0.8, 0.8]) for s in (1, 2, 3)}
  better = {s: _matrix([0.8 + 0.01 * s, 0.8], [0.8 + 0.01 * s, 0.8]) for s in (1, 2, 3)}
  same = dict(baseline)
  result = paired.compare(baseline, {"better": better, "same": same})
  assert result["better"]["acc"]["mean"] == pytest.approx(0.01)  # (0.01, 0.02, 0.03) / 2
  assert result["same"]["acc"]["p"] == 1.0
  assert result["better"]["acc"]["p_holm"] == pytest.approx(
    min(1.0, 2 * result["better"]["acc"]["p"])
  )
  table = paired.markdown(result, "frozen")
  assert "| better | 1, 2, 3 | seed (3) | +1.00 |" in table
  with pytest.raises(ValueError, match="unit must be one of"):
    paired.compare(baseline, {}, "run")

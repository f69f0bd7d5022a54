"""ACC, BWT and forgetting against hand-computed values."""

import numpy as np
import pytest

from mark_jax import metrics

NAN = np.nan
MATRIX = np.array(
  [
    [0.90, NAN, NAN],
    [0.80, 0.70, NAN],
    [0.60, 0.75, 0.50],
  ]
)


def test_acc_is_mean_of_last_row():
  assert metrics.average_accuracy(MATRIX) == pytest.approx((0.60 + 0.75 + 0.50) / 3)


def test_bwt_gem_definition():
  # (0.60 - 0.90 + 0.75 - 0.70) / 2
  assert metrics.backward_transfer(MATRIX) == pytest.approx(-0.125)


def test_forgetting_uses_best_earlier_accuracy():
  assert metrics.forgetting(MATRIX) == pytest.approx([0.30, -0.05])


def test_single_task_has_zero_bwt():
  assert metrics.backward_transfer(np.array([[0.4]])) == 0.0


def test_summary_marks_unseen_tasks_null():
  summary = metrics.summarize(MATRIX, tasks_completed=2)
  assert summary["accuracy_matrix"] == [[0.90, None, None], [0.80, 0.70, None]]
  assert summary["acc"] == pytest.approx(0.75)
  assert summary["bwt"] == pytest.approx(-0.10)
  assert summary["tasks_completed"] == 2

"""The shared-F, random-F and KB-only ablations run steps 1, 3 and 5 as the authors' code
does."""

import jax
import numpy as np
import optax
import pytest

from mark_jax import mark, state
from mark_jax import programs as programs_lib
from mark_jax.data import datasets

from tiny import fresh_run, tiny_config


def _phases_run(config, tasks: int, monkeypatch) -> list[tuple[int, str, str]]:
  """(task, phase, step) of every train_phase and train_feature_extractor call in the first
  `tasks` tasks."""
  benchmark = datasets.load_benchmark(config)
  programs = programs_lib.build_programs(config, benchmark)
  calls = []

  def spy(run, name, model, data_, rng, task, step=None):
    """Records the call; the order of the steps does not depend on what they train."""
    calls.append((task, name, step or name))
    return model

  monkeypatch.setattr(mark, "train_phase", spy)

  def feature_spy(run, model, data_, rng, task):
    calls.append((task, "feature_extractor", "feature_extractor"))
    return model["feature_extractor"]

  monkeypatch.setattr(mark, "train_feature_extractor", feature_spy)
  run_state = state.initial(programs.nets, config.seed, len(benchmark.tasks), programs.mesh)
  for t in range(tasks):
    run_state = mark.train_task(mark.Run(config, programs), t, run_state, benchmark.tasks[t])
  return calls


@pytest.mark.parametrize(
  "overrides, expected",
  [
    (
      {"shared_feature_extractor": True},
      [
        (0, "feature_extractor", "feature_extractor"),
        (0, "kb_pretrain", "kb_pretrain"),
        (0, "masks", "masks"),
        (0, "masks", "consolidation"),
        (1, "masks_without_own_features", "masks"),
        (1, "masks_without_own_features", "consolidation"),
      ],
    ),
    (
      {"shared_feature_extractor": True, "random_feature_extractor": True},
      [
        (0, "kb_pretrain", "kb_pretrain"),
        (0, "masks", "masks"),
        (0, "masks", "consolidation"),
        (1, "masks", "masks"),
        (1, "masks", "consolidation"),
      ],
    ),
    (
      {"use_feature_extractor": False, "use_masks": False},
      [
        (0, "kb_pretrain", "kb_pretrain"),
        (0, "masks_without_own_features", "consolidation"),
        (1, "masks_without_own_features", "consolidation"),
      ],
    ),
  ],
)
def test_steps_1_3_and_5_without_own_features(overrides, expected, monkeypatch):
  config = tiny_config(meta_rounds=0, **overrides)
  assert _phases_run(config, 2, monkeypatch) == expected


def test_without_own_features_the_masks_learn_at_a_tenth():
  config = tiny_config()
  benchmark = datasets.load_benchmark(config)
  phases = programs_lib.build_programs(config, benchmark).phases
  params = {"w": jax.numpy.ones(3)}
  grads = {"w": jax.numpy.ones(3)}

  def first_update(name):
    optimizer = phases[name].optimizer
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.tree.norm(updates)

  ratio = first_update("masks_without_own_features") / first_update("masks")
  assert abs(float(ratio) - config.no_own_features_lr_factor) < 1e-6


def test_a_random_feature_extractor_keeps_its_initialisation_for_every_task():
  """random_feature_extractor: F^0 is never trained and serves task 1 too; its batch-norm
  statistics are those of its random weights on task 0's images (recomputed)."""
  config = tiny_config(shared_feature_extractor=True, random_feature_extractor=True)
  benchmark, run, run_state = fresh_run(config)
  initial = jax.tree.map(np.array, run_state["tasks"]["feature_extractor"])  # before donation
  for t in range(2):
    run_state = mark.train_task(run, t, run_state, benchmark.tasks[t])
  trained = run_state["tasks"]["feature_extractor"]
  for before, after in zip(
    jax.tree.leaves(initial["params"]), jax.tree.leaves(trained["params"]), strict=True
  ):
    np.testing.assert_array_equal(after[0], before[0])  # F^0 as initialised
    np.testing.assert_array_equal(after[1], before[0])  # and task 1's F is F^0
  statistics = jax.tree.leaves(trained["batch_stats"])
  assert all(
    not np.array_equal(s[0], i[0])
    for s, i in zip(statistics, jax.tree.leaves(initial["batch_stats"]), strict=True)
  )

"""The shared-F and KB-only ablations run steps 3 and 5 as the authors' code does."""

import jax
import optax
import pytest

from mark_jax import data, train

from tiny import tiny_config


def _phases_run(config, tasks: int) -> list[tuple[int, str, str]]:
  """(task, phase, step) of every train_phase call in the first `tasks` tasks."""
  benchmark = data.load_benchmark(config)
  trainer = train.Trainer(config, benchmark)
  calls = []
  original = trainer.train_phase

  def spy(name, model, data_, rng, task, step=None):
    calls.append((task, name, step or name))
    return original(name, model, data_, rng, task, step)

  trainer.train_phase = spy
  state = trainer.init_state(len(benchmark.tasks))
  for t in range(tasks):
    state = trainer.train_task(t, state, benchmark.tasks[t])
  return calls


@pytest.mark.parametrize(
  "overrides, expected",
  [
    (
      {"shared_feature_extractor": True},
      [
        (0, "kb_pretrain", "kb_pretrain"),
        (0, "masks", "masks"),
        (0, "masks", "consolidation"),
        (1, "masks_without_own_features", "masks"),
        (1, "masks_without_own_features", "consolidation"),
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
def test_steps_3_and_5_without_own_features(overrides, expected):
  config = tiny_config(meta_rounds=0, **overrides)
  assert _phases_run(config, 2) == expected


def test_without_own_features_the_masks_learn_at_a_tenth():
  config = tiny_config()
  benchmark = data.load_benchmark(config)
  trainer = train.Trainer(config, benchmark)
  params = {"w": jax.numpy.ones(3)}
  grads = {"w": jax.numpy.ones(3)}

  def first_update(name):
    optimizer = trainer.phases[name].optimizer
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.tree.norm(updates)

  ratio = first_update("masks_without_own_features") / first_update("masks")
  assert abs(float(ratio) - config.no_own_features_lr_factor) < 1e-6

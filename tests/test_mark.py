"""One task of MARK (mark_jax.mark): each step trains exactly what it should."""

import jax
import numpy as np
import pytest

from mark_jax import mark, models
from mark_jax import programs as programs_lib

from tiny import fresh_run, run_key, task_model, tiny_config


def _snapshot(tree):
  return jax.tree.map(np.array, tree)


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def _changed(a, b) -> bool:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return any(not np.array_equal(x, y) for x, y in pairs)


@pytest.fixture(scope="module")
def tiny():
  return fresh_run(tiny_config())


@pytest.mark.parametrize("phase", ["kb_pretrain", "masks", "kb_sgd"])
def test_phase_trains_exactly_its_parameters(tiny, phase):
  benchmark, run, state = tiny
  model = task_model(state, 1)
  before = _snapshot(model)
  data_on_device = programs_lib.device_data(run.config, run.programs.mesh, benchmark.tasks[1])
  after = mark.train_phase(run, phase, model, data_on_device, run_key(run, 0), 1)
  trainable = run.programs.phases[phase].trainable
  assert set(after) == set(before)
  for name in before:
    if name in trainable:
      assert _changed(before[name], after[name]), f"{phase} did not train {name}"
    else:
      _assert_same(before[name], after[name])


def test_feature_phase_trains_weights_and_batch_statistics(tiny):
  benchmark, run, state = tiny
  model = task_model(state, 0)
  before = _snapshot(model["feature_extractor"])
  data_on_device = programs_lib.device_data(run.config, run.programs.mesh, benchmark.tasks[0])
  after = mark.train_feature_extractor(run, model, data_on_device, run_key(run, 0), 0)
  assert _changed(before["params"], after["params"])
  assert _changed(before["batch_stats"], after["batch_stats"])


def test_task_leaves_other_tasks_and_frozen_kb_untouched(tiny):
  benchmark, _, state = tiny
  config = tiny_config(meta_rounds=0)  # "KB frozen after task 0": step 4 skipped
  run = mark.Run(config, programs_lib.build_programs(config, benchmark))
  before = _snapshot(state)
  after = mark.train_task(run, 1, jax.tree.map(lambda a: a.copy(), state), benchmark.tasks[1])
  _assert_same(before["knowledge_base"], after["knowledge_base"])
  for t in (0, 2):
    _assert_same(
      jax.tree.map(lambda a, t=t: a[t], before["tasks"]),
      jax.tree.map(lambda a, t=t: np.asarray(a)[t], after["tasks"]),
    )
  for part in ("feature_extractor", "mask_generator", "head"):
    assert _changed(
      jax.tree.map(lambda a: a[1], before["tasks"][part]),
      jax.tree.map(lambda a: np.asarray(a)[1], after["tasks"][part]),
    )
  assert _changed(before["rng"], after["rng"])


def test_scores_of_one_pass_equal_each_quantity_computed_alone(tiny):
  """A step's validation (programs.scores) over two eval batches, with weight 0 on some right
  and some wrong examples and on the one of the largest mask value: accuracy, largest mask
  and mean latent norm of the weighted examples, each computed as it is defined."""
  benchmark, run, state = tiny
  nets, model = run.programs.nets, task_model(state, 1)
  split = benchmark.tasks[1].test
  assert len(split) == 2 * run.config.eval_batch_size

  @jax.jit  # one compiled program, not one per operation
  def alone(model, images):
    x = models.standardize(images, benchmark.mean, benchmark.std)
    masks = nets.masks(model, x, True)
    latent = nets.latent(model, x, masks, train=False, rng=None)
    return nets.logits(model, x, masks, train=False, rng=None), masks, latent

  logits, masks, latent = jax.device_get(alone(model, split.images))
  right = np.argmax(logits, -1) == split.labels
  assert right.any() and not right.all()
  ignored = [*np.flatnonzero(right)[:10], *np.flatnonzero(~right)[:10]]
  ignored.append(int(np.argmax(np.max(np.concatenate(masks, axis=1), axis=1))))
  weights = np.ones(len(split), np.float32)
  weights[ignored] = 0.0
  real = weights > 0

  scores = run.programs.scores(model, split.images, split.labels, weights, True)
  assert scores["accuracy"] == pytest.approx(right[real].mean(), abs=1e-6)
  assert scores["mask_max"] == pytest.approx(max(m[real].max() for m in masks), rel=1e-6)
  norms = np.linalg.norm(latent[real], axis=-1)
  assert scores["latent_norm"] == pytest.approx(norms.mean(), rel=1e-5)

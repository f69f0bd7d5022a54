"""F^t's batch-norm statistics in the three modes of config.feature_bn_statistics."""

import jax
import numpy as np
import pytest

from mark_jax import mark, models, phases
from mark_jax import programs as programs_lib
from mark_jax.models import Networks

from tiny import fresh_run, run_key, task_model, tiny_config


def _snapshot(tree):
  return jax.tree.map(np.array, tree)


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _fresh_feature_extractor(count: int):
  """(networks, a fresh F^t's variables, `count` random images) of the tiny config."""
  config = tiny_config()
  nets = Networks(config, config.image_size, 5)
  variables = jax.jit(nets.init_task)(jax.random.PRNGKey(0))["feature_extractor"]
  shape = (count, config.image_size, config.image_size, 3)
  return nets, variables, jax.random.uniform(jax.random.PRNGKey(1), shape)


def test_recomputed_statistics_are_the_population_mean_and_mean_batch_variance():
  nets, variables, images = _fresh_feature_extractor(24)
  mean, std = MEAN, STD
  batch_size = 8  # three full batches
  statistics = phases.make_feature_statistics_fn(nets, batch_size, mean, std)
  stats = statistics(variables, images, jax.random.PRNGKey(2))

  # The first BN layer's input does not depend on the batch: its recomputed mean is the
  # mean over every image and position, its variance the mean of the batches' variances.
  @jax.jit  # one compiled program, not one per operation
  def intermediates(variables, images):
    return nets.feature_extractor.apply(
      variables,
      models.normalize(images, mean, std),
      train=False,
      capture_intermediates=True,
    )[1]

  captured = intermediates(variables, images)
  conv = np.asarray(captured["intermediates"]["Conv_0"]["__call__"][0])
  np.testing.assert_allclose(
    stats["BatchNorm_0"]["mean"], conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
  )
  order, _ = phases.batch_indices(jax.random.PRNGKey(2), 24, batch_size)
  batch_variances = [conv[np.asarray(idx)].var(axis=(0, 1, 2)) for idx in order]
  np.testing.assert_allclose(
    stats["BatchNorm_0"]["var"], np.mean(batch_variances, axis=0), rtol=1e-3, atol=1e-6
  )
  assert not np.allclose(stats["BatchNorm_1"]["var"], 1.0)  # not the initial statistics


@pytest.fixture(scope="module", params=["running", "recomputed", "batch"])
def run_of_mode(request):
  config = tiny_config(feature_bn_statistics=request.param)
  return request.param, *fresh_run(config)


def test_masks_phase_updates_feature_statistics_only_in_batch_mode(run_of_mode):
  mode, benchmark, run, run_state = run_of_mode
  model = task_model(run_state, 1)
  before = _snapshot(model["feature_extractor"])
  device_data = programs_lib.device_data(run.config, run.programs.mesh, benchmark.tasks[1])
  after = mark.train_phase(run, "masks", model, device_data, run_key(run, 0), 1)
  for x, y in zip(
    jax.tree.leaves(before["params"]),
    jax.tree.leaves(after["feature_extractor"]["params"]),
    strict=True,
  ):
    np.testing.assert_array_equal(x, y)  # F^t's weights never train after its phase
  stats_changed = any(
    not np.array_equal(x, y)
    for x, y in zip(
      jax.tree.leaves(before["batch_stats"]),
      jax.tree.leaves(after["feature_extractor"]["batch_stats"]),
      strict=True,
    )
  )
  assert stats_changed == (mode == "batch")


def test_feature_phase_recomputes_statistics_only_in_recomputed_mode(run_of_mode):
  mode, benchmark, run, run_state = run_of_mode
  model = task_model(run_state, 0)
  device_data = programs_lib.device_data(run.config, run.programs.mesh, benchmark.tasks[0])
  trained = mark.train_feature_extractor(run, model, device_data, run_key(run, 3), 0)
  recomputed = run.programs.feature_statistics(
    {"params": trained["params"], "batch_stats": trained["batch_stats"]},
    device_data["train_image"],
    run_key(run, 4),
  )
  # With any batch order the recomputed means agree (the first layer's exactly); the
  # running averages of the phase lag behind the trained weights.
  close = np.allclose(
    trained["batch_stats"]["BatchNorm_0"]["mean"],
    recomputed["BatchNorm_0"]["mean"],
    rtol=1e-4,
    atol=1e-5,
  )
  assert close == (mode == "recomputed")


def test_task_features_are_the_feature_extractor_on_every_image():
  """make_features_fn in batches of 8 (the last one padded) equals F^t on all images at once."""
  nets, variables, images = _fresh_feature_extractor(21)
  features = jax.jit(phases.make_features_fn(nets, 8, MEAN, STD))(variables, images)
  direct = nets.feature_extractor.apply(variables, models.normalize(images, MEAN, STD), train=False)
  assert features.shape == (21, nets.feature_extractor.feature_dim)
  np.testing.assert_allclose(features, direct, rtol=1e-5, atol=1e-6)


def test_masks_read_the_task_features_except_in_batch_mode(run_of_mode):
  """After F^t's step the phases get its features with the images (mark.with_task_features),
  the same masks as F^t on the images; in batch mode F^t runs on each batch instead."""
  mode, benchmark, run, run_state = run_of_mode
  model = task_model(run_state, 1)
  device_data = programs_lib.device_data(run.config, run.programs.mesh, benchmark.tasks[1])
  data = mark.with_task_features(run.programs, run.config, model, device_data)
  if mode == "batch":
    assert data is device_data
    return
  inputs = data["train_image"]
  assert set(inputs) == {"image", "features"}
  nets, mean, std = run.programs.nets, benchmark.mean, benchmark.std
  images = models.normalize(inputs["image"], mean, std)
  cached = nets.masks(model, {"image": images, "features": inputs["features"]}, True)
  direct = nets.masks(model, images, True)
  for a, b in zip(cached, direct, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

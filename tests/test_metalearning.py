"""The weighted Reptile step and the vmapped mini-task adaptation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mark_jax import metalearning, models
from mark_jax.data import datasets, facts
from mark_jax.phases import sgd

from tiny import tiny_config


def _tree(seed):
  key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w": jax.random.normal(key1, (3, 4)), "b": jax.random.normal(key2, (4,))}


def _distance(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return sum(float(jnp.sum((x - y) ** 2)) for x, y in pairs)


@pytest.fixture
def reptile_inputs():
  theta = _tree(0)
  adapted = [_tree(k + 1) for k in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *adapted)
  accuracies = jnp.array([0.2, 0.5, 0.3])
  weights = np.array([0.2, 0.5, 0.3])
  target = jax.tree.map(lambda *a: sum(w * x for w, x in zip(weights, a, strict=True)), *adapted)
  return theta, stacked, accuracies, target


def test_paper_sign_moves_towards_the_weighted_mean(reptile_inputs):
  theta, stacked, accuracies, target = reptile_inputs
  step = 0.1
  new = metalearning.reptile_update(
    theta, stacked, accuracies, sgd(step, momentum=0.0, weight_decay=0.0), scale=1.0
  )
  expected = jax.tree.map(lambda t, m: t + step * (m - t), theta, target)
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert _distance(new, target) < _distance(theta, target)


def test_authors_update_moves_away_by_one_kth(reptile_inputs):
  # The released code: grad = sum_k w_k (theta_k - theta) / K, then theta -= lr * grad.
  theta, stacked, accuracies, target = reptile_inputs
  step, num_mini_tasks = 0.1, 3
  new = metalearning.reptile_update(
    theta,
    stacked,
    accuracies,
    sgd(step, momentum=0.0, weight_decay=0.0),
    scale=-1.0 / num_mini_tasks,
  )
  expected = jax.tree.map(lambda t, m: t - step * (m - t) / num_mini_tasks, theta, target)
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert _distance(new, target) > _distance(theta, target)


def test_weight_decay_shrinks_the_kb(reptile_inputs):
  theta, _, accuracies, _ = reptile_inputs
  same = jax.tree.map(lambda a: jnp.stack([a] * 3), theta)  # adapted copies == theta
  new = metalearning.reptile_update(
    theta, same, accuracies, sgd(0.1, momentum=0.0, weight_decay=0.5)
  )
  for got, start in zip(jax.tree.leaves(new), jax.tree.leaves(theta), strict=True):
    np.testing.assert_allclose(got, start * (1 - 0.1 * 0.5), rtol=1e-6)


def test_accuracy_weights():
  np.testing.assert_allclose(metalearning.accuracy_weights(jnp.array([1.0, 3.0])), [0.25, 0.75])
  np.testing.assert_allclose(metalearning.accuracy_weights(jnp.zeros(4)), [0.25] * 4)


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_mini_tasks_mapped_in_groups_keep_their_order(groups):
  def fn(x, pair):
    return {"sum": x + pair[0], "product": x * pair[1]}, jnp.sum(x)

  x = jnp.arange(6 * 4.0).reshape(6, 4)
  pairs = (jnp.arange(6.0), jnp.arange(6.0) + 1)
  want = jax.vmap(fn)(x, pairs)
  got = jax.jit(metalearning.mini_task_map("map", groups)(fn))(x, pairs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(g, w)


def test_mini_task_map_by_backend():
  assert metalearning.mini_task_map("vmap", 2) is jax.vmap
  assert metalearning.mini_task_map("auto", 2) is not jax.vmap  # CPU: one after another
  with pytest.raises(ValueError, match="mini_task_map must be one of"):
    metalearning.mini_task_map("pmap", 2)


def round_config(**overrides):
  """tiny_config() with the round's shape shared by these tests (2 mini-tasks x 4 steps):
  the rounds they compile with the same static settings are one program."""
  return tiny_config(inner_steps=4, mini_tasks=2, **overrides)


def round_inputs(config) -> tuple:
  """(nets, KB, task variables, images, labels): fresh variables of `config`'s networks (each
  init one compiled program) and the 100 synthetic training images of 5 classes."""
  nets = models.Networks(config, config.image_size, 5)
  kb = jax.jit(nets.init_knowledge_base)(jax.random.PRNGKey(0))
  task = jax.jit(nets.init_task)(jax.random.PRNGKey(1))
  train, _ = datasets.synthetic_splits(
    num_classes=5, train_per_class=20, test_per_class=1, image_size=config.image_size, seed=0
  )
  return nets, kb, task, jnp.asarray(train.images), jnp.asarray(train.labels)


def as_arrays(settings: dict) -> dict:
  return {k: jnp.float32(v) for k, v in settings.items()}


@pytest.mark.parametrize(("accuracy_batch", "groups"), [("same", 1), ("next", 2)])
def test_vmapped_round_equals_the_mini_tasks_one_after_another(accuracy_batch, groups):
  config = round_config(meta_accuracy_batch=accuracy_batch)
  config.conv_impl = "patches"
  nets, kb, task, images, labels = round_inputs(config)
  settings = as_arrays(metalearning.round_settings(config))
  args = (task, images, labels, jax.random.PRNGKey(2), settings)
  mean, std = facts.CIFAR_MEAN, facts.CIFAR_STD
  vmapped = jax.jit(metalearning.make_meta_round(nets, config, mean, std))
  in_turn = metalearning.mini_task_map("map", groups)
  looped = jax.jit(metalearning.make_meta_round(nets, config, mean, std, mini_task_map=in_turn))
  kb_v, metrics_v = vmapped(kb, *args)
  kb_l, metrics_l = looped(kb, *args)
  for got, want in zip(jax.tree.leaves(kb_v), jax.tree.leaves(kb_l), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics_v["inner_loss"], metrics_l["inner_loss"], rtol=1e-4)
  np.testing.assert_allclose(
    metrics_v["mini_task_accuracy"], metrics_l["mini_task_accuracy"], atol=1e-6
  )
  assert _distance(kb_v, kb) > 0  # the round did move the KB


def test_settings_given_as_arrays_equal_settings_compiled_in():
  config = round_config(meta_step_size=0.05, meta_sign="authors")
  nets, kb, task, images, labels = round_inputs(config)
  settings = metalearning.round_settings(config)
  assert settings["meta_scale"] == pytest.approx(-1 / config.mini_tasks)
  meta_round = metalearning.make_meta_round(nets, config, facts.CIFAR_MEAN, facts.CIFAR_STD)
  compiled_in = jax.jit(functools.partial(meta_round, settings=settings))
  as_inputs = jax.jit(meta_round)
  args = (task, images, labels, jax.random.PRNGKey(2))
  kb_constants, _ = compiled_in(kb, *args)
  arrays = as_arrays(settings)
  kb_arrays, _ = as_inputs(kb, *args, arrays)
  for got, want in zip(jax.tree.leaves(kb_arrays), jax.tree.leaves(kb_constants), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert _distance(kb_arrays, kb) > 0
  # A zero step leaves the KB exactly where it was (the frozen KB of a sweep).
  kb_still, _ = as_inputs(kb, *args, {**arrays, "meta_step_size": jnp.float32(0.0)})
  for got, want in zip(jax.tree.leaves(kb_still), jax.tree.leaves(kb), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("inner_grad_clip", [0.0, 1.0])
def test_hot_state_round_is_finite_only_with_the_inner_clip(inner_grad_clip):
  # A "hot" state: mask generators whose bias makes every mask about 10 (the three blocks
  # scale the KB's latent by about 1000), and fresh heads, as the digits run met it when
  # its masks had grown to 18-27 and the first inner loss was about 10. An inner step size
  # of 0.05 makes the unclipped round diverge within round_config()'s 4 steps.
  config = round_config(
    mask_bias_init=10.0, inner_learning_rate=0.05, inner_grad_clip=inner_grad_clip
  )
  nets, kb, task, images, labels = round_inputs(config)
  mean, std = facts.CIFAR_MEAN, facts.CIFAR_STD
  meta_round = jax.jit(metalearning.make_meta_round(nets, config, mean, std))
  settings = as_arrays(metalearning.round_settings(config))
  _, metrics = meta_round(kb, task, images, labels, jax.random.PRNGKey(2), settings)
  assert float(metrics["first_inner_loss"]) > 20  # hot indeed
  finite = bool(metrics["params_finite"]) and int(metrics["first_nonfinite_step"]) < 0
  assert finite == (inner_grad_clip > 0)


def _pytorch_reduce_on_plateau_lrs(losses, lr=1.0, factor=0.5, patience=5, threshold=1e-3):
  """The learning rate of each step under PyTorch's ReduceLROnPlateau (mode 'min', rel),
  stepped after each optimiser step with that step's loss."""
  best, bad, lrs = float("inf"), 0, []
  for loss in losses:
    lrs.append(lr)
    if loss < best * (1 - threshold):
      best, bad = loss, 0
    else:
      bad += 1
    if bad > patience:
      lr, bad = lr * factor, 0
  return lrs


def test_inner_plateau_follows_pytorch_reduce_lr_on_plateau():
  rng = np.random.default_rng(0)
  losses = np.concatenate([np.linspace(2.0, 1.0, 5), 1.0 + 0.01 * rng.random(25)])
  losses[12] = 0.5  # one improvement in the middle resets the count
  params = {"w": jnp.ones(2)}
  state = metalearning.PLATEAU.init(params)
  scales = []
  for loss in losses:
    updates, state = metalearning.scale_on_plateau(params, state, jnp.float32(loss))
    scales.append(float(updates["w"][0]))
  expected = _pytorch_reduce_on_plateau_lrs(losses)
  np.testing.assert_allclose(scales, expected, rtol=1e-6)
  assert min(expected) < 1.0  # the sequence does reduce the step size

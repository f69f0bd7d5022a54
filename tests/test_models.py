"""Shapes and behaviour of MARK's modules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar100, miniimagenet
from mark_jax import models


def _networks(config_module, image_size, conv_impl="patches", **overrides):
  config = config_module.get_config()
  config.conv_impl = conv_impl
  for key, value in overrides.items():
    config[key] = value
  return models.Networks(config, image_size, num_classes=5)


@pytest.fixture(scope="module")
def cifar_kb():
  """(networks, KB variables, two images, the KB's apply) of configs/cifar100.py, the KB's
  init and apply each one compiled program (op by op, XLA compiles every operation alone)."""
  nets = _networks(cifar100, 32)
  kb = jax.jit(nets.init_knowledge_base)(jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  return nets, kb, images, jax.jit(nets.knowledge_base.apply, static_argnames="train")


@pytest.mark.parametrize(
  "config_module, size, latent, flatten",
  [(cifar100, 32, 128, 2 * 2 * 256), (miniimagenet, 84, 256, 7 * 7 * 256)],
)
def test_output_shapes(config_module, size, latent, flatten):
  nets = _networks(config_module, size)

  def forward():  # traced for its shapes only, not run
    images = jnp.ones((3, size, size, 3))
    kb = nets.init_knowledge_base(jax.random.PRNGKey(0))
    task = nets.init_task(jax.random.PRNGKey(1))
    masks = nets.masks(task, images, use_masks=True)
    logits = nets.logits({**task, "knowledge_base": kb}, images, masks, train=False, rng=None)
    features = nets.feature_extractor.apply(task["feature_extractor"], images, train=False)
    return kb, masks, logits, features

  kb, masks, logits, features = jax.eval_shape(forward)
  assert kb["params"]["Dense_0"]["kernel"].shape == (flatten, latent)
  assert [m.shape for m in masks] == [(3, 64), (3, 128), (3, 256)]
  assert logits.shape == (3, 5)
  assert features.shape == (3, latent)


def test_feature_extractor_flatten_sizes():
  for module, size, flatten in ((cifar100, 32, 1152), (miniimagenet, 84, 1800)):
    task = jax.eval_shape(_networks(module, size).init_task, jax.random.PRNGKey(0))
    assert task["feature_extractor"]["params"]["Dense_0"]["kernel"].shape[0] == flatten


@pytest.mark.parametrize("impl", ["patches", "winograd"])
@pytest.mark.parametrize(
  "shape, kernel", [((2, 12, 10, 5), 3), ((2, 9, 12, 5), 3), ((2, 9, 9, 5), 4)]
)
def test_convolution_forms_equal_native_with_their_gradients(impl, shape, kernel):
  """Values and both gradients; Winograd where it applies (even output sides of a 3x3)."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  variables = models.Conv(7, kernel, impl="native").init(jax.random.PRNGKey(1), x)

  def loss(impl, variables, x):
    return jnp.sum(jnp.sin(models.Conv(7, kernel, impl=impl).apply(variables, x)))

  expected = jax.value_and_grad(loss, argnums=(1, 2))("native", variables, x)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
    jax.value_and_grad(loss, argnums=(1, 2))(impl, variables, x),
    expected,
  )


def test_winograd_applies_to_even_outputs_of_3x3_kernels_only():
  assert models.winograd_applies((2, 14, 14, 64), 3)
  assert not models.winograd_applies((2, 13, 14, 64), 3)
  assert not models.winograd_applies((2, 14, 14, 64), 4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 12, 5))  # 7x10 output: patches
  variables = models.Conv(7, 3).init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(
    models.Conv(7, 3, impl="winograd").apply(variables, x),
    models.Conv(7, 3, impl="patches").apply(variables, x),
  )


def test_initialisation_follows_pytorch_bounds():
  variables = models.Dense(64).init(jax.random.PRNGKey(0), jnp.zeros((1, 100)))
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  assert float(jnp.max(jnp.abs(kernel))) <= 0.1 and float(jnp.max(jnp.abs(bias))) <= 0.1
  assert float(jnp.max(jnp.abs(kernel))) > 0.09  # uniform over the whole range, not normal(0, .)


def test_zero_mask_zeroes_its_channel(cifar_kb):
  """Masking channel c of block 1 equals removing channel c from that convolution."""
  nets, kb, images, apply = cifar_kb
  ones = models.ones_masks(len(images), nets.kb_channels)
  masks = list(ones)
  masks[0] = masks[0].at[:, 5].set(0.0)
  masked = apply(kb, images, tuple(masks), train=False)
  pruned = jax.tree.map(lambda a: a, kb)
  conv = pruned["params"]["Conv_0"]
  conv["kernel"] = conv["kernel"].at[..., 5].set(0.0)
  conv["bias"] = conv["bias"].at[5].set(0.0)
  unmasked = apply(pruned, images, ones, train=False)
  np.testing.assert_allclose(masked, unmasked, rtol=1e-5, atol=1e-6)
  full = apply(kb, images, ones, train=False)
  assert not np.allclose(full, masked)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_zero_block_mask_cuts_the_input_off(cifar_kb, block):
  nets, kb, images, apply = cifar_kb
  ones = models.ones_masks(len(images), nets.kb_channels)
  masks = list(ones)
  masks[block] = jnp.zeros_like(masks[block])
  out = apply(kb, images, tuple(masks), train=False)
  np.testing.assert_array_equal(out[0], out[1])  # nothing of the image gets through
  ones_out = apply(kb, images, ones, train=False)
  assert not np.allclose(ones_out[0], ones_out[1])


def test_masks_are_per_example_and_bias_init_switch():
  default = _networks(cifar100, 32)
  ones_bias = _networks(cifar100, 32, mask_bias_init=1.0)
  features = jnp.zeros((2, 128))
  params = jax.jit(ones_bias.mask_generator.init)(jax.random.PRNGKey(0), features)
  for mask in jax.jit(ones_bias.mask_generator.apply)(params, features):
    np.testing.assert_allclose(mask, 1.0)  # relu(0 @ W + 1) = 1
  params = jax.jit(default.mask_generator.init)(jax.random.PRNGKey(0), features)
  apply = jax.jit(default.mask_generator.apply)
  first = apply(params, features)[0]
  assert float(jnp.max(first)) < 1.0 / np.sqrt(128) + 1e-6
  two = jax.random.normal(jax.random.PRNGKey(3), (2, 128))
  per_example = apply(params, two)[0]
  assert not np.allclose(per_example[0], per_example[1])


def test_dropout_only_in_training(cifar_kb):
  nets, kb, images, apply = cifar_kb
  masks = models.ones_masks(len(images), nets.kb_channels)

  def run(train, key):
    return apply(kb, images, masks, train=train, rngs={"dropout": jax.random.PRNGKey(key)})

  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert not np.allclose(run(True, 0), run(True, 1))


def test_conv_impl_auto_picks_winograd_on_cpu():
  assert models.resolve_conv_impl("auto") == "winograd"
  with pytest.raises(ValueError):
    models.resolve_conv_impl("fft")


def test_reshape_max_pool_equals_reduce_window():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 29, 29, 4))
  np.testing.assert_array_equal(models.max_pool(x, "patches"), models.max_pool(x, "native"))
  assert models.max_pool(x, "patches").shape == (2, 14, 14, 4)


@pytest.mark.parametrize("impl", ["patches", "native"])
def test_relu_after_the_pool_equals_relu_before_it_with_its_gradient(impl):
  """Windows with ties (at a positive value, at zero) and with every value negative."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 3)).round(1)  # rounding makes ties
  x = x.at[0, :2, :2, 0].set(0.7).at[0, 2:4, :2, 0].set(-0.3).at[1, :2, :2, 1].set(0.0)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))

  def relu_first(x):
    return models.max_pool(jax.nn.relu(x), impl)

  value, vjp = jax.vjp(lambda x: models.pooled_relu(x, impl), x)
  expected_value, expected_vjp = jax.vjp(relu_first, x)
  np.testing.assert_array_equal(value, expected_value)
  np.testing.assert_array_equal(vjp(cotangent)[0], expected_vjp(cotangent)[0])


@pytest.mark.parametrize(
  "shape,kernel", [((2, 32, 31, 3), 4), ((2, 6, 7, 4), 2), ((1, 14, 14, 2), 3)]
)
def test_crop_for_pool_keeps_the_pooled_values(shape, kernel):
  """Cropping what the pool would drop leaves conv -> ReLU -> pool unchanged."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  conv = models.Conv(5, kernel, impl="native")
  variables = conv.init(jax.random.PRNGKey(1), x)

  def block(x):
    return models.max_pool(jax.nn.relu(conv.apply(variables, x)), "native")

  cropped = models.crop_for_pool(x, kernel)
  assert all((side - kernel + 1) % 2 == 0 for side in cropped.shape[1:3])
  np.testing.assert_allclose(block(cropped), block(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["patches", "winograd"])
def test_knowledge_base_forms_agree(cifar_kb, impl):
  """The whole KB gives the same outputs with native and CPU-friendly ops."""
  _, kb, images, _ = cifar_kb
  forms = {form: _networks(cifar100, 32, form) for form in ("native", impl)}
  masks = models.ones_masks(len(images), forms[impl].kb_channels)
  outputs = {
    form: jax.jit(nets.knowledge_base.apply, static_argnames="train")(
      kb, images, masks, train=False
    )
    for form, nets in forms.items()
  }
  np.testing.assert_allclose(outputs["native"], outputs[impl], rtol=1e-4, atol=1e-5)

"""MARK's networks as Flax (Linen) modules.

Data flow for an image x of task t:

  features = FeatureExtractor^t(x)          # F^t, frozen after its own phase
  masks    = MaskGenerator^t(features)      # M^t: one (batch, channels) array per KB block
  latent   = KnowledgeBase(x, masks)        # KB, shared by all tasks
  logits   = Head^t(latent)                 # C^t

With `feature_extractor='resnet18'` F is one frozen ResNet-18 whose features of every image
are computed once (mark_jax.resnet18.with_features): the networks' inputs are then
{'image': x, 'features': ResNet-18(x)} instead of x (`model_inputs`), and no task has
F^t variables of its own.

Every layer is initialised as PyTorch initialises it (uniform in +-1/sqrt(fan_in) for
weights and biases), so that a fresh model behaves like the authors' one; docs/results.md
shows that this matters for the masks.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mark_jax import resnet18, shapes
from mark_jax.runtime import compilation

compilation.unroll_threefry_on_cpu()

Masks = tuple[jax.Array, ...]
_NHWC = ("NHWC", "HWIO", "NHWC")


def normalize(images: jnp.ndarray, mean, std) -> jnp.ndarray:
  """uint8 images -> float32, scaled to [0, 1] then standardised per channel."""
  images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


Inputs = jax.Array | dict  # images, or {'image', 'features'} with cached F features


def model_inputs(arrays: dict) -> Inputs:
  """What the networks read of a split's arrays ('image', and 'features' if cached)."""
  if "features" in arrays:
    return {"image": arrays["image"], "features": arrays["features"]}
  return arrays["image"]


def take(inputs: Inputs, indices) -> Inputs:
  """The examples `indices` of every array of `inputs`."""
  return jax.tree.map(lambda a: a[indices], inputs)


def standardize(inputs: Inputs, mean, std) -> Inputs:
  """`normalize` of the images of `inputs`; cached features stay as they are."""
  if isinstance(inputs, dict):
    return {**inputs, "image": normalize(inputs["image"], mean, std)}
  return normalize(inputs, mean, std)


def images_of(inputs: Inputs) -> jax.Array:
  return inputs["image"] if isinstance(inputs, dict) else inputs


def torch_uniform(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default initialiser for Linear/Conv weights and biases.

  Args:
    fan_in: number of inputs of one output unit (in_features * kernel area).

  Returns:
    An initialiser drawing uniformly from [-1/sqrt(fan_in), 1/sqrt(fan_in)].
  """
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def resolve_conv_impl(conv_impl: str, over_runs: bool = False) -> str:
  """Picks the convolution's form for the current backend.

  XLA:CPU runs native convolutions very slowly inside rolled loops and under vmap
  (jax-ml/jax issue 12868); image patches followed by a matmul avoid both, and Winograd's
  form of the 3x3 convolutions needs 2.25x fewer of their FLOPs. Accelerators run
  the native convolution of one run best; vmapped over runs, each with its own kernels, it
  became a grouped convolution that ran 2.1 times slower than patches on a GPU
  (docs/performance.md), so runs on a run axis use patches there too.

  Args:
    conv_impl: 'native', 'patches', 'winograd' or 'auto'.
    over_runs: whether the networks run vmapped over a run axis (mark_jax.runs).

  Returns:
    'native', 'patches' or 'winograd'.
  """
  if conv_impl == "auto":
    backend = jax.default_backend()
    if backend == "cpu":
      return "winograd"
    return "patches" if over_runs and backend == "gpu" else "native"
  if conv_impl not in shapes.CONV_IMPLS:
    allowed = ", ".join(("auto", *shapes.CONV_IMPLS))
    raise ValueError(f"conv_impl must be one of {allowed}, got {conv_impl!r}")
  return conv_impl


class Dense(nn.Module):
  """Fully connected layer with PyTorch's default initialisation."""

  features: int
  bias_init: nn.initializers.Initializer | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = torch_uniform(x.shape[-1])
    kernel = self.param("kernel", init, (x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init or init, (self.features,))
    return x @ kernel + bias


class Conv(nn.Module):
  """VALID, stride-1 2D convolution (NHWC) in one of three forms, equal up to float rounding.

  Attributes:
    features: output channels.
    kernel_size: square kernel side.
    impl: 'native' (lax.conv_general_dilated), 'patches' (image patches + matmul) or
      'winograd' (`winograd_conv3x3` where `winograd_applies`, patches elsewhere).
  """

  features: int
  kernel_size: int
  impl: str = "native"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    size, channels = self.kernel_size, x.shape[-1]
    init = torch_uniform(channels * size * size)
    kernel = self.param("kernel", init, (size, size, channels, self.features))
    bias = self.param("bias", init, (self.features,))
    if self.impl == "native":
      y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC)
    elif self.impl == "winograd" and winograd_applies(x.shape, size):
      y = winograd_conv3x3(x, kernel)
    else:
      # Patches by slicing, features ordered (row, column, channel) like the HWIO kernel.
      # Slices and a concatenation are cheaper on XLA:CPU than conv_general_dilated_patches
      # (itself a convolution): 138 vs 219 ms per vmapped mini-task step at batch 128.
      rows, cols = x.shape[1] - size + 1, x.shape[2] - size + 1
      shifted = [x[:, i : i + rows, j : j + cols] for i in range(size) for j in range(size)]
      y = patches_matmul(jnp.concatenate(shifted, axis=-1), kernel.reshape(-1, self.features))
    return y + bias


@jax.custom_vjp
def patches_matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """patches @ kernel, whose kernel gradient contracts a transposed copy of the patches.

  XLA:CPU hands a dot to YNNPACK only when the contracted axis of its left operand is the
  innermost one. JAX's own kernel gradient, patches^T @ dy, contracts the positions axis,
  the outer one, and ran on Eigen after transposing dy; storing the patches transposed in
  the forward pass makes it a YNNPACK dot (docs/performance.md). Same values up to float
  rounding.

  Args:
    patches: (..., K) image patches.
    kernel: (K, C_out).

  Returns:
    (..., C_out).
  """
  return patches @ kernel


def _patches_matmul_forward(patches, kernel):
  transposed = patches.reshape(-1, patches.shape[-1]).T
  return patches @ kernel, (transposed, kernel)


def _patches_matmul_backward(residuals, outputs_cotangent):
  transposed, kernel = residuals
  flat = outputs_cotangent.reshape(-1, outputs_cotangent.shape[-1])
  return outputs_cotangent @ kernel.T, transposed @ flat


patches_matmul.defvjp(_patches_matmul_forward, _patches_matmul_backward)


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, arXiv 1509.09308): input
# transform B^T, kernel transform G, output transform A^T.
_WINOGRAD_INPUT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_KERNEL = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_OUTPUT = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_applies(input_shape: Sequence[int], kernel_size: int) -> bool:
  """Whether `winograd_conv3x3` computes this convolution: 3x3 kernel, even output sides."""
  return kernel_size == 3 and all((side - 2) % 2 == 0 for side in input_shape[1:3])


def _transform(matrix, parts: Sequence[jax.Array]) -> list[jax.Array]:
  """matrix @ parts for a small constant matrix (0 entries skipped) and a list of arrays."""
  rows = []
  for row in matrix:
    pairs = zip(row, parts, strict=True)
    terms = [coefficient * part for coefficient, part in pairs if coefficient]
    rows.append(sum(terms[1:], terms[0]))
  return rows


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """VALID 3x3 convolution as Winograd's F(2x2, 3x3): 16 matmuls of 2.25x fewer FLOPs.

  Each 2x2 output tile comes from a 4x4 input tile: the 16 transformed values of all tiles
  at one tile position form one (tiles, C_in) x (C_in, C_out) matmul. Equal to the direct
  convolution up to float rounding.

  Args:
    x: (batch, H, W, C_in) with H - 2 and W - 2 even (`winograd_applies`).
    kernel: (3, 3, C_in, C_out), HWIO.

  Returns:
    (batch, H - 2, W - 2, C_out).
  """
  n, h, w, c = x.shape
  rows, cols = (h - 2) // 2, (w - 2) // 2

  def tile_rows(x, axis, count):  # element k of every 4-wide tile along axis (stride 2)
    return [lax.slice_in_dim(x, k, k + 2 * count - 1, 2, axis) for k in range(4)]

  transformed = [
    column
    for row in _transform(_WINOGRAD_INPUT, tile_rows(x, 1, rows))
    for column in _transform(_WINOGRAD_INPUT, tile_rows(row, 2, cols))
  ]
  transformed = jnp.stack(transformed).reshape(16, n * rows * cols, c)
  g = jnp.array(_WINOGRAD_KERNEL, kernel.dtype)
  kernel = jnp.einsum("ai,ijcd,bj->abcd", g, kernel, g).reshape(16, c, -1)
  products = jnp.einsum("ptc,pcd->ptd", transformed, kernel).reshape(4, 4, n, rows, cols, -1)
  y = [
    jnp.stack(_transform(_WINOGRAD_OUTPUT, list(row)), axis=3)
    for row in _transform(_WINOGRAD_OUTPUT, list(products))
  ]
  return jnp.stack(y, axis=2).reshape(n, 2 * rows, 2 * cols, -1)


def max_pool(x: jax.Array, impl: str) -> jax.Array:
  """2x2 max-pooling, stride 2, odd edges dropped (PyTorch's MaxPool2d(2)).

  'native' uses XLA's reduce_window; the other forms a reshape and a max, whose gradient is far
  cheaper on XLA:CPU than reduce_window's select-and-scatter (78 vs 137 ms per vmapped
  mini-task step at batch 128). Both give the same outputs.
  """
  if impl == "native":
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def pooled_relu(x: jax.Array, impl: str) -> jax.Array:
  """max_pool(relu(x)) of the authors' KB blocks, computed as relu(max_pool(x)).

  The two are equal in value and in gradient: the max commutes with the monotone ReLU, and
  both send a window's gradient to its largest inputs, and only where that maximum is
  positive. The ReLU and its gradient then run on a quarter of the values
  (docs/performance.md).
  """
  return nn.relu(max_pool(x, impl))


def crop_for_pool(x: jax.Array, kernel_size: int) -> jax.Array:
  """The rows and columns of x that a VALID convolution followed by 2x2 pooling uses.

  The pool drops an odd last row/column of the convolution's output; cropping the input
  first skips computing it (conv1 of the CIFAR KB: 29x29 -> 28x28 outputs, conv3: 5x5 ->
  4x4) and gives the same pooled values.
  """
  rows, cols = ((side - kernel_size + 1) // 2 * 2 + kernel_size - 1 for side in x.shape[1:3])
  return x[:, :rows, :cols]


class KnowledgeBase(nn.Module):
  """The shared KB: masked conv blocks, then a dense latent layer.

  Attributes:
    channels: output channels of each block.
    kernel_sizes: kernel side of each block.
    latent_dim: width of the latent layer.
    dropout_rate: dropout after the latent layer (training only).
    conv_impl: 'native', 'patches' or 'winograd' (Conv).
  """

  channels: Sequence[int]
  kernel_sizes: Sequence[int]
  latent_dim: int
  dropout_rate: float = 0.5
  conv_impl: str = "native"

  @nn.compact
  def __call__(self, x: jax.Array, masks: Masks, *, train: bool) -> jax.Array:
    """Args: x (batch, H, W, C) normalised images; masks one (batch, channels) per block."""
    for channels, size, mask in zip(self.channels, self.kernel_sizes, masks, strict=True):
      x = crop_for_pool(x, size)
      x = pooled_relu(Conv(channels, size, self.conv_impl)(x), self.conv_impl)
      x = x * mask[:, None, None, :]
    x = nn.relu(Dense(self.latent_dim)(x.reshape(x.shape[0], -1)))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class FeatureExtractor(nn.Module):
  """F^t: two conv + batch-norm blocks and a dense layer.

  Attributes:
    bn_momentum: weight of the old running statistics in each update (Flax's convention;
      PyTorch's BatchNorm2d momentum 0.1 is 0.9 here). 0 makes the running statistics
      those of the last batch seen.
  """

  channels: Sequence[int]
  kernel_sizes: Sequence[int]
  feature_dim: int
  conv_impl: str = "native"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """Args: x images; train uses batch statistics; mask (batch,) marks real examples."""
    for channels, size in zip(self.channels, self.kernel_sizes, strict=True):
      x = Conv(channels, size, self.conv_impl)(x)
      # PyTorch's BatchNorm2d eps.
      norm = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5)
      bn_mask = None if mask is None else jnp.broadcast_to(mask[:, None, None, None], x.shape)
      # ReLU, then pool, as written: pooled_relu here changed the order in which XLA sums
      # the batch norm's gradient in runs on a run axis, so they no longer matched each run
      # alone to the last bit through task 1 (docs/performance.md).
      x = max_pool(nn.relu(norm(x, mask=bn_mask)), self.conv_impl)
    return nn.relu(Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))


class MaskGenerator(nn.Module):
  """M^t: one dense layer + activation per KB block, from F^t's features.

  Attributes:
    channels: channels of each KB block (one mask width each).
    activation: 'relu' (authors' `use_relu: True`) or 'sigmoid'.
    bias_init: None for the default (PyTorch) initialisation, or a constant.
  """

  channels: Sequence[int]
  activation: str = "relu"
  bias_init: float | None = None

  @nn.compact
  def __call__(self, features: jax.Array) -> Masks:
    act = {"relu": nn.relu, "sigmoid": nn.sigmoid}[self.activation]
    bias_init = None if self.bias_init is None else nn.initializers.constant(self.bias_init)
    return tuple(act(Dense(c, bias_init=bias_init)(features)) for c in self.channels)


class Head(nn.Module):
  """C^t: a linear classifier on the KB's latent output."""

  num_classes: int

  @nn.compact
  def __call__(self, latent: jax.Array) -> jax.Array:
    return Dense(self.num_classes)(latent)


def ones_masks(batch: int, channels: Sequence[int]) -> Masks:
  """All-ones masks: the KB unmasked (KB pretraining, the no-mask ablations)."""
  return tuple(jnp.ones((batch, c), jnp.float32) for c in channels)


class Networks:
  """The four module definitions of one MARK configuration, kernel sides from the input
  size (shapes.kernel_sizes); `over_runs` for networks vmapped over runs (resolve_conv_impl).
  With cached ResNet-18 features (`cached_features`) the tasks have no F^t."""

  def __init__(self, model_config: Any, image_size: int, num_classes: int, over_runs=False):
    kb_kernels, feature_kernels = shapes.kernel_sizes(image_size)
    conv_impl = resolve_conv_impl(model_config.conv_impl, over_runs)
    self.kb_channels = tuple(model_config.kb_channels)
    self.knowledge_base = KnowledgeBase(
      channels=self.kb_channels,
      kernel_sizes=kb_kernels,
      latent_dim=model_config.latent_dim,
      dropout_rate=model_config.dropout_rate,
      conv_impl=conv_impl,
    )
    self.feature_extractor = FeatureExtractor(
      channels=tuple(model_config.feature_channels),
      kernel_sizes=feature_kernels,
      feature_dim=model_config.latent_dim,
      conv_impl=conv_impl,
    )
    self.mask_generator = MaskGenerator(
      channels=self.kb_channels,
      activation=model_config.mask_activation,
      bias_init=model_config.mask_bias_init,
    )
    self.head = Head(num_classes)
    self.image_shape = (image_size, image_size, 3)
    self.cached_features = model_config.feature_extractor == "resnet18"
    # F^t in training mode (batch statistics) while M^t, C^t and the KB train.
    self.masks_from_batch_statistics = (
      model_config.feature_bn_statistics == "batch" and not self.cached_features
    )

  def init_knowledge_base(self, rng: jax.Array) -> dict:
    """Fresh KB variables ({'params': ...})."""
    image = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.knowledge_base.init(rng, image, ones_masks(1, self.kb_channels), train=False)

  def init_task(self, rng: jax.Array) -> dict:
    """Fresh variables of one task's F^t (none with cached features), M^t and C^t."""
    fe_key, mg_key, head_key = jax.random.split(rng, 3)
    if self.cached_features:
      feature_dim, task = resnet18.FEATURES, {}
    else:
      image = jnp.zeros((1, *self.image_shape), jnp.float32)
      feature_dim = self.feature_extractor.feature_dim
      task = {"feature_extractor": self.feature_extractor.init(fe_key, image, train=False)}
    return {
      **task,
      "mask_generator": self.mask_generator.init(mg_key, jnp.zeros((1, feature_dim))),
      "head": self.init_head(head_key),
    }

  def init_head(self, rng: jax.Array) -> dict:
    return self.head.init(rng, jnp.zeros((1, self.knowledge_base.latent_dim)))

  def masks(self, model: dict, inputs: Inputs, use_masks: bool) -> Masks:
    """Per-example masks from the task's frozen F^t (inference mode), or the features
    that come with the inputs (a ResNet-18's, or F^t's computed once per task:
    mark.with_task_features), and M^t; `inputs` standardized."""
    images = images_of(inputs)
    if not use_masks:
      return ones_masks(images.shape[0], self.kb_channels)
    if isinstance(inputs, dict) and "features" in inputs:
      features = inputs["features"]
    else:
      features = self.feature_extractor.apply(model["feature_extractor"], images, train=False)
    return self.mask_generator.apply(model["mask_generator"], features)

  def training_masks(
    self,
    model: dict,
    inputs: Inputs,
    use_masks: bool,
    batch_stats: dict,
    weights: jax.Array | None = None,
  ) -> tuple[Masks, dict]:
    """Masks while M^t, C^t or the KB train: F^t normalises as config.feature_bn_statistics
    says (the batch's statistics in mode 'batch', else its stored ones, as `masks`).

    Args:
      model: holds F^t's params (model['feature_extractor']['params']) and M^t.
      inputs: standardized inputs.
      use_masks: False gives all-ones masks.
      batch_stats: F^t's running statistics before this batch.
      weights: (batch,) marks real examples (padding has weight 0); None: all real.

    Returns:
      (masks, F^t's running statistics after this batch: updated with the batch's in
      mode 'batch', else `batch_stats` unchanged).
    """
    if not (use_masks and self.masks_from_batch_statistics):
      return self.masks(model, inputs, use_masks), batch_stats
    variables = {"params": model["feature_extractor"]["params"], "batch_stats": batch_stats}
    features, updates = self.feature_extractor.apply(
      variables,
      inputs,
      train=True,
      mask=None if weights is None else weights > 0,
      mutable=["batch_stats"],
    )
    return self.mask_generator.apply(model["mask_generator"], features), updates["batch_stats"]

  def latent(
    self, model: dict, inputs: Inputs, masks: Masks, *, train: bool, rng: jax.Array | None
  ) -> jax.Array:
    """KB(images, masks) of standardized inputs; `train` switches the KB's dropout on."""
    rngs = {"dropout": rng} if train else {}
    return self.knowledge_base.apply(
      model["knowledge_base"], images_of(inputs), masks, train=train, rngs=rngs
    )

  def logits(
    self, model: dict, inputs: Inputs, masks: Masks, *, train: bool, rng: jax.Array | None
  ) -> jax.Array:
    """Head^t(KB(images, masks)) of standardized inputs; `train` switches the KB's dropout on."""
    return self.head.apply(model["head"], self.latent(model, inputs, masks, train=train, rng=rng))

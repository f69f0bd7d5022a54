"""MARK's gradient-descent phases as pure step functions compiled one epoch at a time.

A phase trains some of a task's variables and keeps the rest fixed. Its step is a pure
function `(state, batch, rng) -> (state, metrics)` where state holds the trained
`params`, their `opt_state` and `model_state` (F^t's batch-norm statistics, for the phase
that trains F^t). An epoch is one jitted `lax.scan` over the batches of a seeded
permutation of the task's on-device training data; the last batch is padded and its
padding carries weight 0, so every image counts once per epoch as in a PyTorch loader.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mark_jax.models import Networks, normalize, standardize, take

# loss_fn(params, model_state, frozen, batch, rng) -> (loss, (correct, model_state))
LossFn = Callable


def clip_per_group(max_norm: float, groups: tuple[str, ...]) -> optax.GradientTransformation:
  """Clips the gradient of each top-level params entry to its own global norm.

  This is PyTorch's `clip_grad_norm_` called once per module, as the authors do for F^t
  and its probe classifier.
  """
  clip = optax.clip_by_global_norm(max_norm)
  return optax.multi_transform({g: clip for g in groups}, lambda params: {k: k for k in params})


def global_norm_clip(max_norm: float) -> optax.GradientTransformation | None:
  """Clipping of the whole gradient to `max_norm` (PyTorch's `clip_grad_norm_` over all the
  trained parameters); None when max_norm is 0 (off)."""
  return optax.clip_by_global_norm(max_norm) if max_norm > 0 else None


def sgd(
  learning_rate: float,
  *,
  momentum: float,
  weight_decay: float,
  clip: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
  """PyTorch's SGD as an optax chain: decay added to the gradient, then momentum.

  Args:
    learning_rate: step size.
    momentum: heavy-ball momentum (0 for none).
    weight_decay: L2 coefficient added to the gradient (PyTorch `weight_decay`).
    clip: an optional gradient clipping applied first.

  Returns:
    The optax transformation.
  """
  parts = [] if clip is None else [clip]
  parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(learning_rate, momentum=momentum or None))
  return optax.chain(*parts)


def weighted_cross_entropy(logits, labels, weights) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy over weighted examples, and the weighted count of correct ones."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
  return loss, correct


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training phase: what it trains, its loss and its optimiser.

  Attributes:
    name: for logs.
    trainable: top-level entries of the model dict trained by this phase.
    loss_fn: see LossFn above.
    optimizer: the optax optimiser of the trained params.
    use_masks: whether the phase's model applies M^t's masks (for evaluation).
    updates_feature_statistics: whether the phase's state carries F^t's batch-norm
      statistics as `model_state` and updates them (F^t in training mode, the authors'
      behaviour; config.feature_bn_statistics='batch').
  """

  name: str
  trainable: tuple[str, ...]
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  use_masks: bool = True
  updates_feature_statistics: bool = False


def train_step(phase: Phase, frozen: dict, state: dict, batch: dict, rng: jax.Array):
  """One SGD step of `phase`; `functools.partial(train_step, phase, frozen)` is the
  phase's pure `(state, batch, rng) -> (state, metrics)` step."""
  grad_fn = jax.value_and_grad(phase.loss_fn, has_aux=True)
  (loss, (correct, model_state)), grads = grad_fn(
    state["params"], state["model_state"], frozen, batch, rng
  )
  updates, opt_state = phase.optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  count = jnp.sum(batch["weight"])
  metrics = {"loss_sum": loss * count, "correct": correct, "count": count}
  return {"params": params, "opt_state": opt_state, "model_state": model_state}, metrics


def init_state(phase: Phase, params: dict, model_state=None) -> dict:
  """A phase's step state with a fresh optimiser (every phase starts one, as the authors)."""
  return {
    "params": params,
    "opt_state": phase.optimizer.init(params),
    "model_state": {} if model_state is None else model_state,
  }


def batch_indices(rng: jax.Array, num_examples: int, batch_size: int):
  """A seeded epoch order cut into batches; the last batch is padded with weight 0.

  Returns:
    (indices, weights), both (num_batches, batch_size).
  """
  num_batches = -(-num_examples // batch_size)
  padding = num_batches * batch_size - num_examples
  order = jnp.concatenate(
    [jax.random.permutation(rng, num_examples), jnp.zeros(padding, jnp.int32)]
  )
  weights = (jnp.arange(num_batches * batch_size) < num_examples).astype(jnp.float32)
  return order.reshape(num_batches, batch_size), weights.reshape(num_batches, batch_size)


def first_nonfinite(values: jax.Array) -> jax.Array:
  """Index of the first non-finite entry of a 1-D array, or -1."""
  bad = ~jnp.isfinite(values)
  return jnp.where(jnp.any(bad), jnp.argmax(bad), -1)


def all_finite(tree) -> jax.Array:
  """Whether every entry of every array in `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def make_epoch_fn(phase: Phase, batch_size: int, shard_batch: Callable = lambda batch: batch):
  """One epoch of `phase`: `(state, frozen, images, labels, rng) -> (state, metrics)`.

  Jit it with the state donated (mark_jax.programs). Metrics, computed on device: the
  epoch's mean `loss` and `accuracy`, `first_nonfinite_step` (index of the first step whose
  loss is not finite, -1 if none) and `params_finite` (whether every trained parameter is
  finite at the end).
  `shard_batch` places each batch on devices inside jit (devices.shard_batch).
  """

  def run_epoch(state, frozen, images, labels, rng):
    order_key, step_key = jax.random.split(rng)
    indices, weights = batch_indices(order_key, labels.shape[0], batch_size)
    step = functools.partial(train_step, phase, frozen)

    def body(state, xs):
      idx, weight, key = xs
      batch = shard_batch({"image": take(images, idx), "label": labels[idx], "weight": weight})
      return step(state, batch, key)

    keys = jax.random.split(step_key, indices.shape[0])
    state, metrics = lax.scan(body, state, (indices, weights, keys))
    totals = jax.tree.map(jnp.sum, metrics)
    return state, {
      "loss": totals["loss_sum"] / totals["count"],
      "accuracy": totals["correct"] / totals["count"],
      "first_nonfinite_step": first_nonfinite(metrics["loss_sum"]),
      "params_finite": all_finite(state["params"]),
    }

  return run_epoch


def make_phases(nets: Networks, config, mean, std) -> dict[str, Phase]:
  """MARK's gradient-descent phases with the config's optimisers."""

  def feature_loss(params, batch_stats, frozen, batch, rng):
    del frozen, rng
    images = normalize(batch["image"], mean, std)
    features, updates = nets.feature_extractor.apply(
      {"params": params["feature_extractor"], "batch_stats": batch_stats},
      images,
      train=True,
      mask=batch["weight"] > 0,
      mutable=["batch_stats"],
    )
    logits = nets.head.apply(params["probe"], features)
    loss, correct = weighted_cross_entropy(logits, batch["label"], batch["weight"])
    return loss, (correct, updates["batch_stats"])

  def masked_model_loss(use_masks, params, model_state, frozen, batch, rng):
    model = {**frozen, **params}
    inputs = standardize(batch["image"], mean, std)
    masks, model_state = nets.training_masks(model, inputs, use_masks, model_state, batch["weight"])
    logits = nets.logits(model, inputs, masks, train=True, rng=rng)
    loss, correct = weighted_cross_entropy(logits, batch["label"], batch["weight"])
    return loss, (correct, model_state)

  task_sgd = functools.partial(
    sgd, config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
  )
  task_clip = global_norm_clip(config.task_grad_clip)
  with_masks = functools.partial(masked_model_loss, config.use_masks)
  stats_updated = config.use_masks and nets.masks_from_batch_statistics

  def masks_phase(name: str, learning_rate: float) -> Phase:
    """Steps 3 and 5 (masks, consolidation): the same phase, run twice."""
    return Phase(
      name,
      ("mask_generator", "head"),
      with_masks,
      sgd(
        learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip=task_clip,
      ),
      use_masks=config.use_masks,
      updates_feature_statistics=stats_updated,
    )

  return {
    "feature_extractor": Phase(
      "feature_extractor",
      ("feature_extractor", "probe"),
      feature_loss,
      task_sgd(clip=clip_per_group(config.feature_grad_clip, ("feature_extractor", "probe"))),
      use_masks=False,
    ),
    "kb_pretrain": Phase(
      "kb_pretrain",
      ("knowledge_base", "head"),
      functools.partial(masked_model_loss, False),
      task_sgd(clip=task_clip),
      use_masks=False,
    ),
    "masks": masks_phase("masks", config.learning_rate),
    # Steps 3 and 5 of a task that trains no F^t of its own (shared F^0 after task 0, KB
    # only): the authors' code runs them at a fraction of the learning rate.
    "masks_without_own_features": masks_phase(
      "masks_without_own_features", config.learning_rate * config.no_own_features_lr_factor
    ),
    "kb_sgd": Phase(
      "kb_sgd",
      ("knowledge_base", "head"),
      with_masks,
      sgd(
        config.meta_step_size,
        momentum=0.0,
        weight_decay=config.meta_weight_decay,
        clip=task_clip,
      ),
      use_masks=config.use_masks,
      updates_feature_statistics=stats_updated,
    ),
  }


def make_feature_statistics_fn(
  nets: Networks, batch_size: int, mean, std, shard_batch: Callable = lambda batch: batch
):
  """F^t's batch-norm statistics recomputed over a task's training images (not jitted).

  `(variables, images, rng) -> batch_stats`: F^t in training mode over one seeded epoch of
  batches of `batch_size` (the batches it trained on); each batch's mean and variance are
  averaged, weighted by its number of real images (PreciseBN, Wu & Johnson 2021). The
  running averages left by F^t's own phase lag behind its weights, which weight decay
  keeps shrinking; these statistics describe the final F^t.
  """
  one_batch = nets.feature_extractor.clone(bn_momentum=0.0)

  def statistics(variables, images, rng):
    indices, weights = batch_indices(rng, images.shape[0], batch_size)

    def body(total, xs):
      idx, weight = xs
      batch = shard_batch({"image": images[idx], "weight": weight})
      _, updates = one_batch.apply(
        variables,
        normalize(batch["image"], mean, std),
        train=True,
        mask=batch["weight"] > 0,
        mutable=["batch_stats"],
      )
      count = jnp.sum(batch["weight"])
      return jax.tree.map(lambda t, s: t + count * s, total, updates["batch_stats"]), None

    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    total, _ = lax.scan(body, zeros, (indices, weights))
    return jax.tree.map(lambda t: t / images.shape[0], total)

  return statistics


def make_features_fn(
  nets: Networks, batch_size: int, mean, std, shard_batch: Callable = lambda batch: batch
):
  """`(F^t's variables, images) -> features`: F^t in inference mode over the images, in
  batches of `batch_size` (the last one padded), each split over the devices (not jitted).

  Once F^t is frozen, its features of a task's training images do not change: computed once,
  they replace an F^t pass in every step of the masks, metalearning and consolidation steps.
  """

  def features(variables, images):
    count = images.shape[0]
    padding = [(0, -count % batch_size)] + [(0, 0)] * (images.ndim - 1)
    batches = jnp.pad(images, padding).reshape(-1, batch_size, *images.shape[1:])

    def one(batch):
      x = normalize(shard_batch(batch), mean, std)
      return nets.feature_extractor.apply(variables, x, train=False)

    return lax.map(one, batches).reshape(-1, nets.feature_extractor.feature_dim)[:count]

  return features


def make_scores_fn(
  nets: Networks, mean, std, eval_batch_size: int, shard_batch: Callable = lambda batch: batch
):
  """`scores(model, images, labels, weights, use_masks)` of one task in eval mode, in one
  pass over batches of eval_batch_size, each split over the devices by `shard_batch`
  (devices.shard_batch; replicated, every device would compute every batch):

  - 'accuracy' on the weighted examples;
  - 'mask_max', the largest mask value over the examples and blocks, and 'latent_norm', the
    mean L2 norm of the KB's masked latent output: how far the masks have scaled the KB
    (all-ones masks leave the latent at its pretrained size).

  images (N, H, W, 3) with N a multiple of eval_batch_size; weights mark real examples.
  Not jitted: callers jit it alone or under a map over tasks.
  """

  def scores(model, images, labels, weights, use_masks):
    chunks = lambda a: a.reshape(-1, eval_batch_size, *a.shape[1:])  # noqa: E731

    def body(sums, xs):
      chunk_images, chunk_labels, chunk_weights = shard_batch(xs)
      x = standardize(chunk_images, mean, std)
      masks = nets.masks(model, x, use_masks)
      latent = nets.latent(model, x, masks, train=False, rng=None)
      logits = nets.head.apply(model["head"], latent)
      correct = jnp.sum((jnp.argmax(logits, -1) == chunk_labels) * chunk_weights)
      norms = jnp.sum(jnp.linalg.norm(latent, axis=-1) * chunk_weights)
      mask_max = jnp.max(jnp.stack([jnp.max(m * chunk_weights[:, None]) for m in masks]))
      return {
        "correct": sums["correct"] + correct,
        "norms": sums["norms"] + norms,
        "mask_max": jnp.maximum(sums["mask_max"], mask_max),
      }, None

    zero = jnp.zeros((), jnp.float32)
    start = {"correct": zero, "norms": zero, "mask_max": jnp.full((), -jnp.inf, jnp.float32)}
    sums, _ = lax.scan(body, start, jax.tree.map(chunks, (images, labels, weights)))
    count = jnp.maximum(jnp.sum(weights), 1.0)
    return {
      "accuracy": sums["correct"] / count,
      "mask_max": sums["mask_max"],
      "latent_norm": sums["norms"] / count,
    }

  return scores

"""KB enrichment by metalearning: K mini-tasks adapted in parallel, then a weighted Reptile step.

One round (step 4 of MARK, README "What MARK does"): sample K training batches; for
each, start from the current KB and a fresh temporary head and take `inner_steps` SGD
steps on KB + head with the task's fixed masks (a `lax.scan`; the K mini-tasks run under
`jax.vmap`, or on CPU one after another on each device: `mini_task_map`); measure each
adapted copy's accuracy acc_k; then move the KB with the pseudo-gradient
`theta - sum_k w_k theta_k` (w_k = acc_k / sum acc) through an optax optimiser.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mark_jax.models import Networks, standardize, take
from mark_jax.phases import all_finite, first_nonfinite, global_norm_clip, sgd


def accuracy_weights(accuracies: jax.Array) -> jax.Array:
  """w_k = acc_k / sum(acc); uniform when every mini-task scored zero."""
  total = jnp.sum(accuracies)
  uniform = jnp.full_like(accuracies, 1.0 / accuracies.shape[0])
  return jnp.where(total > 0, accuracies / jnp.where(total > 0, total, 1.0), uniform)


def reptile_update(
  knowledge_base,
  adapted,
  accuracies: jax.Array,
  optimizer: optax.GradientTransformation,
  scale: float = 1.0,
):
  """The weighted Reptile step on the KB.

  Args:
    knowledge_base: current KB variables theta.
    adapted: the K adapted copies theta_k, stacked on a leading axis.
    accuracies: (K,) accuracy of each adapted copy.
    optimizer: stateless optax optimiser for the outer step (a fresh state each round).
    scale: multiplies the pseudo-gradient theta - sum_k w_k theta_k: +1 for the paper's
      Reptile (towards the adapted copies); -1/K for the authors' released code, which
      hands sum_k w_k (theta_k - theta) / K to SGD as the gradient (away from them).

  Returns:
    The updated KB.
  """
  weights = accuracy_weights(accuracies)
  target = jax.tree.map(lambda a: jnp.tensordot(weights, a, axes=1), adapted)
  pseudo_grad = jax.tree.map(lambda t, m: scale * (t - m), knowledge_base, target)
  updates, _ = optimizer.update(pseudo_grad, optimizer.init(knowledge_base), knowledge_base)
  return optax.apply_updates(knowledge_base, updates)


# PyTorch's ReduceLROnPlateau(factor=0.5, patience=5, threshold=0.001) in optax's terms:
# PyTorch reduces after more than `patience` bad steps, optax after exactly `patience`.
PLATEAU = optax.contrib.reduce_on_plateau(factor=0.5, patience=6, rtol=1e-3)


def scale_on_plateau(updates, plateau_state, loss):
  """Scales a step's updates by the factor the losses before it left, then counts its loss.

  This is the order of the authors' loop (`opti.step()`, then `scheduler.step(loss)`):
  a reduction takes effect from the next step on.

  Returns:
    (scaled updates, plateau state after this step's loss).
  """
  scaled = jax.tree.map(lambda u: plateau_state.scale * u, updates)
  _, plateau_state = PLATEAU.update(updates, plateau_state, value=loss)
  return scaled, plateau_state


SETTINGS = (
  "meta_step_size",
  "meta_sign",
  "meta_weight_decay",
  "inner_learning_rate",
  "inner_weight_decay",
)
"""Config keys that only set step sizes of a metalearning round: runs that differ in them
(and in the seed) share one compiled program (mark_jax.runs), each run its own values."""


def round_settings(config) -> dict[str, float]:
  """The round's step sizes from `config`, as the `settings` argument of a round.

  meta_sign becomes 'meta_scale', the factor of the Reptile pseudo-gradient
  (reptile_update): +1 for the paper, -1/K for the authors' released code.
  """
  scale = {"paper": 1.0, "authors": -1.0 / config.mini_tasks}[config.meta_sign]
  settings = {key: float(config[key]) for key in SETTINGS if key != "meta_sign"}
  return {**settings, "meta_scale": scale}


MINI_TASK_MAPS = ("vmap", "map")


def mini_task_map(name: str, groups: int) -> Callable:
  """How a round maps the adaptation of one mini-task over its K mini-tasks.

  'vmap' adapts all K at once. 'map' vmaps over `groups` equal groups of consecutive
  mini-tasks, one per device on the mesh's 'mini_tasks' axis, and each group adapts its
  mini-tasks one after another (`lax.map`), the faster form on XLA:CPU
  (docs/performance.md). Both give the same numbers. 'auto': 'map' on CPU, 'vmap'
  elsewhere.

  Args:
    name: config.mini_task_map ('auto', 'vmap' or 'map').
    groups: how many groups 'map' adapts at once; must divide K.

  Returns:
    A transform like jax.vmap: fn -> fn over arguments batched on axis 0.
  """
  if name == "auto":
    name = "map" if jax.default_backend() == "cpu" else "vmap"
  if name not in MINI_TASK_MAPS:
    allowed = ", ".join(("auto", *MINI_TASK_MAPS))
    raise ValueError(f"mini_task_map must be one of {allowed}, got {name!r}")
  if name == "vmap":
    return jax.vmap

  def in_groups(fn):
    def mapped(*args):
      grouped = jax.tree.map(lambda a: a.reshape(groups, -1, *a.shape[1:]), args)
      out = jax.vmap(lambda *group: lax.map(lambda one: fn(*one), group))(*grouped)
      return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out)

    return mapped

  return in_groups


def make_inner_step(nets: Networks, config, settings: dict):
  """One inner-loop SGD step on KB + temporary head with fixed masks.

  With config.inner_lr_plateau the step size halves after 6 steps in a row without a 0.1%
  improvement of the training loss: PyTorch's ReduceLROnPlateau(factor=0.5, patience=5,
  threshold=0.001) as the authors' inner loop steps it, after each step with that step's
  loss, so a reduction applies from the next step on.

  Args:
    nets: the module definitions.
    config: the run config (momentum, inner_grad_clip, inner_lr_plateau).
    settings: round_settings, as floats or as (traced) scalars.

  Returns:
    (init, step): init(params) -> opt_state; step(params, opt_state, images, labels,
    masks, rng) -> (params, opt_state, loss); params = {'knowledge_base', 'head'},
    images normalised.
  """
  optimizer = sgd(
    settings["inner_learning_rate"],
    momentum=config.momentum,
    weight_decay=settings["inner_weight_decay"],
    clip=global_norm_clip(config.inner_grad_clip),
  )

  def init(params):
    return optimizer.init(params), (PLATEAU.init(params) if config.inner_lr_plateau else None)

  def loss_fn(params, images, labels, masks, rng):
    logits = nets.logits(params, images, masks, train=True, rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(params, opt_state, images, labels, masks, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels, masks, rng)
    sgd_state, plateau_state = opt_state
    updates, sgd_state = optimizer.update(grads, sgd_state, params)
    if config.inner_lr_plateau:
      updates, plateau_state = scale_on_plateau(updates, plateau_state, loss)
    return optax.apply_updates(params, updates), (sgd_state, plateau_state), loss

  return init, step


def make_meta_round(
  nets: Networks,
  config,
  mean,
  std,
  mini_task_map: Callable = jax.vmap,
  shard_mini_tasks: Callable = lambda tree: tree,
):
  """Builds one round `(knowledge_base, task, images, labels, rng, settings) -> (kb, metrics)`.

  `settings` are the round's step sizes (round_settings): floats compile them in, arrays
  (one value per run under a vmap over runs) keep them as inputs of one program.

  Args:
    nets: the module definitions.
    config: the run config (mini_tasks, inner_steps, batch_size, momentum, clipping,
      meta_accuracy_batch, use_masks).
    mean: normalisation mean.
    std: normalisation std.
    mini_task_map: maps the single mini-task adaptation over the K mini-tasks (all
      arguments batched on axis 0): jax.vmap or a `mini_task_map`.
    shard_mini_tasks: places (K, batch, ...) arrays on devices inside jit
      (devices.shard_mini_tasks).

  Returns:
    The un-jitted round function (jit it, or compose it under further transforms).
  """
  num_mini_tasks, batch_size = config.mini_tasks, config.batch_size
  separate_eval_batch = {"same": False, "next": True}[config.meta_accuracy_batch]

  def adapt(
    inner_step,
    init_inner,
    knowledge_base,
    head,
    images,
    labels,
    masks,
    eval_images,
    eval_labels,
    eval_masks,
    rng,
  ):
    """Adapts KB + a fresh head to one mini-task batch; returns (theta_k, acc_k, losses)."""
    params = {"knowledge_base": knowledge_base, "head": head}

    def step(carry, key):
      params, opt_state, loss = inner_step(*carry, images, labels, masks, key)
      return (params, opt_state), loss

    keys = jax.random.split(rng, config.inner_steps)
    (params, _), losses = lax.scan(step, (params, init_inner(params)), keys)
    logits = nets.logits(params, eval_images, eval_masks, train=False, rng=None)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == eval_labels)
    return params["knowledge_base"], accuracy, losses

  def meta_round(knowledge_base, task, images, labels, rng, settings):
    init_inner, inner_step = make_inner_step(nets, config, settings)
    meta_optimizer = sgd(
      settings["meta_step_size"], momentum=0.0, weight_decay=settings["meta_weight_decay"]
    )
    order_key, head_key, inner_key = jax.random.split(rng, 3)
    num_batches = num_mini_tasks * (2 if separate_eval_batch else 1)
    needed = num_batches * batch_size
    order = jax.random.permutation(order_key, labels.shape[0])
    order = jnp.tile(order, -(-needed // labels.shape[0]))[:needed].reshape(num_batches, batch_size)
    x, y = shard_mini_tasks((standardize(take(images, order), mean, std), labels[order]))
    model = {**task, "knowledge_base": knowledge_base}
    batch_stats = model.get("feature_extractor", {}).get("batch_stats")
    masks = jax.vmap(
      lambda batch: nets.training_masks(model, batch, config.use_masks, batch_stats)[0]
    )(x)
    train = (x, y, masks)
    evaluation = jax.tree.map(lambda a: a[num_mini_tasks:], train) if separate_eval_batch else train
    train = jax.tree.map(lambda a: a[:num_mini_tasks], train)
    heads = jax.vmap(nets.init_head)(jax.random.split(head_key, num_mini_tasks))
    adapt_one = functools.partial(adapt, inner_step, init_inner, knowledge_base)
    adapted, accuracies, losses = mini_task_map(adapt_one)(
      heads, *train, *evaluation, jax.random.split(inner_key, num_mini_tasks)
    )
    new_kb = reptile_update(
      knowledge_base, adapted, accuracies, meta_optimizer, settings["meta_scale"]
    )
    return new_kb, {
      "first_inner_loss": jnp.mean(losses[:, 0]),
      "inner_loss": jnp.mean(losses[:, -1]),
      "mini_task_accuracy": jnp.mean(accuracies),
      "first_nonfinite_step": first_nonfinite(jnp.sum(losses, axis=0)),
      "params_finite": all_finite(new_kb),
    }

  return meta_round

"""Checks a run config before anything is compiled or loaded.

`validate(config)` returns one line per problem, naming the key as it is typed on the command
line, the bad value and what is allowed, e.g. `--config.batch_size=0: must be a positive
integer`.

Two tables hold the rules: `FIELD_RULES` check one value each; `CONSISTENCY_RULES` check a key
against other keys and the dataset's facts (class count, training images per class, image
size), which come from mark_jax.data.facts or `config.synthetic` without loading any data. To
add a rule, add a row. Only the standard library, the facts table and the
networks' shape rule (mark_jax.shapes) are imported here.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from mark_jax.data.facts import FACTS, RESNET18_WEIGHTS_URL, DatasetFacts, synthetic_facts
from mark_jax.shapes import CONV_IMPLS, MIN_IMAGE_SIZE
from mark_jax.value_checks import (
  Check,
  boolean,
  min_int,
  non_negative_float,
  non_negative_int,
  one_of,
  optional_boolean,
  optional_float,
  optional_non_negative_int,
  positive_float,
  positive_int,
  positive_ints,
  seed,
  string,
  unit_interval,
  zero_or_min_int,
  zero_or_network_size,
)

# Dataset facts (mark_jax.data.facts).


DATASET_NAMES = (*FACTS, "synthetic")
SYNTHETIC_KEYS = tuple(
  f"synthetic.{key}"
  for key in ("num_classes", "train_per_class", "test_per_class", "image_size", "seed")
)


REQUIRED = object()
"""`FieldRule.default` of a key the config must have."""


def _is_synthetic(values: dict[str, Any]) -> bool:
  return values.get("dataset") == "synthetic"


@dataclasses.dataclass(frozen=True)
class FieldRule:
  """One key's value check.

  Attributes:
    key: dotted config key.
    check: the value check.
    default: the value of a missing key (what the code did before the key existed), or
      REQUIRED.
    applies: whether the rule applies, given the values checked before it.
  """

  key: str
  check: Check
  default: Any = REQUIRED
  applies: Callable[[dict[str, Any]], bool] = lambda values: True


FIELD_RULES = (
  # Data.
  FieldRule("dataset", one_of(DATASET_NAMES)),
  FieldRule("data_dir", string),
  FieldRule("download", boolean),
  FieldRule("seed", seed),
  FieldRule("classes_per_task", positive_int),
  FieldRule("validation_fraction", unit_interval),
  FieldRule("max_tasks", non_negative_int, default=0),
  FieldRule("passes", positive_int, default=1),
  FieldRule("image_size", zero_or_network_size, default=0),
  FieldRule("synthetic.num_classes", positive_int, applies=_is_synthetic),
  FieldRule("synthetic.train_per_class", positive_int, applies=_is_synthetic),
  FieldRule("synthetic.test_per_class", positive_int, applies=_is_synthetic),
  FieldRule("synthetic.image_size", min_int(MIN_IMAGE_SIZE), applies=_is_synthetic),
  FieldRule("synthetic.seed", seed, applies=_is_synthetic),
  # Networks.
  FieldRule("kb_channels", positive_ints(3)),
  FieldRule("feature_channels", positive_ints(2)),
  FieldRule("latent_dim", positive_int),
  FieldRule("dropout_rate", unit_interval),
  FieldRule("mask_activation", one_of(("relu", "sigmoid"))),
  FieldRule("mask_bias_init", optional_float),
  FieldRule("conv_impl", one_of(("auto", *CONV_IMPLS))),
  FieldRule("feature_bn_statistics", one_of(("running", "recomputed", "batch")), default="running"),
  # SGD phases.
  FieldRule("batch_size", positive_int),
  FieldRule("eval_batch_size", positive_int),
  FieldRule("epochs", positive_int),
  FieldRule("learning_rate", positive_float),
  FieldRule("momentum", unit_interval),
  FieldRule("weight_decay", non_negative_float),
  FieldRule("feature_grad_clip", non_negative_float),
  FieldRule("task_grad_clip", non_negative_float, default=0.0),
  FieldRule("pretrain_kb", boolean),
  # Metalearning.
  FieldRule("use_metalearning", boolean),
  FieldRule("meta_rounds", non_negative_int),
  FieldRule("mini_tasks", positive_int),
  FieldRule("inner_steps", positive_int),
  FieldRule("inner_learning_rate", positive_float),
  FieldRule("inner_weight_decay", non_negative_float),
  FieldRule("inner_grad_clip", non_negative_float, default=0.0),
  FieldRule("inner_lr_plateau", boolean, default=False),
  FieldRule("meta_step_size", non_negative_float),
  FieldRule("meta_weight_decay", non_negative_float),
  FieldRule("meta_sign", one_of(("paper", "authors"))),
  FieldRule("meta_accuracy_batch", one_of(("same", "next"))),
  FieldRule("mini_task_map", one_of(("auto", "vmap", "map")), default="vmap"),
  # Ablations, devices, checkpoints.
  FieldRule("use_masks", boolean),
  FieldRule("use_feature_extractor", boolean),
  FieldRule("shared_feature_extractor", boolean),
  FieldRule("random_feature_extractor", boolean, default=False),
  FieldRule("no_own_features_lr_factor", positive_float, default=1.0),
  FieldRule("kb_only_skips_masks_step", boolean, default=False),
  FieldRule("feature_extractor", one_of(("cnn", "resnet18")), default="cnn"),
  FieldRule("resnet18_weights", string, default=""),
  FieldRule("resnet18_pretrained", boolean, default=True),
  FieldRule("resnet18_input_size", zero_or_min_int(32, "the images as they are"), default=224),
  FieldRule("distributed", boolean),
  FieldRule("cpu_devices", non_negative_int, default=0),
  FieldRule("runs_in_one_program", optional_boolean, default=None),
  FieldRule("restore_task", optional_non_negative_int, default=None),
  FieldRule("restore_dir", string, default=""),
)


MISSING_KEY_VALUES = {
  rule.key: rule.default for rule in FIELD_RULES if rule.default is not REQUIRED
}
"""Keys added after the first release, with the value a config without them means: the
behaviour of the code before the key existed, so a workdir started then resumes as it ran."""


# Consistency checks: (values, facts) -> what is wrong, or None. Facts are None when the
# dataset is unknown or its synthetic settings are bad.


def masks_need_feature_extractor(values, facts) -> str | None:
  if values["use_masks"] and not values["use_feature_extractor"]:
    return "requires --config.use_masks=False (the masks come from the feature extractor)"
  return None


def shared_needs_feature_extractor(values, facts) -> str | None:
  if values["shared_feature_extractor"] and not values["use_feature_extractor"]:
    return "requires --config.use_feature_extractor=True (no feature extractor to share)"
  return None


def random_needs_shared(values, facts) -> str | None:
  if values["random_feature_extractor"] and not values["shared_feature_extractor"]:
    return "requires --config.shared_feature_extractor=True (one random F^0 serves every task)"
  return None


def resnet18_is_the_one_feature_extractor(values, facts) -> str | None:
  if values["feature_extractor"] != "resnet18":
    return None
  if not values["use_feature_extractor"]:
    return "requires --config.use_feature_extractor=True (the masks come from ResNet-18)"
  if values["shared_feature_extractor"] or values["random_feature_extractor"]:
    return (
      "one frozen ResNet-18 serves every task: leave --config.shared_feature_extractor and "
      "--config.random_feature_extractor False (random weights: "
      "--config.resnet18_pretrained=False)"
    )
  return None


def pretrained_resnet18_needs_weights(values, facts) -> str | None:
  if values["feature_extractor"] != "resnet18" or not values["resnet18_pretrained"]:
    return None
  if values["resnet18_weights"]:
    return None
  return (
    f"give the path of torchvision's ImageNet ResNet-18 weights ({RESNET18_WEIGHTS_URL}), "
    "or --config.resnet18_pretrained=False for random weights"
  )


def restore_dir_needs_task(values, facts) -> str | None:
  if bool(values["restore_dir"]) and values["restore_task"] is None:
    return "requires --config.restore_task (the task to restore from that directory)"
  return None


def classes_divide(values, facts) -> str | None:
  if facts.num_classes % values["classes_per_task"] == 0:
    return None
  divisors = [d for d in range(1, facts.num_classes + 1) if facts.num_classes % d == 0]
  return (
    f"does not divide the {facts.num_classes} classes of {facts.name} "
    f"(allowed: {', '.join(map(str, divisors))})"
  )


def max_tasks_within_dataset(values, facts) -> str | None:
  tasks = facts.num_classes // values["classes_per_task"]
  if values["max_tasks"] <= tasks:
    return None
  return f"must be at most the {tasks} task{'s' * (tasks != 1)} of {facts.name} (0: all)"


def restore_task_within_run(values, facts) -> str | None:
  tasks = values["max_tasks"] or facts.num_classes // values["classes_per_task"]
  tasks *= values["passes"]
  if values["restore_task"] is None or values["restore_task"] < tasks:
    return None
  return f"must be below {tasks}, the number of tasks this run trains (over all its passes)"


def batch_fits_task(values, facts) -> str | None:
  examples = values["classes_per_task"] * facts.train_per_class
  examples -= math.ceil(examples * values["validation_fraction"])  # rounded down, as the split
  if values["batch_size"] <= examples:
    return None
  return (
    f"must be at most {examples}, the training images of one {facts.name} task "
    f"({values['classes_per_task']} classes x {facts.train_per_class} images, "
    f"less the {values['validation_fraction']} validation fraction)"
  )


def dataset_images_fit_network(values, facts) -> str | None:
  if values["image_size"] or facts.image_size >= MIN_IMAGE_SIZE:
    return None
  side = facts.image_size
  return (
    f"{facts.name} images are {side}x{side}, smaller than the network's minimum of "
    f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}; set it to at least {MIN_IMAGE_SIZE}"
  )


@dataclasses.dataclass(frozen=True)
class ConsistencyRule:
  """A check of one key against others.

  Attributes:
    key: the key its line names; once it fails, later rules reading it are skipped.
    reads: the other keys it reads; it is skipped while one of them is bad.
    check: (values, facts) -> what is wrong, or None.
    needs_dataset: skipped when the dataset's facts are unknown.
  """

  key: str
  reads: tuple[str, ...]
  check: Callable[[dict[str, Any], DatasetFacts | None], str | None]
  needs_dataset: bool = False


CONSISTENCY_RULES = (
  ConsistencyRule("use_feature_extractor", ("use_masks",), masks_need_feature_extractor),
  ConsistencyRule(
    "shared_feature_extractor", ("use_feature_extractor",), shared_needs_feature_extractor
  ),
  ConsistencyRule("random_feature_extractor", ("shared_feature_extractor",), random_needs_shared),
  ConsistencyRule(
    "feature_extractor",
    ("use_feature_extractor", "shared_feature_extractor", "random_feature_extractor"),
    resnet18_is_the_one_feature_extractor,
  ),
  ConsistencyRule(
    "resnet18_weights",
    ("feature_extractor", "resnet18_pretrained"),
    pretrained_resnet18_needs_weights,
  ),
  ConsistencyRule("restore_dir", ("restore_task",), restore_dir_needs_task),
  ConsistencyRule("classes_per_task", (), classes_divide, needs_dataset=True),
  ConsistencyRule("max_tasks", ("classes_per_task",), max_tasks_within_dataset, needs_dataset=True),
  ConsistencyRule(
    "restore_task",
    ("classes_per_task", "max_tasks", "passes"),
    restore_task_within_run,
    needs_dataset=True,
  ),
  ConsistencyRule(
    "batch_size", ("classes_per_task", "validation_fraction"), batch_fits_task, needs_dataset=True
  ),
  ConsistencyRule("image_size", (), dataset_images_fit_network, needs_dataset=True),
)


# Running the rules.

_MISSING = object()


def _lookup(config: Any, key: str) -> Any:
  """config[a][b] for key 'a.b', or _MISSING."""
  node = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def _shown(value: Any) -> str:
  """A value as the user would read it: strings quoted, so '1' and 1 differ."""
  return repr(value) if isinstance(value, str) else str(value)


def _line(key: str, value: Any, message: str) -> str:
  return f"--config.{key}={_shown(value)}: {message}"


def _dataset_facts(values: dict[str, Any], bad_keys: set[str]) -> DatasetFacts | None:
  """The facts of the configured dataset, or None when unknown or its settings are bad."""
  dataset = values.get("dataset")
  if "dataset" in bad_keys:
    return None
  if dataset != "synthetic":
    return FACTS[dataset]
  if bad_keys.intersection(SYNTHETIC_KEYS):
    return None
  return synthetic_facts(
    values["synthetic.num_classes"],
    values["synthetic.train_per_class"],
    values["synthetic.image_size"],
  )


def validate(config: Any) -> list[str]:
  """All the problems of a run config, one readable line each; empty when it is fine."""
  problems, values, bad_keys = [], {}, set()
  for rule in FIELD_RULES:
    if not rule.applies(values):
      continue
    value = _lookup(config, rule.key)
    if value is _MISSING and rule.default is not REQUIRED:
      value = rule.default
    if value is _MISSING:
      problems.append(f"--config.{rule.key} is missing: it {rule.check(_MISSING)}")
      bad_keys.add(rule.key)
      continue
    values[rule.key] = value
    message = rule.check(value)
    if message:
      problems.append(_line(rule.key, value, message))
      bad_keys.add(rule.key)

  facts = _dataset_facts(values, bad_keys)
  for rule in CONSISTENCY_RULES:
    if bad_keys.intersection((rule.key, *rule.reads)) or (rule.needs_dataset and facts is None):
      continue
    message = rule.check(values, facts)
    if message:
      problems.append(_line(rule.key, values[rule.key], message))
      bad_keys.add(rule.key)
  return problems

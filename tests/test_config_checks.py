"""Tests of mark_jax.config_checks: the shipped configs pass, every rule catches its bad value."""

import dataclasses

import ml_collections
import pytest

from configs import (
  cifar100,
  digits,
  imagenet,
  miniimagenet,
  miniimagenet32_cpu,
  miniimagenet_resnet18,
  smoke,
)
from mark_jax import config_checks, shapes
from mark_jax.data import facts


def loose(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` that accepts values of any type (ConfigDict is type-safe)."""
  return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def with_values(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  """A type-unsafe copy of `config` with dotted keys ('synthetic.num_classes') set."""
  config = loose(config)
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


@pytest.mark.parametrize(
  "module",
  [cifar100, miniimagenet, smoke, digits, miniimagenet32_cpu, miniimagenet_resnet18, imagenet],
)
def test_shipped_configs_are_valid(module):
  assert config_checks.validate(module.get_config()) == []


def test_minimum_image_size_is_derived_from_the_network():
  minimum = shapes.MIN_IMAGE_SIZE
  assert minimum == 12  # 12 -> conv 1 -> 12 -> pool 6 -> conv 1 -> 6 -> pool 3 -> conv 2 -> 2 -> 1
  assert not shapes.network_fits(minimum - 1)
  assert all(shapes.network_fits(size) for size in range(minimum, 300))


def case(key, value, fragment, base=smoke, **context):
  """One rule case: `key=value` on `base`'s config, with valid `context` values set first."""
  return pytest.param(base, context, key, value, fragment, id=f"{key}={value!r}")


RULE_CASES = [
  # Types and ranges.
  case("batch_size", 0, "must be a positive integer"),
  case("batch_size", True, "must be a positive integer"),
  case("batch_size", 8.0, "must be a positive integer"),
  case("eval_batch_size", -1, "must be a positive integer"),
  case("epochs", 0, "must be a positive integer"),
  case("mini_tasks", 0, "must be a positive integer"),
  case("inner_steps", "5", "must be a positive integer"),
  case("classes_per_task", 0, "must be a positive integer"),
  case("latent_dim", 0, "must be a positive integer"),
  case("meta_rounds", -1, "must be a non-negative integer"),
  case("max_tasks", -1, "must be a non-negative integer"),
  case("max_tasks", False, "must be a non-negative integer"),
  case("seed", -1, "must be an integer in [0, 2**32)"),
  case("seed", 2**32, "must be an integer in [0, 2**32)"),
  case("learning_rate", 0.0, "must be a positive finite number"),
  case("learning_rate", float("inf"), "must be a positive finite number"),
  case("inner_learning_rate", float("nan"), "must be a positive finite number"),
  case("meta_step_size", -0.1, "must be a non-negative finite number"),
  case("momentum", 1.0, "must be a number in [0, 1)"),
  case("weight_decay", -0.01, "must be a non-negative finite number"),
  case("inner_weight_decay", float("inf"), "must be a non-negative finite number"),
  case("meta_weight_decay", "0.1", "must be a non-negative finite number"),
  case("feature_grad_clip", -1.0, "must be a non-negative finite number"),
  case("dropout_rate", 1.0, "must be a number in [0, 1)"),
  case("validation_fraction", -0.1, "must be a number in [0, 1)"),
  case("kb_channels", (64, 128), "exactly 3 positive integers"),
  case("kb_channels", (64, 0, 256), "exactly 3 positive integers"),
  case("feature_channels", "32", "exactly 2 positive integers"),
  case("pretrain_kb", 1, "must be True or False"),
  case("use_metalearning", "True", "must be True or False"),
  case("use_masks", None, "must be True or False"),
  case("use_feature_extractor", 0, "must be True or False"),
  case("shared_feature_extractor", "no", "must be True or False"),
  case("download", 1, "must be True or False"),
  case("distributed", "false", "must be True or False"),
  case("data_dir", None, "must be a string"),
  case("restore_dir", 3, "must be a string"),
  case("restore_task", -1, "must be None or a non-negative integer"),
  case("image_size", 11, "must be 0 (the dataset's size) or an integer >= 12"),
  case("image_size", True, "or an integer >= 12"),
  case("synthetic.num_classes", 0, "must be a positive integer"),
  case("synthetic.train_per_class", 0, "must be a positive integer"),
  case("synthetic.test_per_class", 0, "must be a positive integer"),
  case("synthetic.image_size", 8, "must be an integer >= 12"),
  case("synthetic.seed", -3, "must be an integer in [0, 2**32)"),
  # Known names.
  case("dataset", "cifar10", "must be one of: cifar100, digits, imagenet, miniimagenet, synthetic"),
  case("mask_activation", "tanh", "must be one of: relu, sigmoid"),
  case("conv_impl", "cuda", "must be one of: auto, native, patches, winograd"),
  case("meta_sign", "reptile", "must be one of: authors, paper"),
  case("meta_accuracy_batch", "previous", "must be one of: next, same"),
  case("mask_bias_init", "one", "must be None or a finite number"),
  case("mask_bias_init", float("nan"), "must be None or a finite number"),
  # Consistency.
  case("use_feature_extractor", False, "requires --config.use_masks=False"),
  case(
    "shared_feature_extractor",
    True,
    "requires --config.use_feature_extractor=True",
    use_feature_extractor=False,
    use_masks=False,
  ),
  case("passes", 0, "must be a positive integer"),
  case("random_feature_extractor", True, "requires --config.shared_feature_extractor=True"),
  case("random_feature_extractor", "yes", "must be True or False"),
  case("restore_dir", "/tmp/run", "requires --config.restore_task"),
  case("restore_task", 3, "must be below 3, the number of tasks this run trains"),
  case("restore_task", 2, "must be below 2, the number of tasks", max_tasks=2),
  case("max_tasks", 4, "must be at most the 3 tasks of synthetic"),
  case("max_tasks", 21, "must be at most the 20 tasks of cifar100", base=cifar100),
  case(
    "max_tasks", 2, "must be at most the 1 task of cifar100", base=cifar100, classes_per_task=100
  ),
  # Dataset facts.
  case("classes_per_task", 7, "does not divide the 100 classes of cifar100", base=cifar100),
  case("classes_per_task", 4, "does not divide the 15 classes of synthetic (allowed: 1, 3, 5, 15)"),
  case(
    "classes_per_task",
    3,
    "does not divide the 10 classes of digits",
    dataset="digits",
    image_size=32,
  ),
  # One cifar100 task: 5 classes x 500 images, 15% held out = 2125 training images.
  case(
    "batch_size",
    2126,
    "must be at most 2125, the training images of one cifar100 task",
    base=cifar100,
  ),
  # One smoke task: 5 classes x 100 images, 15% held out = 425.
  case("batch_size", 426, "must be at most 425, the training images of one synthetic task"),
  # One miniimagenet task: 5 x 500, 2% held out = 2450.
  case("batch_size", 2451, "must be at most 2450", base=miniimagenet),
  # Digits: at least 5 classes x 120 images, 15% held out = 510.
  case("batch_size", 511, "must be at most 510", dataset="digits"),
]


@pytest.mark.parametrize("base, context, key, value, fragment", RULE_CASES)
def test_each_rule_reports_exactly_its_bad_value(base, context, key, value, fragment):
  config = with_values(base.get_config(), **context)
  assert config_checks.validate(config) == [], "the context alone must be valid"
  problems = config_checks.validate(with_values(config, **{key: value}))
  assert len(problems) == 1, problems
  assert problems[0].startswith(f"--config.{key}="), problems[0]
  assert fragment in problems[0], problems[0]


def test_dataset_images_smaller_than_the_network_need_image_size(monkeypatch):
  tiny_digits = dataclasses.replace(facts.FACTS["digits"], image_size=8)
  monkeypatch.setitem(facts.FACTS, "digits", tiny_digits)
  config = with_values(smoke.get_config(), dataset="digits")
  assert config_checks.validate(config) == [
    "--config.image_size=0: digits images are 8x8, smaller than the network's minimum of 12x12; "
    "set it to at least 12"
  ]
  assert config_checks.validate(with_values(config, image_size=32)) == []


def test_line_shows_key_value_and_what_is_allowed():
  config = with_values(cifar100.get_config(), batch_size=0, classes_per_task=7)
  assert config_checks.validate(config) == [
    "--config.batch_size=0: must be a positive integer",
    "--config.classes_per_task=7: does not divide the 100 classes of cifar100 "
    "(allowed: 1, 2, 4, 5, 10, 20, 25, 50, 100)",
  ]


def test_string_values_are_quoted():
  problems = config_checks.validate(with_values(smoke.get_config(), epochs="3"))
  assert problems == ["--config.epochs='3': must be a positive integer"]


def test_valid_edge_values_pass():
  config = with_values(
    cifar100.get_config(),
    momentum=0.0,
    dropout_rate=0.0,
    validation_fraction=0.0,
    weight_decay=0,
    meta_rounds=0,
    max_tasks=20,
    restore_task=19,
    restore_dir="/tmp/run",
    mask_bias_init=1.0,
    image_size=12,
    batch_size=2500,
    use_feature_extractor=False,
    use_masks=False,
  )
  assert config_checks.validate(config) == []


def test_unknown_dataset_skips_dataset_rules():
  config = with_values(cifar100.get_config(), dataset="imagenet21k", classes_per_task=7)
  problems = config_checks.validate(config)
  assert len(problems) == 1
  assert problems[0].startswith("--config.dataset='imagenet21k'")


def test_synthetic_settings_are_ignored_for_other_datasets():
  config = with_values(cifar100.get_config(), **{"synthetic.num_classes": 0})
  assert config_checks.validate(config) == []


def test_missing_required_key_is_reported_and_optional_keys_default():
  config = loose(smoke.get_config())
  del config["latent_dim"]
  for optional in ("image_size", "max_tasks", "restore_task", "restore_dir"):
    if optional in config:
      del config[optional]
  assert config_checks.validate(config) == [
    "--config.latent_dim is missing: it must be a positive integer"
  ]


def test_several_bad_values_give_all_their_lines():
  config = with_values(
    cifar100.get_config(),
    batch_size=0,
    momentum=1.5,
    dataset="cifar10",
    conv_impl="gpu",
    restore_dir="/tmp/run",
    **{"synthetic.num_classes": 0},
  )
  problems = config_checks.validate(config)
  assert [p.split("=")[0] for p in problems] == [
    "--config.dataset",
    "--config.conv_impl",
    "--config.batch_size",
    "--config.momentum",
    "--config.restore_dir",
  ]


def test_import_is_light():
  import subprocess
  import sys

  code = "import sys, mark_jax.config_checks; print('jax' in sys.modules, 'numpy' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.split() == ["False", "False"]

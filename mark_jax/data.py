"""Datasets split into MARK's sequence of tasks.

A dataset loader returns whole splits as uint8 images (N, H, W, 3) and int labels. The
split into tasks follows the authors: a seeded permutation of the classes, cut into groups
of `classes_per_task`, labels remapped to 0..classes_per_task-1 inside each task, and a
seeded fraction of each task's training images held out for validation.

Images stay uint8 until they reach the jitted step, which normalises them on device.
"""

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from mark_jax.errors import DataError

# Normalisation constants (per channel, on the [0, 1] scale).
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Split:
  """Images (N, H, W, 3) uint8 and labels (N,) int32 of one task."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class TaskData:
  train: Split
  validation: Split
  test: Split
  classes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A dataset cut into tasks, with what the model needs to know about it."""

  name: str
  tasks: list[TaskData]
  image_size: int
  classes_per_task: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def normalize(images: jnp.ndarray, mean, std) -> jnp.ndarray:
  """uint8 images -> float32, scaled to [0, 1] then standardised per channel."""
  images = images.astype(jnp.float32) / 255.0
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def class_order(num_classes: int, seed: int) -> np.ndarray:
  """The authors' class permutation: np.random.seed(seed); np.random.permutation(n)."""
  return np.random.RandomState(seed).permutation(num_classes)


def split_into_tasks(
  train: Split,
  test: Split,
  *,
  num_classes: int,
  classes_per_task: int,
  validation_fraction: float,
  seed: int,
) -> list[TaskData]:
  """Cuts whole train/test splits into tasks of `classes_per_task` classes.

  Args:
    train: the dataset's training split (labels 0..num_classes-1).
    test: the dataset's test split.
    num_classes: number of classes in the dataset.
    classes_per_task: classes in each task; must divide num_classes.
    validation_fraction: fraction of each task's training images held out.
    seed: seeds the class permutation and the validation hold-out.

  Returns:
    One TaskData per task, labels remapped to 0..classes_per_task-1.
  """
  if num_classes % classes_per_task:
    raise ValueError(f"classes_per_task={classes_per_task} does not divide {num_classes} classes")
  order = class_order(num_classes, seed)
  tasks = []
  for t in range(num_classes // classes_per_task):
    classes = order[t * classes_per_task : (t + 1) * classes_per_task]
    remap = np.full(num_classes, -1, np.int32)
    remap[classes] = np.arange(classes_per_task, dtype=np.int32)

    task_train, task_test = _select(train, remap), _select(test, remap)
    shuffled = np.random.RandomState(seed).permutation(len(task_train))
    num_valid = int(validation_fraction * len(task_train))
    valid_idx, train_idx = shuffled[:num_valid], shuffled[num_valid:]
    tasks.append(
      TaskData(
        train=Split(task_train.images[train_idx], task_train.labels[train_idx]),
        validation=Split(task_train.images[valid_idx], task_train.labels[valid_idx]),
        test=task_test,
        classes=tuple(int(c) for c in classes),
      )
    )
  return tasks


def _select(split: Split, remap: np.ndarray) -> Split:
  """The examples of `split` whose class `remap` maps to a task label (>= 0), relabelled."""
  keep = np.flatnonzero(remap[split.labels] >= 0)
  return Split(split.images[keep], remap[split.labels[keep]])


def synthetic_splits(
  *, num_classes: int, train_per_class: int, test_per_class: int, image_size: int, seed: int
) -> tuple[Split, Split]:
  """A learnable class-conditional image dataset generated from a seed.

  Each class has a smooth random prototype (a 4x4 colour pattern upsampled to the image
  size); an image is its class prototype, randomly shifted by up to 4 pixels, plus noise.

  Returns:
    (train, test) splits with uint8 images.
  """
  rng = np.random.RandomState(seed)
  coarse = rng.uniform(-1.0, 1.0, (num_classes, 4, 4, 3))
  scale = -(-image_size // 4)
  prototypes = np.repeat(np.repeat(coarse, scale, axis=1), scale, axis=2)[
    :, :image_size, :image_size
  ]

  def make(per_class: int) -> Split:
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    shifts = rng.randint(-4, 5, size=(len(labels), 2))
    images = np.stack(
      [np.roll(prototypes[c], tuple(s), axis=(0, 1)) for c, s in zip(labels, shifts, strict=True)]
    )
    images = 128 + 30 * images + rng.normal(0.0, 64.0, images.shape)
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels)

  return make(train_per_class), make(test_per_class)


def _load_tfds(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split]:
  """Reads a TFDS dataset's train and test splits through `tfds.data_source`."""
  import tensorflow_datasets as tfds  # Imported lazily: heavy, and absent on some devices.

  splits = []
  for split in ("train", "test"):
    try:
      source = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir or None,
        download=download,
        builder_kwargs={"file_format": "array_record"},
      )
      records = [source[i] for i in range(len(source))]
    except Exception as error:  # TFDS raises many types; all mean "not usable here".
      raise DataError(
        f"dataset {name!r} ({split} split) is not available in data_dir "
        f"{data_dir or tfds.core.constants.DATA_DIR!r}: {str(error).splitlines()[0]}\n"
        f"To get it: with internet access run once with --config.download=True "
        f"(TFDS prepares {name} with TensorFlow: pip install tensorflow-cpu), or point "
        f"--config.data_dir at a directory where TFDS already prepared it as array_record."
      ) from error
    splits.append(
      Split(
        np.stack([r["image"] for r in records]).astype(np.uint8),
        np.asarray([r["label"] for r in records], np.int32),
      )
    )
  return splits[0], splits[1]


def _cifar100(config) -> tuple[Split, Split, int, tuple, tuple]:
  train, test = _load_tfds("cifar100", config.data_dir, config.download)
  return train, test, 100, CIFAR_MEAN, CIFAR_STD


def _synthetic(config) -> tuple[Split, Split, int, tuple, tuple]:
  spec = config.synthetic
  train, test = synthetic_splits(
    num_classes=spec.num_classes,
    train_per_class=spec.train_per_class,
    test_per_class=spec.test_per_class,
    image_size=spec.image_size,
    seed=spec.seed,
  )
  return train, test, spec.num_classes, CIFAR_MEAN, CIFAR_STD


def _miniimagenet(config) -> tuple[Split, Split, int, tuple, tuple]:
  raise DataError(
    "the miniimagenet data pipeline is not implemented yet; use dataset 'cifar100' or "
    "'synthetic' (the network and hyperparameters of configs/miniimagenet.py are ready)"
  )


DATASETS: dict[str, Callable] = {
  "cifar100": _cifar100,
  "miniimagenet": _miniimagenet,
  "synthetic": _synthetic,
}


def load_benchmark(config) -> Benchmark:
  """Loads `config.dataset` and cuts it into tasks as the config says."""
  if config.dataset not in DATASETS:
    raise DataError(f"unknown dataset {config.dataset!r}; known: {', '.join(sorted(DATASETS))}")
  train, test, num_classes, mean, std = DATASETS[config.dataset](config)
  tasks = split_into_tasks(
    train,
    test,
    num_classes=num_classes,
    classes_per_task=config.classes_per_task,
    validation_fraction=config.validation_fraction,
    seed=config.seed,
  )
  if config.get("max_tasks"):
    tasks = tasks[: config.max_tasks]
  for t, task in enumerate(tasks):
    for split_name in ("train", "test"):
      if len(getattr(task, split_name)) == 0:
        raise DataError(f"task {t} of {config.dataset!r} has no {split_name} images")
  return Benchmark(
    name=config.dataset,
    tasks=tasks,
    image_size=int(train.images.shape[1]),
    classes_per_task=config.classes_per_task,
    mean=mean,
    std=std,
  )


def stack_splits(splits: list[Split], multiple: int) -> dict[str, np.ndarray]:
  """Stacks per-task splits along a leading task axis, zero-padded to a common length.

  Args:
    splits: one split per task.
    multiple: the common length is rounded up to a multiple of this (the eval batch).

  Returns:
    {'image': (T, N, H, W, 3), 'label': (T, N), 'weight': (T, N)}; weight is 1 for real
    examples and 0 for padding.
  """
  length = max(len(s) for s in splits)
  length = -(-length // multiple) * multiple
  shape = splits[0].images.shape[1:]
  images = np.zeros((len(splits), length, *shape), np.uint8)
  labels = np.zeros((len(splits), length), np.int32)
  weights = np.zeros((len(splits), length), np.float32)
  for t, split in enumerate(splits):
    images[t, : len(split)] = split.images
    labels[t, : len(split)] = split.labels
    weights[t, : len(split)] = 1.0
  return {"image": images, "label": labels, "weight": weights}

"""Splits of uint8 images, and the authors' cut of a dataset into MARK's tasks.

The cut follows the authors: a seeded permutation of the classes, cut into groups of
`classes_per_task`, labels remapped to 0..classes_per_task-1 inside each task, and a seeded
fraction of each task's training images held out for validation. Images stay uint8 until
they reach the jitted step, which normalises them on device (mark_jax.models.normalize).
"""

import dataclasses

import numpy as np

from mark_jax.runtime.errors import DataError


@dataclasses.dataclass(frozen=True)
class Split:
  """Images (N, H, W, 3) uint8 and labels (N,) int32 of one task; `features` (N, D) are a
  frozen F's outputs for the images, computed once (mark_jax.resnet18.with_features)."""

  images: np.ndarray
  labels: np.ndarray
  features: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class TaskData:
  train: Split
  validation: Split
  test: Split
  classes: tuple[int, ...]


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
  """Raises DataError unless every label is an integer in [0, num_classes)."""
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
      f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
    )


def check_split(split: Split, num_classes: int, source: str) -> None:
  """Raises DataError unless `split` holds square uint8 RGB images with labels in range."""
  images = split.images
  if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
    raise DataError(f"{source}: expected square RGB images (N, H, H, 3), got {images.shape}")
  if images.dtype != np.uint8:
    if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
      raise DataError(f"{source}: {np.sum(~np.isfinite(images))} pixel values are not finite")
    raise DataError(f"{source}: expected uint8 pixels (0..255), got {images.dtype}")
  if len(images) != len(split.labels):
    raise DataError(f"{source}: {len(images)} images but {len(split.labels)} labels")
  check_labels(split.labels, num_classes, source)


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


def stack_splits(splits: list[Split], multiple: int) -> dict[str, np.ndarray]:
  """Stacks per-task splits along a leading task axis, zero-padded to a common length.

  Args:
    splits: one split per task.
    multiple: the common length is rounded up to a multiple of this (the eval batch).

  Returns:
    {'image': (T, N, H, W, 3), 'label': (T, N), 'weight': (T, N)}, and 'features' (T, N, D)
    if the splits have them; weight is 1 for real examples and 0 for padding.
  """
  length = max(len(s) for s in splits)
  length = -(-length // multiple) * multiple
  shape = splits[0].images.shape[1:]
  images = np.zeros((len(splits), length, *shape), np.uint8)
  labels = np.zeros((len(splits), length), np.int32)
  weights = np.zeros((len(splits), length), np.float32)
  stacked = {"image": images, "label": labels, "weight": weights}
  if splits[0].features is not None:
    stacked["features"] = np.zeros((len(splits), length, *splits[0].features.shape[1:]), np.float32)
  for t, split in enumerate(splits):
    images[t, : len(split)] = split.images
    labels[t, : len(split)] = split.labels
    weights[t, : len(split)] = 1.0
    if "features" in stacked:
      stacked["features"][t, : len(split)] = split.features
  return stacked

"""Datasets split into MARK's sequence of tasks.

A dataset loader returns whole splits as uint8 images (N, H, W, 3) and int labels. The
split into tasks follows the authors: a seeded permutation of the classes, cut into groups
of `classes_per_task`, labels remapped to 0..classes_per_task-1 inside each task, and a
seeded fraction of each task's training images held out for validation.

Images stay uint8 until they reach the jitted step, which normalises them on device.
"""

import dataclasses
import os
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from etils import epath

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

  tasks: list[TaskData]
  image_size: int
  classes_per_task: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


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


def _load_tfds(
  name: str, data_dir: str | None, download: bool, how_to_get: str, encoded: bool = False
):
  """Reads a TFDS dataset's train and test splits through `tfds.data_source`.

  Args:
    name: a builder of mark_jax.tfds_builders.
    data_dir: TFDS data_dir ('' or None: TFDS's default).
    download: whether TFDS may prepare a missing dataset (downloading what it needs).
    how_to_get: what the user should do when the dataset is missing.
    encoded: the images are stored encoded (JPEG/PNG bytes) and must be decoded.

  Returns:
    (train, test) splits.
  """
  import tensorflow_datasets as tfds  # Imported lazily: heavy, and absent on some devices.

  from mark_jax import tfds_builders  # noqa: F401  (registers the builders)

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
    except DataError:
      raise
    except Exception as error:  # TFDS raises many types; all mean "not usable here".
      raise DataError(
        f"dataset {name!r} ({split} split) is not available in data_dir "
        f"{data_dir or tfds.core.constants.DATA_DIR!r}: {str(error).splitlines()[0]}\n"
        f"To get it: {how_to_get}"
      ) from error
    where = f"{name} {split} example"
    images = [
      tfds_builders.decode_image(r["image"], f"{where} {i}") if encoded else r["image"]
      for i, r in enumerate(records)
    ]
    splits.append(
      Split(np.stack(images).astype(np.uint8), np.asarray([r["label"] for r in records], np.int32))
    )
  return splits[0], splits[1]


def _cifar100(config) -> tuple[Split, Split, int, tuple, tuple]:
  how_to_get = (
    "run `python -m mark_jax.data prepare cifar100 --source PATH` with the official "
    "cifar-100-python.tar.gz (or its extracted folder), or, with internet access, run once "
    "with --config.download=True; point --config.data_dir at the TFDS data_dir used."
  )
  train, test = _load_tfds("mark_cifar100", config.data_dir, config.download, how_to_get)
  return train, test, 100, CIFAR_MEAN, CIFAR_STD


def _miniimagenet(config) -> tuple[Split, Split, int, tuple, tuple]:
  how_to_get = (
    "MiniImageNet cannot be downloaded automatically: get a copy (README, 'Real data') and run "
    "`python -m mark_jax.data prepare miniimagenet --source PATH`, with --data_dir equal to "
    "--config.data_dir."
  )
  train, test = _load_tfds("mark_miniimagenet", config.data_dir, False, how_to_get, encoded=True)
  return train, test, 100, IMAGENET_MEAN, IMAGENET_STD


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


# Every class has 174 to 183 digits: 120 of each train, so that every task has as many
# training images (the compiled epoch keeps its shape: nothing recompiles between tasks).
DIGITS_TRAIN_PER_CLASS = 120


def digits_splits() -> tuple[Split, Split]:
  """scikit-learn's 8x8 handwritten digits (1,797 real images shipped with the library).

  Each image is scaled from 0..16 to 0..255, enlarged 4x to 32x32 (pixel repetition) and
  repeated over three channels, so that the CIFAR-100 network reads it. A seeded 120
  digits of each class are the training split, the other 54 to 63 (about 32%) the test
  split.

  Returns:
    (train, test) splits with uint8 images.
  """
  from sklearn.datasets import load_digits  # Imported lazily: only this dataset needs it.

  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)
  images = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)[..., None].repeat(3, axis=-1)
  labels = digits.target.astype(np.int32)
  rng = np.random.RandomState(0)
  is_train = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    is_train[members[:DIGITS_TRAIN_PER_CLASS]] = True
  return Split(images[is_train], labels[is_train]), Split(images[~is_train], labels[~is_train])


def _digits(config) -> tuple[Split, Split, int, tuple, tuple]:
  del config
  train, test = digits_splits()
  pixels = train.images[..., 0].astype(np.float64) / 255
  mean, std = (float(pixels.mean()),) * 3, (float(pixels.std()),) * 3
  return train, test, 10, mean, std


DATASETS: dict[str, Callable] = {
  "cifar100": _cifar100,
  "digits": _digits,
  "miniimagenet": _miniimagenet,
  "synthetic": _synthetic,
}


def resize(split: Split, size: int) -> Split:
  """The split with every image resized to size x size (Pillow's antialiased bilinear)."""
  from PIL import Image  # Imported lazily: only resized benchmarks need it.

  if split.images.shape[1:3] == (size, size):
    return split
  resized = [
    np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    for image in split.images
  ]
  return Split(np.stack(resized), split.labels)


def load_benchmark(config) -> Benchmark:
  """Loads `config.dataset` and cuts it into tasks as the config says."""
  if config.dataset not in DATASETS:
    raise DataError(f"unknown dataset {config.dataset!r}; known: {', '.join(sorted(DATASETS))}")
  train, test, num_classes, mean, std = DATASETS[config.dataset](config)
  check_split(train, num_classes, f"{config.dataset} train split")
  check_split(test, num_classes, f"{config.dataset} test split")
  if config.get("image_size"):
    train, test = resize(train, config.image_size), resize(test, config.image_size)
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
    where = f"task {t} of {config.dataset!r} (classes {list(task.classes)})"
    if len(task.test) == 0:
      raise DataError(f"{where} has no test images")
    if len(task.train) < config.batch_size:
      raise DataError(
        f"{where} has {len(task.train)} training images after the validation hold-out, fewer "
        f"than --config.batch_size={config.batch_size}"
      )
    if config.validation_fraction > 0 and len(task.validation) == 0:
      raise DataError(
        f"{where}: --config.validation_fraction={config.validation_fraction} holds out no image"
      )
  return Benchmark(
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


# Local copies that `prepare` turns into TFDS datasets: our name -> builder class in
# mark_jax.tfds_builders (imported only when preparing: it loads tensorflow_datasets).
PREPARABLE = {"cifar100": "MarkCifar100", "miniimagenet": "MarkMiniimagenet"}


def prepare(dataset: str, source: str, data_dir: str | None, verify_md5: bool = True) -> str:
  """Builds the TFDS dataset (array_record) of `dataset` from a local copy.

  Args:
    dataset: 'cifar100' or 'miniimagenet'.
    source: cifar100: the official cifar-100-python.tar.gz or its extracted folder;
      miniimagenet: a folder in one of the layouts of mark_jax.tfds_builders.
    data_dir: TFDS data_dir to write to (None: TFDS's default).
    verify_md5: check CIFAR-100's official md5 sums (switch off only for test archives).

  Returns:
    The directory of the prepared dataset.

  Raises:
    DataError: the source is missing, incomplete, altered or unreadable.
  """
  import tempfile

  from mark_jax import tfds_builders

  builder_class = getattr(tfds_builders, PREPARABLE[dataset])
  source_path = os.path.abspath(source)
  if not os.path.exists(source_path):
    raise DataError(f"{source}: no such file or directory")
  builder = builder_class(
    data_dir=data_dir or None, file_format="array_record", verify_md5=verify_md5
  )
  if (epath.Path(builder.data_dir) / "dataset_info.json").exists():
    raise DataError(
      f"{dataset} is already prepared in {builder.data_dir}; to prepare it again from "
      f"{source}, move that directory away first"
    )
  with tempfile.TemporaryDirectory() as tmp:
    manual_dir, link = source_path, os.path.join(tmp, tfds_builders.CIFAR100_ARCHIVE)
    if os.path.isfile(source_path):
      if dataset != "cifar100":
        raise DataError(f"{source}: give the folder that holds {dataset}, not a file")
      manual_dir = tmp
      os.symlink(source_path, link)
    elif dataset == "cifar100" and tfds_builders.find_cifar100(epath.Path(source_path)) is None:
      raise DataError(
        f"{source}: holds neither {tfds_builders.CIFAR100_ARCHIVE} nor "
        f"{tfds_builders.CIFAR100_FOLDER}/ (train, test, meta)"
      )
    download_config = tfds_builders.tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      builder.download_and_prepare(download_config=download_config)
    except DataError as error:  # Name the user's archive, not the temporary link to it.
      raise DataError(str(error).replace(link, source_path)) from None
  return str(builder.data_dir)


def main(argv: list[str] | None = None) -> None:
  """`python -m mark_jax.data prepare DATASET --source PATH [--data_dir DIR]`."""
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m mark_jax.data", description="Prepare MARK's datasets for offline use."
  )
  commands = parser.add_subparsers(dest="command", required=True)
  prepare_parser = commands.add_parser(
    "prepare",
    help="build a TFDS dataset (array_record) from a local copy",
    description="Builds the TFDS dataset that training reads from a local copy.",
  )
  prepare_parser.add_argument("dataset", choices=sorted(PREPARABLE))
  prepare_parser.add_argument(
    "--source",
    required=True,
    help="cifar100: cifar-100-python.tar.gz or its extracted folder; miniimagenet: a folder "
    "with train/<wnid>/*.jpg + val/<wnid>/*.jpg, train.pkl + test.pkl, or "
    "mini-imagenet-cache-{train,val,test}.pkl",
  )
  prepare_parser.add_argument(
    "--data_dir", default=None, help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)"
  )
  prepare_parser.add_argument(
    "--noverify_md5",
    dest="verify_md5",
    action="store_false",
    help="skip the check of CIFAR-100's official md5 sums (only for test archives)",
  )
  args = parser.parse_args(argv)
  try:
    path = prepare(args.dataset, args.source, args.data_dir, args.verify_md5)
  except DataError as error:
    raise SystemExit(f"error: {error}") from None
  hint = f" (train with --config.data_dir={args.data_dir})" if args.data_dir else ""
  print(f"{args.dataset} is ready in {path}{hint}")


if __name__ == "__main__":
  main()

"""The dataset loaders, and `load_benchmark(config)`: a dataset cut into tasks.

A loader returns whole splits as uint8 images (N, H, W, 3) and int labels; the dataset's
facts (classes, image size, normalisation) are in mark_jax.data.facts.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from mark_jax.data import facts as facts_lib
from mark_jax.data.tasks import Split, TaskData, check_split, split_into_tasks
from mark_jax.runtime.errors import DataError


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A dataset cut into tasks, with what the model needs to know about it."""

  tasks: list[TaskData]
  image_size: int
  classes_per_task: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


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
    name: a builder of mark_jax.data.tfds_builders.
    data_dir: TFDS data_dir ('' or None: TFDS's default).
    download: whether TFDS may prepare a missing dataset (downloading what it needs).
    how_to_get: what the user should do when the dataset is missing.
    encoded: the images are stored encoded (JPEG/PNG bytes) and must be decoded.

  Returns:
    (train, test) splits.
  """
  import tensorflow_datasets as tfds  # Imported lazily: heavy, and absent on some devices.

  from mark_jax.data import tfds_builders  # Registers the builders.

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


def _cifar100(config) -> tuple[Split, Split]:
  how_to_get = (
    "run `python -m mark_jax.data prepare cifar100 --source PATH` with the official "
    "cifar-100-python.tar.gz (or its extracted folder), or, with internet access, run once "
    "with --config.download=True; point --config.data_dir at the TFDS data_dir used."
  )
  return _load_tfds("mark_cifar100", config.data_dir, config.download, how_to_get)


def _miniimagenet(config) -> tuple[Split, Split]:
  how_to_get = (
    "MiniImageNet cannot be downloaded automatically: get a copy (README, 'Real data') and run "
    "`python -m mark_jax.data prepare miniimagenet --source PATH`, with --data_dir equal to "
    "--config.data_dir."
  )
  return _load_tfds("mark_miniimagenet", config.data_dir, False, how_to_get, encoded=True)


def _imagenet(config) -> tuple[Split, Split]:
  how_to_get = (
    "ImageNet cannot be downloaded automatically: with ILSVRC2012 as train/<wnid>/ + "
    "val/<wnid>/ folders, run `python -m mark_jax.data prepare imagenet --source PATH`, with "
    "--data_dir equal to --config.data_dir."
  )
  return _load_tfds("mark_imagenet", config.data_dir, False, how_to_get, encoded=True)


def _synthetic(config) -> tuple[Split, Split]:
  spec = config.synthetic
  return synthetic_splits(
    num_classes=spec.num_classes,
    train_per_class=spec.train_per_class,
    test_per_class=spec.test_per_class,
    image_size=spec.image_size,
    seed=spec.seed,
  )


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
    is_train[members[: facts_lib.FACTS["digits"].train_per_class]] = True
  return Split(images[is_train], labels[is_train]), Split(images[~is_train], labels[~is_train])


def _digits(config) -> tuple[Split, Split]:
  del config
  return digits_splits()


LOADERS: dict[str, Callable] = {
  "cifar100": _cifar100,
  "digits": _digits,
  "imagenet": _imagenet,
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


def dataset_facts(config) -> facts_lib.DatasetFacts:
  """The facts of `config.dataset` (mark_jax.data.facts)."""
  if config.dataset == "synthetic":
    spec = config.synthetic
    return facts_lib.synthetic_facts(spec.num_classes, spec.train_per_class, spec.image_size)
  if config.dataset not in facts_lib.FACTS:
    raise DataError(f"unknown dataset {config.dataset!r}; known: {', '.join(sorted(LOADERS))}")
  return facts_lib.FACTS[config.dataset]


def load_benchmark(config) -> Benchmark:
  """Loads `config.dataset` and cuts it into tasks as the config says."""
  return load_benchmarks([config])[0]


def load_benchmarks(configs: list) -> list[Benchmark]:
  """One benchmark per config, the dataset loaded once: configs that differ only in keys
  that do not touch the data but the seed, which cuts each its own tasks."""
  config = configs[0]
  facts = dataset_facts(config)
  num_classes, mean, std = facts.num_classes, facts.mean, facts.std
  train, test = LOADERS[config.dataset](config)
  if mean is None:  # grey images: the training split's own statistics
    pixels = train.images[..., 0].astype(np.float64) / 255
    mean, std = (float(pixels.mean()),) * 3, (float(pixels.std()),) * 3
  check_split(train, num_classes, f"{config.dataset} train split")
  check_split(test, num_classes, f"{config.dataset} test split")
  if config.get("image_size"):
    train, test = resize(train, config.image_size), resize(test, config.image_size)
  return [_cut(c, train, test, num_classes, mean, std) for c in configs]


def _cut(config, train: Split, test: Split, num_classes: int, mean, std) -> Benchmark:
  """The benchmark of `config`: the splits cut into its seed's tasks, each checked."""
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
  if config.feature_extractor == "resnet18":
    from mark_jax import resnet18  # JAX, needed here only for a frozen ResNet-18's features

    tasks = resnet18.with_features(tasks, config)
  return Benchmark(
    tasks=tasks,
    image_size=int(train.images.shape[1]),
    classes_per_task=config.classes_per_task,
    mean=mean,
    std=std,
  )

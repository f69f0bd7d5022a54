"""A fake ILSVRC2012 in the authors' layout, and ImageNet's facts patched to its size.

Its classes hold as many images as tiny_config()'s synthetic ones, so that a run on it
shares the programs of a run on synthetic data (with the same networks).
"""

import contextlib
import dataclasses

import numpy as np
import pytest
from PIL import Image

from mark_jax.data import facts, prepare, tfds_builders

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 15, 16, 20  # 3 tasks of tiny_config()'s sizes
SIZES = [(150, 200), (200, 150), (128, 128), (97, 300)]  # (height, width)


def write(root, val_in_class_folders: bool = True) -> None:
  """root/ILSVRC2012/{train,val}/<wnid>/*.JPEG, the authors' layout (val flat if not
  `val_in_class_folders`): JPEGs of several sizes, one grey, a colour per class."""
  rng = np.random.default_rng(0)
  for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
    for c in range(NUM_CLASSES):
      wnid = f"n{c:08d}"
      folder = root / "ILSVRC2012" / split
      folder = folder / wnid if split == "train" or val_in_class_folders else folder
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        height, width = SIZES[(c + i) % len(SIZES)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[..., c % 3] = 40 * (c % 6)  # a class colour, so that the classes differ
        image = Image.fromarray(pixels)
        image = image.convert("L") if (c, i) == (0, 0) else image  # a grey image
        image.save(folder / f"{wnid}_{split}_{i}.JPEG", quality=95)


@contextlib.contextmanager
def patched_facts():
  """ImageNet's facts with the fake's class count (the real one has 1,000) and the synthetic
  data's normalisation, whose constants are compiled into a run's programs."""
  small = dataclasses.replace(
    facts.FACTS["imagenet"],
    num_classes=NUM_CLASSES,
    train_per_class=TRAIN_PER_CLASS,
    mean=facts.CIFAR_MEAN,
    std=facts.CIFAR_STD,
  )
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(facts.FACTS, "imagenet", small)
    patch.setattr(tfds_builders, "IMAGENET", small)
    yield


def prepared(tmp_path_factory):
  """(source folder, TFDS data_dir) of a fake ImageNet prepared as the user would (inside
  patched_facts)."""
  source = tmp_path_factory.mktemp("imagenet_source")
  write(source)
  data_dir = tmp_path_factory.mktemp("imagenet_tfds")
  prepare.prepare("imagenet", str(source), str(data_dir))
  return source, data_dir

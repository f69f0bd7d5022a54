"""ImageNet (ILSVRC2012 class folders): prepared as the authors transform it (a fake
ILSVRC2012, tests/fake_imagenet.py). test_resnet18.py trains on it."""

import numpy as np
import pytest
from etils import epath
from PIL import Image

from configs import imagenet as imagenet_config
from mark_jax.data import datasets, prepare
from mark_jax.runtime.errors import DataError

import fake_imagenet
from fake_imagenet import NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS
from torch_reference import import_torchvision


@pytest.fixture(scope="module")
def small_imagenet():
  with fake_imagenet.patched_facts():
    yield


@pytest.fixture(scope="module")
def prepared(small_imagenet, tmp_path_factory):
  return fake_imagenet.prepared(tmp_path_factory)


def test_prepared_images_are_the_authors_resize_and_centre_crop(prepared):
  """Files come in sorted class and file order; the first two of each class equal
  torchvision's Resize(128) and CenterCrop(114) of the RGB image (the authors' transform
  before ToTensor)."""
  transforms = import_torchvision().transforms
  source, data_dir = prepared
  config = imagenet_config.get_config()
  config.data_dir = str(data_dir)
  train_split, test_split = datasets.LOADERS["imagenet"](config)
  transform = transforms.Compose([transforms.Resize(128), transforms.CenterCrop(114)])
  for split, folder, per_class in (
    (train_split, "train", TRAIN_PER_CLASS),
    (test_split, "val", VAL_PER_CLASS),
  ):
    files = sorted((source / "ILSVRC2012" / folder).glob("*/*.JPEG"))
    assert len(split) == len(files) == NUM_CLASSES * per_class
    np.testing.assert_array_equal(split.labels, np.repeat(np.arange(NUM_CLASSES), per_class))
    for index in (i for c in range(NUM_CLASSES) for i in (c * per_class, c * per_class + 1)):
      expected = np.asarray(transform(Image.open(files[index]).convert("RGB")))
      np.testing.assert_array_equal(split.images[index], expected)


@pytest.mark.parametrize(
  "layout, phrase",
  [
    ("empty", "an empty folder"),
    ("flat_val", "regroup them into class folders"),
    ("missing_class", f"expected {NUM_CLASSES} class folders, found {NUM_CLASSES - 1}"),
  ],
)
def test_other_layouts_are_refused_in_one_line(small_imagenet, tmp_path, layout, phrase):
  source = tmp_path / "source"
  source.mkdir()
  if layout != "empty":
    fake_imagenet.write(source, val_in_class_folders=layout != "flat_val")
  if layout == "missing_class":
    for path in (source / "ILSVRC2012" / "train" / "n00000009").iterdir():
      path.unlink()
    (source / "ILSVRC2012" / "train" / "n00000009").rmdir()
  with pytest.raises(DataError, match=phrase) as raised:
    prepare.prepare("imagenet", str(source), str(tmp_path / "tfds"))
  assert "\n" not in str(raised.value)
  assert not epath.Path(
    tmp_path / "tfds" / "mark_imagenet" / "1.0.0" / "dataset_info.json"
  ).exists()

"""ImageNet (ILSVRC2012 class folders): prepared as the authors transform it, and trained.

The test writes a fake ILSVRC2012 of a few classes (JPEGs of several sizes, one grey); the
dataset's facts are patched to its class count, as the real one has 1,000.
"""

import dataclasses

import numpy as np
import pytest
from etils import epath
from PIL import Image

from configs import imagenet as imagenet_config
from mark_jax import train
from mark_jax.data import datasets, facts, prepare, tfds_builders
from mark_jax.runtime.errors import DataError

from tiny import tiny_config

# tiny_config()'s synthetic tasks have as many images: a run shares its programs.
NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 16, 20
SIZES = [(150, 200), (200, 150), (128, 128), (97, 300)]  # (height, width)


def _write_imagenet(root, val_in_class_folders: bool = True) -> None:
  """root/ILSVRC2012/{train,val}/<wnid>/*.JPEG, the authors' layout."""
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


@pytest.fixture(scope="module")
def small_imagenet(tmp_path_factory):
  """ImageNet's facts with NUM_CLASSES classes while the module's tests run."""
  small = dataclasses.replace(
    facts.FACTS["imagenet"], num_classes=NUM_CLASSES, train_per_class=TRAIN_PER_CLASS
  )
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(facts.FACTS, "imagenet", small)
    patch.setattr(tfds_builders, "IMAGENET", small)
    yield


@pytest.fixture(scope="module")
def prepared(small_imagenet, tmp_path_factory):
  """(source folder, TFDS data_dir) of a prepared fake ImageNet."""
  source = tmp_path_factory.mktemp("imagenet_source")
  _write_imagenet(source)
  data_dir = tmp_path_factory.mktemp("imagenet_tfds")
  prepare.prepare("imagenet", str(source), str(data_dir))
  return source, data_dir


def test_prepared_images_are_the_authors_resize_and_centre_crop(prepared):
  """Files come in sorted class and file order; the first two of each class equal
  torchvision's Resize(128) and CenterCrop(114) of the RGB image (the authors' transform
  before ToTensor)."""
  from torchvision import transforms

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


def test_a_run_trains_on_prepared_imagenet(prepared, tmp_path):
  """tiny_config() on the prepared fake ImageNet, resized to 32x32, with a random
  ResNet-18 as F, as configs/imagenet.py (its own networks at 114x114 take minutes here)."""
  _, data_dir = prepared
  config = tiny_config(
    dataset="imagenet",
    data_dir=str(data_dir),
    image_size=32,
    feature_extractor="resnet18",
    resnet18_pretrained=False,
    resnet18_input_size=32,
  )
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["tasks_completed"] == NUM_CLASSES // config.classes_per_task
  matrix = np.array(results["accuracy_matrix"], dtype=float)
  assert np.isfinite(matrix[np.tril_indices(len(matrix))]).all()


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
    _write_imagenet(source, val_in_class_folders=layout != "flat_val")
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

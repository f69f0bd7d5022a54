"""TFDS builders for the real benchmarks, prepared from local files without TensorFlow.

Neither uses TFDS's `Image` feature (it encodes and decodes through TensorFlow), so
preparing and reading them never imports TensorFlow; both write array_record files that
`tfds.data_source` reads. CIFAR-100 stores raw uint8 arrays. MiniImageNet stores encoded
images (`decode_image` reads them): each JPEG's own bytes, or a lossless PNG for images
that come as arrays; raw 84x84 arrays would be 1.3 GB, past the size that TFDS's writer
keeps in memory (beyond it, it spills to disk through TensorFlow).

- `mark_cifar100`: the official `cifar-100-python.tar.gz` (or its extracted folder) from
  the builder's manual_dir, md5-checked; with no local copy, the official archive is
  downloaded. Splits train (50,000) and test (10,000).
- `mark_miniimagenet`: MiniImageNet (100 classes, 84x84 RGB) from manual_dir in any of the
  three layouts users have: class folders `train/<wnid>/*.jpg` + `val/<wnid>/*.jpg` (`val`
  is the benchmark's test split); the authors' `train.pkl` + `test.pkl` (`images` uint8
  (N, 84, 84, 3), `labels`); or `mini-imagenet-cache-{train,val,test}.pkl` (`image_data`,
  `class_dict`), whose 100 classes are pooled and cut into the first 500 images of each
  class for train and the rest for test. Pickles are read through `safe_pickle`.

- `mark_imagenet`: ILSVRC2012 from class folders `train/<wnid>/*` + `val/<wnid>/*` (the
  authors' layout; `val` is the test split), each image turned RGB, resized to 128 on its
  shorter side and centre-cropped to 114 as the authors' transform does, stored as a
  lossless PNG; examples are streamed one file at a time, in order (no shuffling buffer).

Every builder takes `verify_md5`: the CIFAR-100 md5 check can be switched off only by
passing `verify_md5=False` (the `prepare` command's `--noverify_md5`), for test archives.
"""

import hashlib
import io
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mark_jax.data import safe_pickle
from mark_jax.data.facts import FACTS
from mark_jax.data.tasks import check_labels
from mark_jax.runtime.errors import DataError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
# The official md5 sums (https://www.cs.toronto.edu/~kriz/cifar.html, torchvision).
CIFAR100_MD5 = {
  CIFAR100_ARCHIVE: "eb9058c3a382ffc7106e4002c42a8d85",
  "train": "16019d7e3df5f24257cddd939b257f8d",
  "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
  "meta": "7973b15100ade9c7d40fb424638fde48",
}
MINIIMAGENET_SIZE = FACTS["miniimagenet"].image_size
NUM_CLASSES = FACTS["cifar100"].num_classes  # as many in MiniImageNet
MINIIMAGENET_TRAIN_PER_CLASS = FACTS["miniimagenet"].train_per_class  # of each class's 600


def md5(path: epath.Path) -> str:
  digest = hashlib.md5()
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def check_md5(path: epath.Path, expected: str) -> None:
  """Raises DataError unless `path` has the official md5 sum."""
  actual = md5(path)
  if actual != expected:
    raise DataError(
      f"{path}: md5 {actual} is not the official {expected}: the copy is partial or "
      f"altered; download it again from {CIFAR100_URL}"
    )


def _features(
  image: tfds.features.Tensor, num_classes: int = NUM_CLASSES
) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {"image": image, "label": tfds.features.ClassLabel(num_classes=num_classes)}
  )


def decode_image(data: bytes, source: str) -> np.ndarray:
  """An encoded image (JPEG, PNG) as a uint8 RGB array."""
  from PIL import Image  # Only the encoded images (MiniImageNet, ImageNet) need Pillow.

  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"))
  except OSError as error:
    raise DataError(f"{source}: not a readable image ({error})") from None


def encode_png(image: np.ndarray) -> bytes:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder reading manual_dir, with the md5 switch of this module's docstring."""

  def __init__(self, *, verify_md5: bool = True, **kwargs):
    self.verify_md5 = verify_md5
    super().__init__(**kwargs)

  def _generate_examples(self, images, labels: np.ndarray) -> Iterator:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield index, {"image": image, "label": label}


class MarkCifar100(_LocalBuilder):
  """CIFAR-100 (fine labels) as uint8 arrays, from the official python archive."""

  name = "mark_cifar100"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official python archive as uint8 tensors."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f"Put {CIFAR100_ARCHIVE} (from {CIFAR100_URL}) or its extracted folder "
    f"{CIFAR100_FOLDER}/ (files train, test, meta) in the manual directory, or run "
    f"`python -m mark_jax.data prepare cifar100 --source PATH`."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=_features(tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8)),
      supervised_keys=("image", "label"),
      homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      manual = find_cifar100(epath.Path(dl_manager.manual_dir))
    except AssertionError:  # TFDS's way of saying "no manual directory, or an empty one".
      manual = None
    source = manual or epath.Path(dl_manager.download(CIFAR100_URL))
    files = read_cifar100(source, self.verify_md5)
    return {
      split: self._generate_examples(*_cifar100_split(files[split], f"{source} ({split})"))
      for split in ("train", "test")
    }


def find_cifar100(directory: epath.Path) -> epath.Path | None:
  """The CIFAR-100 folder (train, test, meta) or official archive in `directory`, if any."""
  for folder in (directory, directory / CIFAR100_FOLDER):
    if all((folder / name).exists() for name in ("train", "test", "meta")):
      return folder
  archive = directory / CIFAR100_ARCHIVE
  return archive if archive.exists() else None


def read_cifar100(source: epath.Path, verify_md5: bool) -> dict[str, bytes]:
  """The bytes of train, test and meta from an extracted folder or the archive.

  Raises:
    DataError: a file lacks its official md5 sum (when verify_md5) or the archive is
      incomplete or corrupt.
  """
  names = ("train", "test", "meta")
  if source.is_dir():
    if verify_md5:
      for name in names:
        check_md5(source / name, CIFAR100_MD5[name])
    return {name: (source / name).read_bytes() for name in names}
  if verify_md5:
    check_md5(source, CIFAR100_MD5[CIFAR100_ARCHIVE])
  files = {}
  try:
    with tarfile.open(source, "r:gz") as tar:
      for name in names:
        member = tar.extractfile(f"{CIFAR100_FOLDER}/{name}")
        files[name] = member.read() if member else b""
  except (tarfile.TarError, KeyError, OSError, EOFError, zlib.error) as error:
    raise DataError(f"{source}: not a complete CIFAR-100 archive ({error})") from None
  if verify_md5:
    for name, content in files.items():
      if hashlib.md5(content).hexdigest() != CIFAR100_MD5[name]:
        raise DataError(f"{source}: member {name} does not have the official md5 sum")
  return files


def _cifar100_split(content: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, 32, 32, 3) uint8, fine labels) of one pickled CIFAR-100 split."""
  content = safe_pickle.loads(content, source)
  try:
    images = np.asarray(content["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    raw_labels = content["fine_labels"]
  except (KeyError, TypeError, ValueError) as error:
    raise DataError(f"{source}: unexpected content ({type(error).__name__}: {error})") from None
  labels = as_labels(raw_labels, source)
  if len(images) != len(labels):
    raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
  return images, labels


def as_labels(values, source: str) -> np.ndarray:
  """`values` as a 1-D int64 array of labels in 0..99, or DataError."""
  try:
    labels = np.asarray(values)
  except ValueError as error:
    raise DataError(f"{source}: labels are not an array ({error})") from None
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
      f"{source}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
    )
  check_labels(labels, NUM_CLASSES, source)
  return labels.astype(np.int64)


def as_images(values, source: str) -> np.ndarray:
  """`values` as (N, 84, 84, 3) uint8 images, or DataError."""
  try:
    images = np.asarray(values)
  except ValueError as error:
    raise DataError(f"{source}: images are not one array ({error})") from None
  check_images(images, MINIIMAGENET_SIZE, source)
  return images


def check_images(images: np.ndarray, size: int, source: str) -> None:
  """Raises DataError unless `images` is (N, size, size, 3) uint8."""
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise DataError(
      f"{source}: expected uint8 images of shape (N, {size}, {size}, 3), "
      f"got {images.dtype} {images.shape}"
    )


class MarkMiniimagenet(_LocalBuilder):
  """MiniImageNet's 100 classes at 84x84, from a local copy in one of three layouts."""

  name = "mark_miniimagenet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Class folders or the two pickle layouts, as encoded images."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put MiniImageNet in the manual directory as train/<wnid>/*.jpg + val/<wnid>/*.jpg, "
    "or train.pkl + test.pkl, or mini-imagenet-cache-{train,val,test}.pkl, or run "
    "`python -m mark_jax.data prepare miniimagenet --source PATH`."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
    return self.dataset_info_from_configs(features=_features(encoded))

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    splits = read_miniimagenet(epath.Path(dl_manager.manual_dir))
    return {name: self._generate_examples(*split) for name, split in splits.items()}


def read_miniimagenet(source: epath.Path) -> dict[str, tuple[list[bytes], np.ndarray]]:
  """{'train': (encoded images, labels), 'test': ...} from whichever layout `source` holds.

  Every image is checked to decode as 84x84 RGB; array images are encoded as PNG.
  """
  if (source / "train").is_dir() and (source / "val").is_dir():
    class_names = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    return {
      "train": _read_class_folders(source / "train", class_names),
      "test": _read_class_folders(source / "val", class_names),
    }
  if (source / "train.pkl").exists() and (source / "test.pkl").exists():
    splits = {split: _read_authors_pickle(source / f"{split}.pkl") for split in ("train", "test")}
  else:
    caches = [source / f"mini-imagenet-cache-{part}.pkl" for part in ("train", "val", "test")]
    if not all(path.exists() for path in caches):
      raise DataError(
        f"{source}: no MiniImageNet found: expected train/<wnid>/*.jpg + val/<wnid>/*.jpg, "
        f"train.pkl + test.pkl, or mini-imagenet-cache-{{train,val,test}}.pkl"
      )
    splits = _read_cache_pickles(caches)
  return {name: ([encode_png(x) for x in images], y) for name, (images, y) in splits.items()}


def _read_class_folders(folder: epath.Path, class_names: list[str]):
  """Each class folder's files as they are (encoded), labelled by the sorted class names."""
  if len(class_names) != NUM_CLASSES:
    raise DataError(f"{folder}: expected {NUM_CLASSES} class folders, found {len(class_names)}")
  if sorted(p.name for p in folder.iterdir() if p.is_dir()) != class_names:
    raise DataError(f"{folder}: its class folders are not those of train/")
  encoded, labels = [], []
  for label, name in enumerate(class_names):
    files = sorted(p for p in (folder / name).iterdir() if p.is_file())
    if not files:
      raise DataError(f"{folder / name}: no images (every class needs images in train and val)")
    for path in files:
      data = path.read_bytes()
      check_images(decode_image(data, str(path))[None], MINIIMAGENET_SIZE, str(path))
      encoded.append(data)
      labels.append(label)
  return encoded, np.asarray(labels, np.int64)


def _read_authors_pickle(path: epath.Path):
  with path.open("rb") as f:
    content = safe_pickle.load(f, str(path))
  if not isinstance(content, dict) or not {"images", "labels"} <= set(content):
    raise DataError(f"{path}: expected a dict with 'images' and 'labels'")
  images, labels = as_images(content["images"], str(path)), as_labels(content["labels"], str(path))
  if len(images) != len(labels):
    raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
  return images, labels


def _read_cache_pickles(paths: list[epath.Path]):
  """Pools the few-shot cache files' classes and cuts each class into train and test."""
  per_class = {}
  for path in paths:
    with path.open("rb") as f:
      content = safe_pickle.load(f, str(path))
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
      raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    images = as_images(content["image_data"], str(path))
    if not isinstance(content["class_dict"], dict):
      raise DataError(f"{path}: 'class_dict' must map class names to lists of image indices")
    for name, indices in content["class_dict"].items():
      try:
        per_class[name] = images[np.asarray(indices, np.int64)]
      except (ValueError, TypeError, IndexError) as error:
        raise DataError(f"{path}: class {name!r} has bad image indices ({error})") from None
  if len(per_class) != NUM_CLASSES:
    raise DataError(f"{paths[0].parent}: expected {NUM_CLASSES} classes, found {len(per_class)}")
  splits = {"train": ([], []), "test": ([], [])}
  for label, name in enumerate(sorted(per_class)):
    images = per_class[name]
    for split, part in (
      ("train", images[:MINIIMAGENET_TRAIN_PER_CLASS]),
      ("test", images[MINIIMAGENET_TRAIN_PER_CLASS:]),
    ):
      splits[split][0].append(part)
      splits[split][1].append(np.full(len(part), label, np.int64))
  return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in splits.items()}


IMAGENET = FACTS["imagenet"]
IMAGENET_RESIZE = 128  # the authors' Resize(128) before CenterCrop(114)


def authors_imagenet_crop(image: np.ndarray) -> np.ndarray:
  """torchvision's Resize(128) (bilinear, on the PIL image) then CenterCrop(114)."""
  from PIL import Image

  height, width = image.shape[:2]
  short = IMAGENET_RESIZE
  size = (
    (short, int(short * height / width))
    if width <= height
    else (int(short * width / height), short)
  )
  resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
  crop = IMAGENET.image_size
  top = int(round((resized.shape[0] - crop) / 2.0))
  left = int(round((resized.shape[1] - crop) / 2.0))
  return resized[top : top + crop, left : left + crop]


class MarkImagenet(_LocalBuilder):
  """ILSVRC2012's 1,000 classes at the authors' 114x114, from class folders."""

  name = "mark_imagenet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Class folders, resized and centre-cropped as the authors, as PNG."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put ILSVRC2012 in the manual directory as train/<wnid>/*.JPEG + val/<wnid>/*.JPEG (the "
    "validation images regrouped into class folders), or run "
    "`python -m mark_jax.data prepare imagenet --source PATH`."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    encoded = tfds.features.Tensor(shape=(), dtype=np.object_)
    return self.dataset_info_from_configs(
      features=_features(encoded, IMAGENET.num_classes),
      homepage="https://image-net.org/challenges/LSVRC/2012/",
      disable_shuffling=True,  # streamed in order: no buffer of 1.3M images in memory
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source = epath.Path(dl_manager.manual_dir)
    if (source / "ILSVRC2012").is_dir():  # the authors' data_dir holds ILSVRC2012/
      source = source / "ILSVRC2012"
    class_names = imagenet_classes(source)
    return {
      "train": self._stream_class_folders(source / "train", class_names),
      "test": self._stream_class_folders(source / "val", class_names),
    }

  def _stream_class_folders(self, folder: epath.Path, class_names: list[str]) -> Iterator:
    """(key, example) of every file of each class folder, labelled by the sorted classes."""
    index = 0
    for label, name in enumerate(class_names):
      files = sorted(p for p in (folder / name).iterdir() if p.is_file())
      if not files:
        raise DataError(f"{folder / name}: no images (every class needs images in train and val)")
      for path in files:
        image = authors_imagenet_crop(decode_image(path.read_bytes(), str(path)))
        yield index, {"image": encode_png(image), "label": label}
        index += 1


def imagenet_classes(source: epath.Path) -> list[str]:
  """The sorted class folders (wnids) of an ILSVRC2012 copy; DataError for another layout."""
  train, val = source / "train", source / "val"
  if not (train.is_dir() and val.is_dir()):
    raise DataError(f"{source}: expected ILSVRC2012 as train/<wnid>/ and val/<wnid>/ folders")
  class_names = sorted(p.name for p in train.iterdir() if p.is_dir())
  if len(class_names) != IMAGENET.num_classes:
    raise DataError(
      f"{train}: expected {IMAGENET.num_classes} class folders, found {len(class_names)}"
    )
  val_names = sorted(p.name for p in val.iterdir() if p.is_dir())
  if val_names != class_names:
    flat = not val_names and any(p.is_file() for p in val.iterdir())
    hint = (
      ": the official validation images come in one folder; regroup them into class "
      "folders (one per wnid, as train/) first"
      if flat
      else ""
    )
    raise DataError(f"{val}: its class folders are not those of train/{hint}")
  return class_names

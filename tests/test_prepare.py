"""Preparing the real benchmarks from local copies (`python -m mark_jax.data prepare`).

CIFAR-100 comes from a fake copy in the official layout that the tests write; MiniImageNet
from the real sample in ../shared/data/miniimagenet_sample (class folders) and from small
fake pickles in the two pickle layouts. Every prepared dataset goes to pytest's tmp_path.
"""

import collections
import functools
import http.server
import json
import os
import pickle
import re
import shlex
import struct
import subprocess
import sys
import tarfile
import threading
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import cifar100, miniimagenet
from mark_jax import train
from mark_jax.data import datasets, facts, prepare, safe_pickle, tfds_builders
from mark_jax.runtime.errors import DataError

from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "miniimagenet_sample")
NUM_CLASSES = tfds_builders.NUM_CLASSES
MINIIMAGENET_SHAPE = (tfds_builders.MINIIMAGENET_SIZE, tfds_builders.MINIIMAGENET_SIZE, 3)


def _run_prepare(*args: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "mark_jax.data", "prepare", *args]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
  """The CLI failed with exit code 2 and a single `error:` line holding each fragment."""
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  for fragment in fragments:
    assert fragment in lines[0]


def _assert_nothing_prepared(data_dir) -> None:
  assert not list(data_dir.glob("**/dataset_info.json")), "a dataset was prepared"


def _read_prepared(name: str, split: str, data_dir) -> tuple[list, np.ndarray]:
  """(images, labels) of a prepared split, in TFDS's stored order; MiniImageNet's encoded."""
  source = tfds.data_source(name, split=split, data_dir=str(data_dir))
  records = source.__getitems__(range(len(source)))
  return [r["image"] for r in records], np.array([r["label"] for r in records])


def _examples(images, labels) -> collections.Counter:
  """The (label, pixels) pairs of a split, as a multiset: equal whatever the order."""
  return collections.Counter(
    (int(label), np.asarray(image).tobytes()) for image, label in zip(images, labels, strict=True)
  )


def _decoded(encoded_images: list[bytes]) -> np.ndarray:
  return np.stack([tfds_builders.decode_image(x, "test") for x in encoded_images])


def _random_images(rng: np.random.RandomState, count: int, shape) -> np.ndarray:
  """Uniform noise: every image is distinct, so an example can be recognised by its pixels."""
  return rng.randint(0, 256, (count, *shape)).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# CIFAR-100 from a fake copy of the official python archive.


class _Python2Pickler(pickle._Pickler):
  """Pickles as Python 2's cPickle wrote the official CIFAR-100 files (protocol 2).

  Strings and bytes become 8-bit strings (BINSTRING), which Python 3 reads back only with
  encoding='latin1'; numpy's functions keep their numpy 1 module (numpy.core).
  """

  dispatch = dict(pickle._Pickler.dispatch)

  def save_8bit_string(self, obj):
    raw = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
    self.memoize(obj)

  dispatch[str] = save_8bit_string
  dispatch[bytes] = save_8bit_string

  def save_global(self, obj, name=None):
    module = obj.__module__.replace("numpy._core", "numpy.core")
    self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())
    self.memoize(obj)


# tiny_config()'s images per class: a run on the copy trains the programs of the reference.
CIFAR_PER_CLASS = {
  split: tiny_config().synthetic[f"{split}_per_class"] for split in ("train", "test")
}


def _write_cifar_batch(path, split: str, rng) -> tuple[np.ndarray, np.ndarray]:
  """A fake `train` or `test` file of the official layout; returns its (HWC images, labels)."""
  labels = rng.permutation(np.repeat(np.arange(NUM_CLASSES), CIFAR_PER_CLASS[split]))
  images_chw = _random_images(rng, len(labels), (3, 32, 32))
  content = {
    b"batch_label": f"{split} batch 1 of 1".encode(),
    b"fine_labels": labels.tolist(),
    b"coarse_labels": (labels // 5).tolist(),
    b"data": images_chw.reshape(len(labels), -1),  # rows: 1024 red, 1024 green, 1024 blue
    b"filenames": [f"image_{i}.png".encode() for i in range(len(labels))],
  }
  with open(path, "wb") as f:
    _Python2Pickler(f, protocol=2).dump(content)
  return images_chw.transpose(0, 2, 3, 1), labels


@pytest.fixture(scope="module")
def cifar_copy(tmp_path_factory):
  """A fake CIFAR-100 (all 100 classes) as the extracted folder and the .tar.gz archive.

  Returns:
    folder, archive, and expected: {split: (HWC images, labels)}.
  """
  root = tmp_path_factory.mktemp("cifar_copy")
  folder = root / tfds_builders.CIFAR100_FOLDER
  folder.mkdir()
  rng = np.random.RandomState(0)
  expected = {split: _write_cifar_batch(folder / split, split, rng) for split in ("train", "test")}
  meta = {
    b"fine_label_names": [f"fine_{c}".encode() for c in range(NUM_CLASSES)],
    b"coarse_label_names": [f"coarse_{c}".encode() for c in range(20)],
  }
  with open(folder / "meta", "wb") as f:
    _Python2Pickler(f, protocol=2).dump(meta)
  archive = root / tfds_builders.CIFAR100_ARCHIVE
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname=tfds_builders.CIFAR100_FOLDER)
  return types.SimpleNamespace(folder=folder, archive=archive, expected=expected)


@pytest.fixture(scope="module")
def cifar_from_archive(cifar_copy, tmp_path_factory):
  """The TFDS data_dir that `prepare cifar100 --source ARCHIVE --noverify_md5` filled."""
  data_dir = tmp_path_factory.mktemp("cifar_data_dir")
  result = _run_prepare(
    "cifar100", "--source", str(cifar_copy.archive), "--data_dir", str(data_dir), "--noverify_md5"
  )
  assert result.returncode == 0, result.stderr
  return data_dir


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  """Serves a folder without logging each request to stderr."""

  def log_message(self, *args):
    del args


@pytest.fixture
def cifar_server(cifar_copy, monkeypatch):
  """The fake archive served over HTTP on 127.0.0.1, with CIFAR100_URL and the md5 table
  pointing at it (in this process only): what a Cloud TPU VM's first run downloads."""
  handler = functools.partial(_QuietHandler, directory=str(cifar_copy.archive.parent))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{server.server_port}/{tfds_builders.CIFAR100_ARCHIVE}"
  monkeypatch.setattr(tfds_builders, "CIFAR100_URL", url)
  monkeypatch.setitem(
    tfds_builders.CIFAR100_MD5,
    tfds_builders.CIFAR100_ARCHIVE,
    tfds_builders.md5(cifar_copy.archive),
  )
  for name in ("train", "test", "meta"):
    monkeypatch.setitem(
      tfds_builders.CIFAR100_MD5, name, tfds_builders.md5(cifar_copy.folder / name)
    )
  monkeypatch.setenv("NO_PROXY", "127.0.0.1")
  yield url
  server.shutdown()
  server.server_close()


def test_cifar100_downloads_through_tfds_and_trains(cifar_copy, cifar_server, tmp_path):
  """--config.download=True with no local copy: TFDS's download manager fetches the archive
  from the (local) URL, the builder checks its md5 sums and prepares it, and a run trains."""
  config = tiny_config(
    dataset="cifar100", data_dir=str(tmp_path / "tfds"), download=True, max_tasks=2, epochs=1
  )
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["tasks_completed"] == 2
  downloaded = list((tmp_path / "tfds" / "downloads").rglob("*cifar-100-python*"))
  assert downloaded, "nothing went through the download manager"
  _assert_cifar_matches(tmp_path / "tfds", cifar_copy.expected)


def _assert_cifar_matches(data_dir, expected) -> None:
  for split, (images, labels) in expected.items():
    stored_images, stored_labels = _read_prepared("mark_cifar100", split, data_dir)
    assert len(stored_labels) == len(labels)
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in stored_images)
    assert _examples(stored_images, stored_labels) == _examples(images, labels)


def test_cifar100_from_archive_by_cli_gives_the_images_and_labels_written(
  cifar_copy, cifar_from_archive
):
  _assert_cifar_matches(cifar_from_archive, cifar_copy.expected)


def test_cifar100_from_folder_by_api_gives_the_images_and_labels_written(cifar_copy, tmp_path):
  prepare.prepare("cifar100", str(cifar_copy.folder), str(tmp_path), verify_md5=False)
  _assert_cifar_matches(tmp_path, cifar_copy.expected)


@pytest.mark.parametrize("source", ["archive", "folder"])
def test_cifar100_md5_check_refuses_a_copy_that_is_not_official(cifar_copy, tmp_path, source):
  result = _run_prepare(
    "cifar100", "--source", str(getattr(cifar_copy, source)), "--data_dir", str(tmp_path)
  )
  _assert_one_line_error(result, "md5")
  _assert_nothing_prepared(tmp_path)


def test_cifar100_truncated_archive_is_refused_in_one_line(cifar_copy, tmp_path):
  truncated = tmp_path / "truncated.tar.gz"
  archive_bytes = cifar_copy.archive.read_bytes()
  truncated.write_bytes(archive_bytes[: len(archive_bytes) // 2])
  data_dir = tmp_path / "data_dir"
  result = _run_prepare(
    "cifar100", "--source", str(truncated), "--data_dir", str(data_dir), "--noverify_md5"
  )
  _assert_one_line_error(result, "archive")
  _assert_nothing_prepared(data_dir)


def test_cifar100_archive_errors_name_the_archive_given(cifar_copy, tmp_path):
  result = _run_prepare(
    "cifar100", "--source", str(cifar_copy.archive), "--data_dir", str(tmp_path)
  )
  _assert_one_line_error(result, str(cifar_copy.archive))


def test_cifar100_folder_without_cifar_is_refused_without_downloading(tmp_path, monkeypatch):
  def no_download(*args, **kwargs):
    raise RuntimeError("prepare tried to download")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
  source = tmp_path / "not_cifar"
  source.mkdir()
  with pytest.raises(DataError, match="not_cifar"):
    prepare.prepare("cifar100", str(source), str(tmp_path / "data_dir"), verify_md5=False)


def test_cifar100_benchmark_from_the_prepared_copy(cifar_copy, cifar_from_archive):
  """load_benchmark cuts the prepared copy into tasks holding exactly their classes' images."""
  config = cifar100.get_config()
  config.data_dir = str(cifar_from_archive)
  config.download = False
  config.batch_size = CIFAR_PER_CLASS["train"]  # at most the few training images a task has
  benchmark = datasets.load_benchmark(config)
  assert len(benchmark.tasks) == NUM_CLASSES // config.classes_per_task
  assert benchmark.image_size == 32
  assert (benchmark.mean, benchmark.std) == (facts.CIFAR_MEAN, facts.CIFAR_STD)
  original_class = {
    split: {image.tobytes(): int(label) for image, label in zip(images, labels, strict=True)}
    for split, (images, labels) in cifar_copy.expected.items()
  }
  for task in benchmark.tasks:
    for split, parts in (("train", (task.train, task.validation)), ("test", (task.test,))):
      images = np.concatenate([part.images for part in parts])
      labels = np.concatenate([part.labels for part in parts])
      assert len(labels) == CIFAR_PER_CLASS[split] * config.classes_per_task
      assert len({image.tobytes() for image in images}) == len(labels)
      for image, label in zip(images, labels, strict=True):
        assert original_class[split][image.tobytes()] == task.classes[label]


# ---------------------------------------------------------------------------------------
# MiniImageNet from the real sample (class folders).


def _sample_files(split_folder: str) -> dict[bytes, tuple[int, str]]:
  """{file bytes: (label, path)}; the label is the wnid's position among the sorted wnids."""
  wnids = sorted(os.listdir(split_folder))
  files = {}
  for label, wnid in enumerate(wnids):
    for name in sorted(os.listdir(os.path.join(split_folder, wnid))):
      path = os.path.join(split_folder, wnid, name)
      with open(path, "rb") as f:
        files[f.read()] = (label, path)
  return files


def _pillow_decode(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def _write_class_folders(root, train_per_class: int = 10, val_per_class: int = 5) -> None:
  """MiniImageNet's class-folder layout with random 84x84 JPEGs, as many per class as the
  shared sample has (so that both variants train the same programs)."""
  rng = np.random.RandomState(0)
  for split, count in (("train", train_per_class), ("val", val_per_class)):
    for index in range(NUM_CLASSES):
      folder = root / split / f"n{index:08d}"
      folder.mkdir(parents=True)
      for image in _random_images(rng, count, MINIIMAGENET_SHAPE):
        Image.fromarray(image).save(folder / f"n{index:08d}_{rng.randint(10**8):08d}.jpg")


@pytest.fixture(scope="module", params=["shared_sample", "written_folders"])
def sample_source(request, tmp_path_factory) -> str:
  """A MiniImageNet in class folders: the real sample beside the repository (skipped where
  it is absent), or JPEG folders this fixture writes, so a fresh clone tests the layout too."""
  if request.param == "shared_sample":
    if not os.path.isdir(SAMPLE):
      pytest.skip(f"the MiniImageNet sample is not at {os.path.abspath(SAMPLE)}")
    return SAMPLE
  root = tmp_path_factory.mktemp("class_folders")
  _write_class_folders(root)
  return str(root)


@pytest.fixture(scope="module")
def sample_data_dir(sample_source, tmp_path_factory):
  """The TFDS data_dir that `prepare miniimagenet --source SOURCE` filled."""
  data_dir = tmp_path_factory.mktemp("miniimagenet_data_dir")
  result = _run_prepare("miniimagenet", "--source", sample_source, "--data_dir", str(data_dir))
  assert result.returncode == 0, result.stderr
  assert f"--config.data_dir={data_dir}" in result.stdout
  return data_dir


@pytest.mark.parametrize("split, folder", [("train", "train"), ("test", "val")])
def test_miniimagenet_sample_is_prepared_file_for_file(
  sample_source, sample_data_dir, split, folder
):
  """Every stored example is one file of the sample, labelled by its class folder."""
  files = _sample_files(os.path.join(sample_source, folder))
  per_class = np.bincount([label for label, _ in files.values()], minlength=NUM_CLASSES)
  assert len(per_class) == NUM_CLASSES and per_class.min() > 0
  encoded, labels = _read_prepared("mark_miniimagenet", split, sample_data_dir)
  np.testing.assert_array_equal(np.bincount(labels, minlength=NUM_CLASSES), per_class)
  assert sorted(files[x][1] for x in encoded) == sorted(path for _, path in files.values())
  assert all(files[x][0] == label for x, label in zip(encoded, labels, strict=True))
  images = _decoded(encoded)
  assert images.shape == (len(files), *MINIIMAGENET_SHAPE) and images.dtype == np.uint8
  assert np.all(images.max(axis=(1, 2, 3)) > images.min(axis=(1, 2, 3)))


def test_miniimagenet_benchmark_test_images_are_the_val_files(sample_source, sample_data_dir):
  """Through load_benchmark, each task's test split is its classes' val JPEGs, decoded."""
  config = miniimagenet.get_config()
  config.data_dir = str(sample_data_dir)
  config.batch_size = 16  # at most the 49 training images a task of the sample has
  benchmark = datasets.load_benchmark(config)
  assert benchmark.image_size == tfds_builders.MINIIMAGENET_SIZE
  val_files = collections.defaultdict(list)
  for label, path in _sample_files(os.path.join(sample_source, "val")).values():
    val_files[label].append(path)
  for task in benchmark.tasks:
    expected = collections.Counter(
      (task_label, _pillow_decode(path).tobytes())
      for task_label, original in enumerate(task.classes)
      for path in val_files[original]
    )
    assert _examples(task.test.images, task.test.labels) == expected


def test_tiny_training_on_the_prepared_sample(sample_data_dir, tmp_path):
  """The first 3 tasks of configs/miniimagenet.py, resized to 16x16, at a minimal budget
  (load_benchmark's tests above read every task)."""
  overrides = dict(
    data_dir=str(sample_data_dir),
    max_tasks=3,
    image_size=16,
    validation_fraction=0.02,
    batch_size=16,
    eval_batch_size=25,
    epochs=1,
    meta_rounds=1,
    mini_tasks=2,
    inner_steps=2,
    kb_channels=(16, 32, 64),  # narrower KB: this run checks the pipeline, not the network
  )
  config = miniimagenet.get_config()
  for key, value in overrides.items():
    config[key] = value
  results = train.train_and_evaluate(config, str(tmp_path))
  num_tasks = config.max_tasks
  assert results["tasks_completed"] == num_tasks
  matrix = results["accuracy_matrix"]
  assert len(matrix) == num_tasks and all(len(row) == num_tasks for row in matrix)
  for t, row in enumerate(matrix):
    assert all(value is None for value in row[t + 1 :])
    assert all(0.0 <= value <= 1.0 for value in row[: t + 1])
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["accuracy_matrix"] == matrix


# ---------------------------------------------------------------------------------------
# MiniImageNet from the two pickle layouts.


def _dump(path, content, protocol: int = 4) -> None:
  with open(path, "wb") as f:
    pickle.dump(content, f, protocol=protocol)


def test_authors_pickles_survive_exactly(tmp_path):
  rng = np.random.RandomState(1)
  expected = {}
  for split, count in (("train", 30), ("test", 12)):
    images = _random_images(rng, count, MINIIMAGENET_SHAPE)
    labels = rng.randint(0, NUM_CLASSES, count)
    _dump(tmp_path / f"{split}.pkl", {"images": images, "labels": labels})
    expected[split] = images, labels
  data_dir = tmp_path / "data_dir"
  prepare.prepare("miniimagenet", str(tmp_path), str(data_dir))
  for split, (images, labels) in expected.items():
    encoded, stored_labels = _read_prepared("mark_miniimagenet", split, data_dir)
    assert _examples(_decoded(encoded), stored_labels) == _examples(images, labels)


def test_cache_pickles_pool_classes_and_cut_each_class(tmp_path, monkeypatch):
  """The three cache files' classes, labelled by sorted wnid, cut per class in file order."""
  assert tfds_builders.MINIIMAGENET_TRAIN_PER_CLASS == 500  # of 600: the benchmark's cut
  train_per_class, per_class = 2, 3
  monkeypatch.setattr(tfds_builders, "MINIIMAGENET_TRAIN_PER_CLASS", train_per_class)
  rng = np.random.RandomState(2)
  wnids = [f"n{index:08d}" for index in rng.choice(10**4, NUM_CLASSES, replace=False)]
  part_sizes = {"train": 64, "val": 16, "test": 20}
  shuffled_wnids = iter(rng.permutation(wnids))
  expected = {"train": ([], []), "test": ([], [])}
  for part, num_part_classes in part_sizes.items():
    part_wnids = [next(shuffled_wnids) for _ in range(num_part_classes)]
    images = _random_images(rng, num_part_classes * per_class, MINIIMAGENET_SHAPE)
    rows = rng.permutation(len(images)).reshape(num_part_classes, per_class)
    class_dict = {wnid: rows[i].tolist() for i, wnid in enumerate(part_wnids)}
    _dump(
      tmp_path / f"mini-imagenet-cache-{part}.pkl", {"image_data": images, "class_dict": class_dict}
    )
    for wnid, indices in class_dict.items():
      label = sorted(wnids).index(wnid)
      for split, kept in (
        ("train", indices[:train_per_class]),
        ("test", indices[train_per_class:]),
      ):
        expected[split][0].extend(images[kept])
        expected[split][1].extend([label] * len(kept))
  data_dir = tmp_path / "data_dir"
  prepare.prepare("miniimagenet", str(tmp_path), str(data_dir))
  for split, (images, labels) in expected.items():
    encoded, stored_labels = _read_prepared("mark_miniimagenet", split, data_dir)
    assert _examples(_decoded(encoded), stored_labels) == _examples(images, labels)


def _authors_layout(images, labels):
  return {"train.pkl": {"images": images, "labels": labels}}


def _cache_layout(image_data, class_dict):
  """Cache files whose train part is (image_data, class_dict); val and test have no classes."""
  empty = {"image_data": np.zeros((0, *MINIIMAGENET_SHAPE), np.uint8), "class_dict": {}}
  return {
    "mini-imagenet-cache-train.pkl": {"image_data": image_data, "class_dict": class_dict},
    "mini-imagenet-cache-val.pkl": empty,
    "mini-imagenet-cache-test.pkl": empty,
  }


_IMAGES = np.zeros((2, *MINIIMAGENET_SHAPE), np.uint8)


@pytest.mark.parametrize(
  "files",
  [
    pytest.param({"train.pkl": [1, 2, 3]}, id="not_a_dict"),
    pytest.param({"train.pkl": {"images": _IMAGES}}, id="no_labels"),
    pytest.param(_authors_layout(_IMAGES, [0, NUM_CLASSES]), id="label_out_of_range"),
    pytest.param(_authors_layout(_IMAGES, [0]), id="fewer_labels_than_images"),
    pytest.param(_authors_layout(_IMAGES[:, :40, :40], [0, 1]), id="images_not_84x84"),
    pytest.param(_authors_layout(_IMAGES.astype(np.float32), [0, 1]), id="float_images"),
    pytest.param(
      _authors_layout(_IMAGES, ["n01532829", "n01558993"]),
      id="labels_are_wnids",
    ),
    pytest.param(
      _authors_layout(_IMAGES, [[0], [1]]),
      id="labels_of_shape_n_by_1",
    ),
    pytest.param(
      _authors_layout([_IMAGES[0], _IMAGES[0, :40]], [0, 1]),
      id="images_of_different_shapes",
    ),
    pytest.param(_cache_layout(_IMAGES, {"n0": [0]}), id="cache_too_few_classes"),
    pytest.param(
      _cache_layout(_IMAGES, {"n0": [5]}),
      id="cache_index_out_of_range",
    ),
    pytest.param(
      _cache_layout(_IMAGES, [[0]]),
      id="cache_class_dict_not_a_dict",
    ),
  ],
)
def test_malformed_pickle_content_is_a_data_error_naming_the_source(tmp_path, files):
  source = tmp_path / "source"
  source.mkdir()
  if "train.pkl" in files:
    files = {**files, "test.pkl": files["train.pkl"]}
  for name, content in files.items():
    _dump(source / name, content)
  with pytest.raises(DataError, match=re.escape(str(source))):
    prepare.prepare("miniimagenet", str(source), str(tmp_path / "data_dir"))


# ---------------------------------------------------------------------------------------
# Pickles are read without running their code.


class _RunsCommand:
  """Unpickling an instance runs a shell command: what a crafted dataset pickle can do."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


REFUSED_GLOBAL = f"{os.system.__module__}.{os.system.__name__}"  # posix.system on Linux


def _write_crafted_pickle(path, marker) -> None:
  """A dataset-like pickle whose unpickling would create `marker`."""
  content = {"images": _RunsCommand(f"touch {shlex.quote(str(marker))}"), "labels": [0]}
  _dump(path, content, protocol=2)


class _ZeroStrideArray:
  """Unpickles as `numpy.ndarray(shape, 'u1', one byte, 0, zero strides)`: a 21 TB array
  over one byte, which passes shape checks and fills memory at its first copy."""

  def __reduce__(self):
    return np.ndarray, ((10**9, 84, 84, 3), "u1", b"\0", 0, (0, 0, 0, 0))


class _OversizedReconstruct:
  """Unpickles through numpy's own `_reconstruct`, asking for 21 GB."""

  def __reduce__(self):
    return np.ndarray.__reduce__(np.zeros(0, np.uint8))[0], (np.ndarray, (10**6, 84, 84, 3), b"B")


@pytest.mark.parametrize(
  "array, message",
  [
    (_ZeroStrideArray(), "refused to unpickle: it asks for a call of numpy.ndarray itself"),
    (_OversizedReconstruct(), "cannot come from a file of"),
  ],
  ids=["zero_stride_bomb", "oversized_reconstruct"],
)
def test_memory_bomb_pickle_is_refused_before_it_allocates(tmp_path, array, message):
  path = tmp_path / "train.pkl"
  _dump(path, {"data": array, "fine_labels": [0]}, protocol=2)
  assert path.stat().st_size < 300
  with open(path, "rb") as f, pytest.raises(DataError) as error:
    safe_pickle.load(f, str(path))
  assert str(path) in str(error.value) and message in str(error.value)


def test_memory_error_while_unpickling_is_one_data_error(monkeypatch):
  def exhausted(self):
    raise MemoryError()

  monkeypatch.setattr(safe_pickle._RestrictedUnpickler, "load", exhausted)
  with pytest.raises(DataError, match=re.escape("big.pkl: not a readable pickle (MemoryError")):
    safe_pickle.loads(pickle.dumps([1]), "big.pkl")


def test_crafted_pickle_is_refused_without_running_it(tmp_path):
  path, marker = tmp_path / "crafted.pkl", tmp_path / "pwned"
  _write_crafted_pickle(path, marker)
  with open(path, "rb") as f, pytest.raises(DataError) as error:
    safe_pickle.load(f, str(path))
  assert str(path) in str(error.value) and REFUSED_GLOBAL in str(error.value)
  assert not marker.exists()
  pickle.loads(path.read_bytes())  # The file is dangerous indeed: plain pickle runs it.
  assert marker.exists()


@pytest.mark.parametrize("crafted", ["command", "memory_bomb"])
def test_crafted_train_pickle_is_refused_by_the_cli(tmp_path, crafted):
  source, marker = tmp_path / "source", tmp_path / "pwned"
  source.mkdir()
  for name in ("train.pkl", "test.pkl"):
    if crafted == "command":
      _write_crafted_pickle(source / name, marker)
    else:
      _dump(source / name, {"image_data": _ZeroStrideArray(), "class_dict": {}}, protocol=2)
  data_dir = tmp_path / "data_dir"
  result = _run_prepare("miniimagenet", "--source", str(source), "--data_dir", str(data_dir))
  refused = REFUSED_GLOBAL if crafted == "command" else "a call of numpy.ndarray itself"
  _assert_one_line_error(result, str(source / "train.pkl"), refused)
  assert not marker.exists()
  _assert_nothing_prepared(data_dir)


@pytest.mark.parametrize(
  "protocol",
  list(range(2, pickle.HIGHEST_PROTOCOL + 1)),
)
def test_legitimate_pickle_round_trips(protocol):
  content = {
    "images": np.arange(2 * 84 * 84 * 3, dtype=np.int64).astype(np.uint8).reshape(2, 84, 84, 3),
    "features": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "labels": [0, 99],
    "class_dict": {"n01532829": [0], "n01558993": [1]},
    "names": ["first", "second"],
    "count": 2,
    "scale": 0.5,
    "numpy_scalar": np.int64(7),
  }
  loaded = safe_pickle.loads(pickle.dumps(content, protocol=protocol), "legitimate.pkl")
  assert loaded.keys() == content.keys()
  for key, value in content.items():
    if isinstance(value, np.ndarray):
      assert loaded[key].dtype == value.dtype
      np.testing.assert_array_equal(loaded[key], value)
    else:
      assert loaded[key] == value


@pytest.mark.parametrize(
  "content",
  [b"", b"images and labels", b"\x80\x02}q\x00(", tfds_builders.encode_png(_IMAGES[0])],
  ids=["empty", "text", "truncated_pickle", "png"],
)
def test_non_pickle_file_is_a_data_error_naming_it(tmp_path, content):
  path = tmp_path / "train.pkl"
  path.write_bytes(content)
  with open(path, "rb") as f, pytest.raises(DataError, match=re.escape(str(path))):
    safe_pickle.load(f, str(path))


def test_pickle_cut_inside_an_array_is_a_data_error_naming_it(tmp_path):
  data = pickle.dumps({"data": np.zeros((4, 84, 84, 3), np.uint8), "fine_labels": [0] * 4})
  path = tmp_path / "train.pkl"
  path.write_bytes(data[: len(data) // 2])
  with open(path, "rb") as f, pytest.raises(DataError) as error:
    safe_pickle.load(f, str(path))
  assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_non_pickle_file_is_reported_as_unreadable_not_as_crafted(tmp_path):
  path = tmp_path / "train.pkl"
  path.write_bytes(tfds_builders.encode_png(_IMAGES[0]))
  with open(path, "rb") as f, pytest.raises(DataError, match="not a readable pickle"):
    safe_pickle.load(f, str(path))


# ---------------------------------------------------------------------------------------
# Bad sources give one clear line.


def test_missing_source_is_one_line(tmp_path):
  missing = tmp_path / "no_such_folder"
  result = _run_prepare("miniimagenet", "--source", str(missing), "--data_dir", str(tmp_path))
  _assert_one_line_error(result, str(missing))


def test_folder_without_a_known_layout_is_one_line(tmp_path):
  source = tmp_path / "source"
  (source / "images").mkdir(parents=True)
  (source / "train.pkl").write_bytes(b"no test.pkl beside it")
  data_dir = tmp_path / "data_dir"
  result = _run_prepare("miniimagenet", "--source", str(source), "--data_dir", str(data_dir))
  _assert_one_line_error(result, str(source), "no MiniImageNet found")
  _assert_nothing_prepared(data_dir)


def test_class_folder_image_of_the_wrong_size_is_named(tmp_path):
  source = tmp_path / "source"
  wrong_size = source / "train" / "n00000042" / "small.jpg"
  for split in ("train", "val"):
    for index in range(NUM_CLASSES):
      folder = source / split / f"n{index:08d}"
      folder.mkdir(parents=True)
      Image.new("RGB", MINIIMAGENET_SHAPE[:2], (index, 0, 0)).save(folder / "image.jpg")
  wrong_size.parent.joinpath("image.jpg").unlink()
  Image.new("RGB", (40, 40)).save(wrong_size)
  data_dir = tmp_path / "data_dir"
  result = _run_prepare("miniimagenet", "--source", str(source), "--data_dir", str(data_dir))
  _assert_one_line_error(result, str(wrong_size), "84")
  _assert_nothing_prepared(data_dir)

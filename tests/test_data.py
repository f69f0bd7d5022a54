"""Task splits, validation hold-out, normalisation, resizing, digits and synthetic data."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

from mark_jax import models
from mark_jax.data import datasets, facts
from mark_jax.data import tasks as tasks_lib
from mark_jax.runtime import errors


def _dataset(num_classes=20, per_class=10):
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256  # makes examples distinguishable
  images[:, 0, 0, 1] = np.arange(len(labels)) // 256
  return tasks_lib.Split(images, labels)


def _split(seed, validation_fraction=0.2, num_classes=20, train_per_class=10):
  return tasks_lib.split_into_tasks(
    _dataset(num_classes, per_class=train_per_class),
    _dataset(num_classes, per_class=4),
    num_classes=num_classes,
    classes_per_task=5,
    validation_fraction=validation_fraction,
    seed=seed,
  )


def test_tasks_partition_the_classes():
  tasks = _split(seed=48)
  classes = [c for task in tasks for c in task.classes]
  assert sorted(classes) == list(range(20))
  assert len(tasks) == 4 and all(len(task.classes) == 5 for task in tasks)


def test_class_order_is_the_authors_permutation():
  np.random.seed(48)
  expected = np.random.permutation(100)
  np.testing.assert_array_equal(tasks_lib.class_order(100, 48), expected)


def test_split_depends_on_seed_only():
  same = [t.classes for t in _split(seed=48)]
  assert same == [t.classes for t in _split(seed=48)]
  assert same != [t.classes for t in _split(seed=49)]


def test_labels_are_remapped_within_each_task():
  for task in _split(seed=48):
    for split in (task.train, task.validation, task.test):
      assert set(np.unique(split.labels)) <= set(range(5))
    assert set(np.unique(task.test.labels)) == set(range(5))


def test_validation_is_disjoint_from_train():
  for task in _split(seed=48):
    key = lambda s: {tuple(img[0, 0, :2]) for img in s.images}  # noqa: E731
    assert not key(task.train) & key(task.validation)
    assert len(task.validation) == int(0.2 * 50) and len(task.train) == 40


def test_classes_per_task_must_divide():
  with pytest.raises(ValueError, match="does not divide"):
    tasks_lib.split_into_tasks(
      _dataset(), _dataset(), num_classes=20, classes_per_task=3, validation_fraction=0, seed=0
    )


def test_normalisation_uses_the_spec_constants():
  pixel = jnp.full((1, 1, 1, 3), 255, jnp.uint8)
  expected = [(1.0 - m) / s for m, s in zip(facts.CIFAR_MEAN, facts.CIFAR_STD, strict=True)]
  np.testing.assert_allclose(
    models.normalize(pixel, facts.CIFAR_MEAN, facts.CIFAR_STD)[0, 0, 0], expected, rtol=1e-6
  )
  assert facts.CIFAR_MEAN == (125.3 / 255, 123.0 / 255, 113.9 / 255)
  assert facts.CIFAR_STD == (63.0 / 255, 62.1 / 255, 66.7 / 255)


def test_synthetic_is_seeded_and_class_conditional():
  kwargs = dict(num_classes=4, train_per_class=30, test_per_class=5, image_size=32)
  train, test = datasets.synthetic_splits(seed=1, **kwargs)
  again, _ = datasets.synthetic_splits(seed=1, **kwargs)
  other, _ = datasets.synthetic_splits(seed=2, **kwargs)
  np.testing.assert_array_equal(train.images, again.images)
  assert not np.array_equal(train.images, other.images)
  assert train.images.shape == (120, 32, 32, 3) and train.images.dtype == np.uint8
  assert test.images.shape == (20, 32, 32, 3)
  # Nearest class mean classifies held-out images far above chance (25%).
  means = np.stack([train.images[train.labels == c].mean(0) for c in range(4)])
  distances = ((test.images[:, None].astype(float) - means[None]) ** 2).sum((2, 3, 4))
  assert np.mean(distances.argmin(1) == test.labels) > 0.8


def test_stack_splits_pads_with_zero_weight():
  a = tasks_lib.Split(np.ones((3, 2, 2, 3), np.uint8), np.array([1, 2, 3], np.int32))
  b = tasks_lib.Split(np.ones((5, 2, 2, 3), np.uint8), np.arange(5, dtype=np.int32))
  stacked = tasks_lib.stack_splits([a, b], multiple=4)
  assert stacked["image"].shape == (2, 8, 2, 2, 3)
  np.testing.assert_array_equal(stacked["weight"].sum(1), [3, 5])
  np.testing.assert_array_equal(stacked["label"][0, :3], [1, 2, 3])


def test_unknown_dataset_is_a_clear_error():
  from configs import smoke

  config = smoke.get_config()
  config.dataset = "imagenet21k"
  with pytest.raises(errors.DataError, match="unknown dataset 'imagenet21k'"):
    datasets.load_benchmark(config)


def test_missing_tfds_dataset_says_how_to_get_it(tmp_path):
  from configs import cifar100

  config = cifar100.get_config()
  config.data_dir = str(tmp_path)
  config.download = False
  with pytest.raises(errors.DataError, match="not available") as error:
    datasets.load_benchmark(config)
  assert "--config.data_dir" in str(error.value)


def _index(images):
  """The example index that `_dataset` wrote into each image's first pixel."""
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def test_hundred_classes_make_twenty_disjoint_tasks_of_five_in_the_seeded_order():
  tasks = _split(num_classes=100, validation_fraction=0.15, seed=48)
  classes = [c for task in tasks for c in task.classes]
  assert len(tasks) == 20 and all(len(task.classes) == 5 for task in tasks)
  assert sorted(classes) == list(range(100))
  assert classes == list(tasks_lib.class_order(100, 48))
  again = _split(num_classes=100, validation_fraction=0.15, seed=48)
  assert [t.classes for t in again] == [t.classes for t in tasks]
  for task, same in zip(tasks, again, strict=True):
    np.testing.assert_array_equal(same.train.images, task.train.images)
    np.testing.assert_array_equal(same.validation.images, task.validation.images)
  assert [t.classes for t in _split(num_classes=100, validation_fraction=0.15, seed=49)] != [
    t.classes for t in tasks
  ]


def test_train_and_validation_partition_each_task_training_examples():
  validation_fraction = 0.15
  full_train, full_test = _dataset(num_classes=100, per_class=10), _dataset(100, 4)
  for task in _split(num_classes=100, seed=51, validation_fraction=validation_fraction):
    classes = np.asarray(task.classes)
    train_index, valid_index = _index(task.train.images), _index(task.validation.images)
    own_examples = np.flatnonzero(np.isin(full_train.labels, classes))
    assert not set(train_index) & set(valid_index)
    assert sorted([*train_index, *valid_index]) == own_examples.tolist()
    assert len(valid_index) == int(validation_fraction * len(own_examples)) > 0
    for split, index in ((task.train, train_index), (task.validation, valid_index)):
      np.testing.assert_array_equal(classes[split.labels], full_train.labels[index])
    test_index = _index(task.test.images)
    assert sorted(test_index) == np.flatnonzero(np.isin(full_test.labels, classes)).tolist()
    np.testing.assert_array_equal(classes[task.test.labels], full_test.labels[test_index])


def test_normalisation_constants_are_the_spec_values():
  np.testing.assert_allclose(facts.CIFAR_MEAN, np.array([125.3, 123.0, 113.9]) / 255, rtol=1e-12)
  np.testing.assert_allclose(facts.CIFAR_STD, np.array([63.0, 62.1, 66.7]) / 255, rtol=1e-12)
  np.testing.assert_allclose(facts.IMAGENET_MEAN, [0.485, 0.456, 0.406], rtol=1e-12)
  np.testing.assert_allclose(facts.IMAGENET_STD, [0.229, 0.224, 0.225], rtol=1e-12)


@pytest.mark.parametrize(
  "mean, std",
  [(facts.CIFAR_MEAN, facts.CIFAR_STD), (facts.IMAGENET_MEAN, facts.IMAGENET_STD)],
  ids=["cifar", "imagenet"],
)
def test_normalize_maps_the_mean_to_zero_and_one_std_to_one(mean, std):
  mean, std = np.asarray(mean), np.asarray(std)
  pixels = 255 * np.stack([mean, mean + std, mean - 2 * std])[:, None, None, :]
  normalized = models.normalize(jnp.asarray(pixels, jnp.float32), mean, std)
  np.testing.assert_allclose(normalized[:, 0, 0], [[0] * 3, [1] * 3, [-2] * 3], atol=1e-5)


def test_resize_gives_the_requested_shape_and_dtype():
  images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype(np.uint8)
  split = tasks_lib.Split(images, np.arange(4, dtype=np.int32))
  for size in (16, 84):
    resized = datasets.resize(split, size)
    assert resized.images.shape == (4, size, size, 3) and resized.images.dtype == np.uint8
    np.testing.assert_array_equal(resized.labels, split.labels)
  np.testing.assert_array_equal(datasets.resize(split, 32).images, images)
  flat = tasks_lib.Split(np.full((1, 32, 32, 3), (10, 120, 250), np.uint8), np.zeros(1, np.int32))
  np.testing.assert_array_equal(
    datasets.resize(flat, 16).images, np.full((1, 16, 16, 3), (10, 120, 250))
  )


@pytest.fixture(scope="module")
def digits_splits():
  return datasets.digits_splits()


def _nearest_class_mean(train, images):
  """Predicted classes of grey images: the class whose mean training image is closest."""
  grey = lambda x: x[..., 0].astype(np.float32)
  means = np.stack([grey(train.images[train.labels == c]).mean(0) for c in range(10)])
  distances = ((grey(images)[:, None] - means[None]) ** 2).sum((2, 3))
  return distances.argmin(1)


def test_resized_digits_keep_their_class(digits_splits):
  """Test digits shrunk 32->16 and enlarged back are classified (by the nearest class mean
  of the untouched training images) about as well as the untouched test digits."""
  train, test = digits_splits
  round_trip = datasets.resize(datasets.resize(test, 16), 32)
  accuracy = np.mean(_nearest_class_mean(train, test.images) == test.labels)
  round_trip_accuracy = np.mean(_nearest_class_mean(train, round_trip.images) == test.labels)
  assert accuracy > 0.8
  assert round_trip_accuracy > accuracy - 0.03


def test_digits_splits_partition_the_scikit_learn_digits(digits_splits):
  from sklearn.datasets import load_digits

  digits = load_digits()
  train, test = digits_splits
  for split in (train, test):
    assert split.images.shape[1:] == (32, 32, 3) and split.images.dtype == np.uint8
    assert (split.images == split.images[..., :1]).all()  # grey: three equal channels
    pixels = split.images[:, ::4, ::4, 0]
    np.testing.assert_array_equal(split.images[..., 0], pixels.repeat(4, 1).repeat(4, 2))
  assert set(np.unique(train.labels)) == set(np.unique(test.labels)) == set(range(10))

  def examples(labels, images_8x8):
    return collections.Counter(zip(labels.tolist(), (x.tobytes() for x in images_8x8), strict=True))

  original = np.round(digits.images * 255 / 16).astype(np.uint8)
  train_examples = examples(train.labels, train.images[:, ::4, ::4, 0])
  test_examples = examples(test.labels, test.images[:, ::4, ::4, 0])
  assert not train_examples & test_examples
  assert train_examples + test_examples == examples(digits.target, original)
  assert np.bincount(train.labels).tolist() == [facts.FACTS["digits"].train_per_class] * 10

"""Task splits, validation hold-out, normalisation and the synthetic dataset."""

import jax.numpy as jnp
import numpy as np
import pytest

from mark_jax import data, errors


def _dataset(num_classes=20, per_class=10):
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  images = np.zeros((len(labels), 4, 4, 3), np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256  # makes examples distinguishable
  images[:, 0, 0, 1] = np.arange(len(labels)) // 256
  return data.Split(images, labels)


def _split(seed, validation_fraction=0.2):
  return data.split_into_tasks(
    _dataset(),
    _dataset(per_class=4),
    num_classes=20,
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
  np.testing.assert_array_equal(data.class_order(100, 48), expected)


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
    data.split_into_tasks(
      _dataset(), _dataset(), num_classes=20, classes_per_task=3, validation_fraction=0, seed=0
    )


def test_normalisation_uses_the_spec_constants():
  pixel = jnp.full((1, 1, 1, 3), 255, jnp.uint8)
  expected = [(1.0 - m) / s for m, s in zip(data.CIFAR_MEAN, data.CIFAR_STD, strict=True)]
  np.testing.assert_allclose(
    data.normalize(pixel, data.CIFAR_MEAN, data.CIFAR_STD)[0, 0, 0], expected, rtol=1e-6
  )
  assert data.CIFAR_MEAN == (125.3 / 255, 123.0 / 255, 113.9 / 255)
  assert data.CIFAR_STD == (63.0 / 255, 62.1 / 255, 66.7 / 255)


def test_synthetic_is_seeded_and_class_conditional():
  kwargs = dict(num_classes=4, train_per_class=30, test_per_class=5, image_size=32)
  train, test = data.synthetic_splits(seed=1, **kwargs)
  again, _ = data.synthetic_splits(seed=1, **kwargs)
  other, _ = data.synthetic_splits(seed=2, **kwargs)
  np.testing.assert_array_equal(train.images, again.images)
  assert not np.array_equal(train.images, other.images)
  assert train.images.shape == (120, 32, 32, 3) and train.images.dtype == np.uint8
  assert test.images.shape == (20, 32, 32, 3)
  # Nearest class mean classifies held-out images far above chance (25%).
  means = np.stack([train.images[train.labels == c].mean(0) for c in range(4)])
  distances = ((test.images[:, None].astype(float) - means[None]) ** 2).sum((2, 3, 4))
  assert np.mean(distances.argmin(1) == test.labels) > 0.8


def test_stack_splits_pads_with_zero_weight():
  a = data.Split(np.ones((3, 2, 2, 3), np.uint8), np.array([1, 2, 3], np.int32))
  b = data.Split(np.ones((5, 2, 2, 3), np.uint8), np.arange(5, dtype=np.int32))
  stacked = data.stack_splits([a, b], multiple=4)
  assert stacked["image"].shape == (2, 8, 2, 2, 3)
  np.testing.assert_array_equal(stacked["weight"].sum(1), [3, 5])
  np.testing.assert_array_equal(stacked["label"][0, :3], [1, 2, 3])


def test_unknown_dataset_is_a_clear_error():
  from configs import smoke

  config = smoke.get_config()
  config.dataset = "imagenet21k"
  with pytest.raises(errors.DataError, match="unknown dataset 'imagenet21k'"):
    data.load_benchmark(config)


def test_missing_tfds_dataset_says_how_to_get_it(tmp_path):
  from configs import cifar100

  config = cifar100.get_config()
  config.data_dir = str(tmp_path)
  config.download = False
  with pytest.raises(errors.DataError, match="not available") as error:
    data.load_benchmark(config)
  assert "--config.data_dir" in str(error.value)

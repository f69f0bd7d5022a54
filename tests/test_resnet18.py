"""ResNet-18: equal to torchvision's in eval mode, its checkpoints refused when bad, its input.

torch and torchvision (the test extra) write the checkpoints and give the reference
features; mark_jax itself reads the checkpoints without them.
"""

import collections
import os
import pickle
import re
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from mark_jax import models, programs, resnet18, state, train
from mark_jax.data import datasets, facts
from mark_jax.runtime import checkpointing
from mark_jax.runtime.errors import ConfigError, DataError

import fake_imagenet
from tiny import epoch_losses, read_results, tiny_config
from torch_reference import import_torchvision

_features = jax.jit(resnet18.ResNet18().apply)
# One compiled program per image shape (op by op, XLA compiles every operation alone).
_preprocess = jax.jit(resnet18.preprocess, static_argnames="input_size")
_IMAGES = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_model():
  """A seeded random torchvision resnet18 in eval mode, with non-trivial batch norms."""
  torchvision = import_torchvision()
  import torch

  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.3, 0.3)
        module.running_mean.uniform_(-0.5, 0.5)
        module.running_var.uniform_(0.5, 2.0)
  return model


@pytest.fixture(scope="module")
def checkpoint(torch_model, tmp_path_factory):
  """`torch.save(model.state_dict(), path)` of `torch_model`."""
  import torch

  path = tmp_path_factory.mktemp("weights") / "r18.pth"
  torch.save(torch_model.state_dict(), path)
  return path


def test_features_equal_torchvision(torch_model, checkpoint):
  import torch

  ours = np.asarray(_features(resnet18.load_state_dict(checkpoint), _IMAGES))
  trunk = torch.nn.Sequential(*list(torch_model.children())[:-1])
  with torch.no_grad():
    theirs = trunk(torch.from_numpy(_IMAGES).permute(0, 3, 1, 2)).flatten(1).numpy()
  assert ours.shape == (2, resnet18.FEATURES)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_variables_are_flax_layout(checkpoint, torch_model):
  variables = resnet18.load_state_dict(checkpoint)
  state = torch_model.state_dict()
  kernel = variables["params"]["layer2_0"]["downsample_0"]["kernel"]
  np.testing.assert_array_equal(
    kernel, state["layer2.0.downsample.0.weight"].numpy().transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    variables["batch_stats"]["layer4_1"]["bn2"]["var"], state["layer4.1.bn2.running_var"].numpy()
  )


class _StorageRef:
  """Pickled as torch pickles a storage: a persistent id naming a record of the archive."""

  def __init__(self, key: str, numel: int):
    self.key, self.numel = key, numel


class _Tensor:
  """Pickled as torch pickles a float32 tensor, with any layout over `storage`."""

  def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    import torch

    return torch._utils._rebuild_tensor_v2, self.args


class _Command:
  """A pickle that would run a shell command when loaded with `pickle.load`."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _write_archive(path, content, storages: dict[str, np.ndarray]) -> None:
  """Writes `content` as torch.save would, storages as `r18/data/<key>` records."""
  import torch

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, _StorageRef):
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
      return None

  with zipfile.ZipFile(path, "w") as archive:
    with archive.open("r18/data.pkl", "w") as file:
      Pickler(file, protocol=2).dump(content)
    for key, array in storages.items():
      archive.writestr(f"r18/data/{key}", np.asarray(array, "<f4").tobytes())


def _state_dict_with(checkpoint, change):
  """The checkpoint's state_dict as torch tensors, changed in place by `change`."""
  import torch

  state = torch.load(checkpoint)
  change(state)
  return state


def _bad_file(kind: str, checkpoint, tmp_path):
  """Writes one kind of bad checkpoint; returns its path and a phrase its error must hold."""
  import torch

  path = tmp_path / f"{kind}.pth"
  if kind == "missing":
    return path, "no such file"
  if kind == "truncated":
    data = checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "not a zip archive"
  if kind == "list":
    torch.save([torch.zeros(3)], path)
    return path, "holds a list"
  if kind == "wrong_shape":
    state = _state_dict_with(
      checkpoint, lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 5, 5)})
    )
    torch.save(state, path)
    return path, "'conv1.weight' has shape (64, 3, 5, 5), where a ResNet-18 has (64, 3, 7, 7)"
  if kind == "missing_key":
    torch.save(_state_dict_with(checkpoint, lambda s: s.pop("layer4.1.bn2.running_var")), path)
    return path, "lacks the key(s) 'layer4.1.bn2.running_var'"
  if kind == "deeper_network":
    extra = {"layer1.2.conv1.weight": torch.zeros(64, 64, 3, 3)}
    torch.save(_state_dict_with(checkpoint, lambda s: s.update(extra)), path)
    return path, "'layer1.2.conv1.weight'"
  if kind == "overrun":
    storage = _StorageRef("0", 10)
    content = collections.OrderedDict(w=_Tensor(storage, 2, (4, 3), (3, 1)))
    _write_archive(path, content, {"0": np.zeros(10)})
    return path, "overruns its storage"
  if kind == "stride_zero":
    content = collections.OrderedDict(w=_Tensor(_StorageRef("0", 10), 0, (10**9,), (0,)))
    _write_archive(path, content, {"0": np.zeros(10)})
    return path, "more bytes than the file"
  if kind == "forbidden_global":
    _write_archive(path, _Command(f"touch {tmp_path / 'ran'}"), {})
    return path, f"refused to unpickle the global {os.system.__module__}.system"
  raise ValueError(kind)


@pytest.mark.parametrize(
  "kind",
  [
    "missing",
    "truncated",
    "list",
    "wrong_shape",
    "missing_key",
    "deeper_network",
    "overrun",
    "stride_zero",
    "forbidden_global",
  ],
)
def test_bad_file_is_one_data_error(kind, checkpoint, tmp_path):
  path, phrase = _bad_file(kind, checkpoint, tmp_path)
  with pytest.raises(DataError) as raised:
    resnet18.load_state_dict(path)
  message = str(raised.value)
  assert "\n" not in message
  assert str(path) in message and phrase in message
  assert facts.RESNET18_WEIGHTS_URL in message
  assert not (tmp_path / "ran").exists()


def test_random_variables_give_finite_features():
  variables = resnet18.random_variables(jax.random.key(0))  # any image size: here 64
  kernel = variables["params"]["layer3_0"]["conv1"]["kernel"]
  assert kernel.shape == (3, 3, 128, 256)
  assert abs(float(kernel.std()) - (2.0 / (3 * 3 * 256)) ** 0.5) < 2e-3
  assert float(variables["batch_stats"]["bn1"]["var"].min()) == 1.0
  features = np.asarray(_features(variables, _IMAGES))
  assert features.shape == (2, resnet18.FEATURES)
  assert np.isfinite(features).all()


@pytest.mark.parametrize("height, width", [(32, 32), (40, 56)])
def test_preprocess_shape_and_normalisation(height, width):
  mean_levels = np.round(255 * np.asarray(facts.IMAGENET_MEAN)).astype(np.uint8)
  images = np.broadcast_to(mean_levels, (2, height, width, 3))
  out = _preprocess(images, input_size=48)
  assert out.shape == (2, 48, 48, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 0.0, atol=0.01)
  black = _preprocess(np.zeros_like(images), input_size=48)
  expected = -np.asarray(facts.IMAGENET_MEAN) / np.asarray(facts.IMAGENET_STD)
  np.testing.assert_allclose(black, np.broadcast_to(expected, black.shape), rtol=1e-6)


def test_preprocess_at_size_zero_only_standardises():
  images = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  out = np.asarray(_preprocess(images, input_size=0))
  expected = (images / 255.0 - np.asarray(facts.IMAGENET_MEAN)) / np.asarray(facts.IMAGENET_STD)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_preprocess_keeps_the_centre():
  images = np.zeros((1, 64, 96, 3), np.uint8)
  images[:, :, 48:] = 255  # left half black, right half white
  out = np.asarray(_preprocess(images, input_size=56))
  # Shorter side 64 -> 64, longer 96 -> 96; the 56-wide centre crop starts at column 20.
  assert (out[0, :, :27, 0] < 0).all() and (out[0, :, 29:, 0] > 0).all()


# ---------------------------------------------------------------------------------------
# Runs with a frozen ResNet-18 as F (--config.feature_extractor=resnet18).

_RUN_INPUT_SIZE = 32  # the tests' crop: ResNet-18's default 224 would take minutes here
_IMAGE_SIZE = tiny_config().image_size


def _resnet18_config(**overrides):
  return tiny_config(feature_extractor="resnet18", resnet18_input_size=_RUN_INPUT_SIZE, **overrides)


@pytest.fixture(scope="module")
def resnet18_runs(checkpoint, tmp_path_factory) -> dict[str, Path]:
  """Workdirs of tiny_config() with a ResNet-18 F: read from `checkpoint` on synthetic data,
  and random (no file) on a prepared fake ImageNet of the same sizes, as configs/imagenet.py
  (at 16x16: its own networks at 114x114 take minutes here). Their programs are the same:
  the features are data."""
  workdirs = {name: tmp_path_factory.mktemp(name) for name in ("from_file", "random")}
  train.train_and_evaluate(
    _resnet18_config(resnet18_weights=str(checkpoint)), str(workdirs["from_file"])
  )
  with fake_imagenet.patched_facts():
    _, data_dir = fake_imagenet.prepared(tmp_path_factory)
    imagenet = dict(dataset="imagenet", data_dir=str(data_dir))
    config = _resnet18_config(resnet18_pretrained=False, **imagenet)
    train.train_and_evaluate(config, str(workdirs["random"]))
  return workdirs


@pytest.mark.parametrize("name", ["from_file", "random"])
def test_a_resnet18_run_finishes_without_feature_phases_and_its_masks_train(resnet18_runs, name):
  workdir = resnet18_runs[name]
  results = read_results(workdir)
  assert results["tasks_completed"] == 3 and np.isfinite(results["acc"])
  matrix = np.array(results["accuracy_matrix"], dtype=float)
  assert np.isfinite(matrix[np.tril_indices(3)]).all()
  assert epoch_losses(workdir, "feature_extractor") == []  # F is frozen: no phase of its own
  masks = epoch_losses(workdir, "masks")  # 5 epochs per task
  firsts, lasts = masks[::5], masks[4::5]
  assert np.mean(lasts) < np.mean(firsts), masks
  config = _resnet18_config()  # shapes only: abstract_state would load data and weights
  nets = models.Networks(config, _IMAGE_SIZE, config.classes_per_task)
  mesh = programs.make_mesh(config)
  abstract = state.abstract(nets, config.seed, results["tasks_completed"], mesh)
  mngr = checkpointing.manager(workdir / "checkpoints")
  run_state, _, _ = checkpointing.restore(mngr, results["tasks_completed"] - 1, abstract)
  assert set(run_state["tasks"]) == {"mask_generator", "head"}


def test_features_are_computed_once_and_equal_resnet18_on_the_images(checkpoint):
  """with_features attaches each split's features, computed in batches of eval_batch_size
  (the last one padded): each equal to ResNet-18 on a full batch of the split's images."""
  config = _resnet18_config(resnet18_weights=str(checkpoint))
  task = datasets.load_benchmark(config).tasks[1]
  variables = resnet18.load_state_dict(checkpoint)
  batch = config.eval_batch_size
  assert len(task.train) % batch and not len(task.test) % batch
  for split in (task.train, task.test):  # a padded last batch, and none
    assert split.features.shape == (len(split), resnet18.FEATURES)
    for start in sorted({*range(0, len(split) - batch + 1, batch), len(split) - batch}):
      window = slice(start, start + batch)
      direct = resnet18.split_features(variables, split.images[window], _RUN_INPUT_SIZE, batch)
      np.testing.assert_allclose(split.features[window], direct, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
  "overrides, phrase",
  [
    (dict(), "--config.resnet18_weights='': give the path of torchvision's ImageNet"),
    (
      dict(resnet18_pretrained=False, shared_feature_extractor=True),
      "--config.feature_extractor='resnet18': one frozen ResNet-18 serves every task",
    ),
    (
      dict(resnet18_pretrained=False, use_feature_extractor=False, use_masks=False),
      "--config.feature_extractor='resnet18': requires --config.use_feature_extractor=True",
    ),
  ],
)
def test_resnet18_configs_without_a_meaning_are_refused(overrides, phrase, tmp_path):
  with pytest.raises(ConfigError, match=re.escape(phrase)):
    train.train_and_evaluate(_resnet18_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_bad_weights_file_stops_the_run_before_training(tmp_path):
  path = tmp_path / "resnet18-f37072fd.pth"
  path.write_bytes(b"<html>not found</html>")
  with pytest.raises(DataError) as raised:
    train.train_and_evaluate(_resnet18_config(resnet18_weights=str(path)), str(tmp_path / "run"))
  message = str(raised.value)
  assert str(path) in message and facts.RESNET18_WEIGHTS_URL in message and "\n" not in message
  assert not (tmp_path / "run" / "checkpoints").exists()

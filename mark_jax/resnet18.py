"""torchvision's ResNet-18 in inference mode, without `fc`, its ImageNet weights and input.

The authors' `resnet18: True` replaces every F^t by one frozen torchvision ResNet-18 whose
512 pooled features feed the mask generators; `resnet_pre_trained` chooses between the
ImageNet weights (`load_state_dict`) and a random initialisation (`random_variables`).

  variables = load_state_dict("resnet18-f37072fd.pth")
  features = ResNet18().apply(variables, preprocess(images_uint8))   # (batch, 512)

The network equals torchvision's `resnet18` after `eval()`: explicit PyTorch paddings,
batch norm with running statistics (eps 1e-5), global average pooling. Flax names mirror
torchvision's keys: `layer2_0/downsample_0/kernel` holds `layer2.0.downsample.0.weight`.

`load_state_dict` reads what `torch.save(model.state_dict(), path)` writes without
importing torch: a zip archive whose `<name>/data.pkl` pickles an OrderedDict of tensors,
each `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` over a storage
named by a persistent id `('storage', torch.<Type>Storage, key, location, numel)` whose
bytes are the archive's `<name>/data/<key>`. torch 1.6 to 2.x write tensors of these dtypes
alike; the legacy format of torch < 1.6 (not a zip archive) is refused.
"""

import collections
import dataclasses
import functools
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mark_jax.data.facts import IMAGENET_MEAN, IMAGENET_STD, RESNET18_WEIGHTS_URL
from mark_jax.runtime import compilation, logs
from mark_jax.runtime.errors import DataError

compilation.unroll_threefry_on_cpu()

FEATURES = 512
_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (channels, stride of the first block)

# kaiming_normal_(mode="fan_out", nonlinearity="relu"), as torchvision initialises convs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init)
_BatchNorm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 conv + bn, a 1x1 conv + bn shortcut when needed.

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the shortcut.
  """

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1))
    y = _Conv(self.features, (3, 3), self.strides, padding=pad, name="conv1")(x)
    y = nn.relu(_BatchNorm(name="bn1")(y))
    y = _Conv(self.features, (3, 3), 1, padding=pad, name="conv2")(y)
    y = _BatchNorm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = _Conv(self.features, (1, 1), self.strides, padding=0, name="downsample_0")(x)
      x = _BatchNorm(name="downsample_1")(x)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """torchvision's `resnet18` in eval mode without `fc`: NHWC images -> (batch, 512)."""

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = _Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), name="conv1")(images)
    x = nn.relu(_BatchNorm(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (features, strides) in enumerate(_STAGES, start=1):
      x = BasicBlock(features, strides, name=f"layer{stage}_0")(x)
      x = BasicBlock(features, 1, name=f"layer{stage}_1")(x)
    return x.mean(axis=(1, 2))


def random_variables(rng: jax.Array) -> dict:
  """A randomly initialised ResNet-18, as torchvision initialises one (no pretraining).

  Args:
    rng: a JAX PRNG key.

  Returns:
    Flax variables {'params', 'batch_stats'} (for images of any size): conv kernels
    kaiming-normal (fan_out, ReLU gain), batch-norm scale 1 and bias 0, running mean 0 and
    variance 1.
  """
  images = jnp.zeros((1, 32, 32, 3), jnp.float32)
  return jax.jit(ResNet18().init)(rng, images)


def preprocess(images: jax.Array, input_size: int = 224) -> jax.Array:
  """The authors' ResNet input: Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet).

  The shorter side is resized to input_size * 256 // 224 (the longer one in proportion,
  truncated, as torchvision does) by `jax.image.resize` ('linear', antialias=True: a
  triangle filter widened when shrinking), which equals torchvision's Resize of float
  tensors with antialias=True within 0.002 grey levels; the result is rounded to integers
  as PIL's uint8 output is, then centre-cropped, scaled to [0, 1] and standardised. Against
  torchvision's Resize of PIL images (the authors' path), 16-20% of the values differ by
  one grey level (PIL resizes in fixed point), none by more: measured on 32x32 images
  enlarged and on 375x500 ones shrunk.

  Args:
    images: (batch, height, width, 3) uint8 (or float in [0, 255]) images.
    input_size: side of the square crop; 0: the images as they are, only scaled and
      standardised (the authors' ImageNet, whose ResNet sees the KB's 114x114 input).

  Returns:
    float32 (batch, input_size, input_size, 3).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected (batch, height, width, 3) images, got shape {images.shape}")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  if not input_size:
    return (images / 255.0 - mean) / jnp.asarray(IMAGENET_STD, jnp.float32)
  batch, height, width, _ = images.shape
  short = input_size * 256 // 224
  if height <= width:
    size = (short, int(short * width / height))
  else:
    size = (int(short * height / width), short)
  resized = jax.image.resize(images, (batch, *size, 3), "linear", antialias=True)
  resized = jnp.clip(jnp.round(resized), 0.0, 255.0)
  top = int(round((size[0] - input_size) / 2.0))
  left = int(round((size[1] - input_size) / 2.0))
  crop = resized[:, top : top + input_size, left : left + input_size] / 255.0
  return (crop - mean) / jnp.asarray(IMAGENET_STD, jnp.float32)


class _Refused(Exception):
  """The checkpoint is not a torchvision ResNet-18 state_dict (message: why)."""


_STORAGE_DTYPES = {
  "FloatStorage": np.dtype(np.float32),
  "DoubleStorage": np.dtype(np.float64),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(jnp.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
}
_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.float16, jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What the unpickler hands out for `torch.<Type>Storage`: a dtype, not a class."""

  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """One storage's elements, read from the archive."""

  elements: np.ndarray


def _is_int(value: Any) -> bool:
  return type(value) is int


class _StateDictUnpickler(pickle.Unpickler):
  """Admits an OrderedDict of tensors and nothing else; reads storages from the archive.

  The tensors it builds may hold no more bytes than the file: a stride of 0, or many
  tensors over one storage, cannot make it ask for more memory than the file's size.
  """

  def __init__(self, archive: zipfile.ZipFile, prefix: str, byteorder: str, max_bytes: int):
    super().__init__(archive.open(prefix + "data.pkl"))
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: dict[str, _Storage] = {}
    self._bytes_left = max_bytes

  def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, *unused) -> np.ndarray:
    """torch's `_rebuild_tensor_v2`: a numpy copy of a strided view inside the storage."""
    del unused  # requires_grad, backward hooks, metadata
    if not isinstance(storage, _Storage):
      raise _Refused("a tensor is built over something other than a storage")
    layout_ok = isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
    values = (storage_offset, *size, *stride) if layout_ok else ()
    if not layout_ok or not all(_is_int(v) and v >= 0 for v in values):
      raise _Refused(f"a tensor has a malformed layout (offset {storage_offset!r}, size {size!r})")
    extent = 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if storage_offset + extent > storage.elements.size:
      raise _Refused(
        f"a tensor of size {size} at offset {storage_offset} overruns its storage of "
        f"{storage.elements.size} elements"
      )
    self._bytes_left -= math.prod(size) * storage.elements.itemsize
    if self._bytes_left < 0:
      raise _Refused("its tensors hold more bytes than the file")
    view = storage.elements[storage_offset:]
    strides = tuple(s * view.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(view, size, strides, writeable=False).copy()

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor_v2
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise _Refused(
      f"refused to unpickle the global {module}.{name} (a state_dict needs only "
      "collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch storage types)"
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise _Refused(f"its pickle refers to {pid!r}, not to a storage")
    _, storage_type, key, _, numel = pid
    if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and _is_int(numel)):
      raise _Refused(f"its pickle refers to a malformed storage {pid!r}")
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        data = self._archive.read(name)
      except KeyError:
        raise _Refused(f"it lacks the storage {name}") from None
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      if len(data) != numel * dtype.itemsize:
        raise _Refused(f"its storage {name} holds {len(data)} bytes, not {numel} elements")
      self._storages[key] = _Storage(np.frombuffer(data, dtype))
    return self._storages[key]


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
  """The tensors of a `torch.save`d state_dict, as numpy arrays; raises _Refused."""
  with zipfile.ZipFile(path) as archive:
    infos = archive.infolist()
    pickles = [info.filename for info in infos if info.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise _Refused(f"the archive holds {len(pickles)} '*/data.pkl' records, not one")
    # torch stores records uncompressed: together they cannot be larger than the file.
    size = path.stat().st_size
    if sum(info.file_size for info in infos) > size:
      raise _Refused("its records hold more bytes than the file (compressed?)")
    prefix = pickles[0].removesuffix("data.pkl")
    names = set(archive.namelist())
    order = archive.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
    if order not in (b"little", b"big"):
      raise _Refused(f"its byteorder record says {order[:20]!r}")
    byteorder = "<" if order == b"little" else ">"
    content = _StateDictUnpickler(archive, prefix, byteorder, size).load()
  if not isinstance(content, dict):
    raise _Refused(f"it holds a {type(content).__name__}, not a state_dict")
  for key, value in content.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise _Refused(f"its entry {key!r} holds {type(value).__name__}, not a tensor")
  return content


def _torch_key(path: tuple) -> str:
  """The torchvision key of a Flax variable: ('params', 'layer2_0', 'bn1', 'scale') ->
  'layer2.0.bn1.weight'."""
  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  leaf |= {"mean": "running_mean", "var": "running_var"}
  modules = [entry.key.replace("_", ".") for entry in path[1:-1]]
  return ".".join([*modules, leaf[path[-1].key]])


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  """A Flax variable's shape in torch's layout (conv kernels HWIO -> OIHW)."""
  return (shape[3], shape[2], shape[0], shape[1]) if path[-1].key == "kernel" else shape


def _listed(keys: list[str]) -> str:
  shown = ", ".join(repr(key) for key in keys[:3])
  return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _to_variables(tensors: dict[str, np.ndarray]) -> dict:
  """Flax variables from a torchvision ResNet-18 state_dict; raises _Refused."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  expected = jax.eval_shape(ResNet18().init, jax.random.key(0), images)
  wanted = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
  wanted = {k: v for k, v in wanted.items() if not k.endswith(".num_batches_tracked")}
  leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
  keys = [_torch_key(path) for path, _ in leaves]
  missing = [key for key in keys if key not in wanted]
  if missing:
    raise _Refused(f"it lacks the key(s) {_listed(missing)}")
  extra = [key for key in wanted if key not in keys]
  if extra:
    raise _Refused(f"it has key(s) a ResNet-18 lacks: {_listed(extra)} (another network?)")
  arrays = []
  for (path, leaf), key in zip(leaves, keys, strict=True):
    value, shape = wanted[key], _torch_shape(path, leaf.shape)
    if value.shape != shape:
      raise _Refused(f"its {key!r} has shape {value.shape}, where a ResNet-18 has {shape}")
    if value.dtype.newbyteorder("=") not in _FLOAT_DTYPES:
      raise _Refused(f"its {key!r} holds {value.dtype} values, not floats")
    value = value.astype(np.float32)
    if not np.isfinite(value).all():
      raise _Refused(f"its {key!r} holds non-finite values")
    if path[-1].key == "kernel":
      value = value.transpose(2, 3, 1, 0)
    arrays.append(jnp.asarray(value))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(expected), arrays)


def load_state_dict(path: str | Path) -> dict:
  """Flax variables for `ResNet18` from torchvision's checkpoint, without importing torch.

  Only the globals a state_dict needs are admitted (collections.OrderedDict,
  torch._utils._rebuild_tensor_v2, torch.<Type>Storage); each tensor is copied out of its
  storage's bytes after checking that it lies inside them. `fc.*` and
  `*.num_batches_tracked` are ignored.

  Args:
    path: a `torch.save(model.state_dict(), path)` of torchvision's resnet18, such as
      resnet18-f37072fd.pth.

  Returns:
    {'params': ..., 'batch_stats': ...} in float32, conv kernels HWIO.

  Raises:
    DataError: the file is missing, unreadable, not a zip archive, names a global outside
      the admitted ones, or is not a ResNet-18 state_dict (a key missing or extra, a shape
      or dtype wrong); one line naming the file, the problem and where the weights are.
  """
  path = Path(path)
  where = f"download torchvision's ImageNet ResNet-18 weights from {RESNET18_WEIGHTS_URL}"
  if not path.is_file():
    raise DataError(f"{path}: {'not a file' if path.exists() else 'no such file'}; {where}")
  try:
    return _to_variables(_read_tensors(path))
  except _Refused as error:
    problem = str(error)
  except zipfile.BadZipFile as error:
    problem = (
      f"not a zip archive as torch.save writes since torch 1.6 ({error}; truncated, or in "
      "the legacy format of the older resnet18-5c106cde.pth?)"
    )
  except Exception as error:  # a corrupt pickle or archive raises anything: one line each
    problem = f"unreadable ({type(error).__name__}: {error})"
  problem = " ".join(problem.split())
  problem = problem if len(problem) <= 300 else problem[:300] + "..."
  raise DataError(f"{path}: not a ResNet-18 state_dict: {problem}; {where}")


# The random ResNet-18 of a run with resnet18_pretrained=False: from the run's seed, on a
# stream of its own (the run state's keys start from PRNGKey(seed) itself).
_RANDOM_WEIGHTS_STREAM = 18


def frozen_variables(config) -> dict:
  """The ResNet-18 that `config` freezes as F: torchvision's ImageNet weights read from
  `config.resnet18_weights`, or, with `resnet18_pretrained=False`, a random initialisation
  drawn from `config.seed`. DataError for a bad weights file (load_state_dict)."""
  if config.resnet18_pretrained:
    return load_state_dict(Path(config.resnet18_weights).expanduser())
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _RANDOM_WEIGHTS_STREAM)
  return random_variables(key)


@functools.partial(jax.jit, static_argnums=2)
def _features(variables: dict, images: jax.Array, input_size: int) -> jax.Array:
  return ResNet18().apply(variables, preprocess(images, input_size))


def split_features(variables: dict, images: np.ndarray, input_size: int, batch: int) -> np.ndarray:
  """ResNet-18's (N, 512) features of uint8 `images`, `batch` at a time (the last batch
  padded, so that one compiled program serves every split)."""
  chunks = [np.zeros((0, FEATURES), np.float32)]
  for start in range(0, len(images), batch):
    chunk = images[start : start + batch]
    padded = np.zeros((batch, *images.shape[1:]), images.dtype)
    padded[: len(chunk)] = chunk
    chunks.append(np.asarray(_features(variables, padded, input_size))[: len(chunk)])
  return np.concatenate(chunks)


def with_features(tasks: list, config, interactive: bool | None = None) -> list:
  """`tasks` (TaskData) with the frozen ResNet-18's features of every split attached.

  F never changes, so its features are computed once here, and every phase, metalearning
  round and evaluation reads them instead of running ResNet-18 again.
  """
  variables = frozen_variables(config)
  size, batch = config.resnet18_input_size, config.eval_batch_size
  attached = []
  with logs.PhaseProgress("ResNet-18 features", len(tasks), "task", interactive) as bar:
    for task in tasks:
      splits = {
        name: dataclasses.replace(
          split, features=split_features(variables, split.images, size, batch)
        )
        for name, split in (
          ("train", task.train),
          ("validation", task.validation),
          ("test", task.test),
        )
      }
      attached.append(dataclasses.replace(task, **splits))
      bar.update({})
  return attached

"""What is known about each dataset before any of it is loaded: one table.

The config checks, the loaders, the TFDS builders and the benchmark all read these facts
from here. Only the standard library is imported.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetFacts:
  """One dataset's facts.

  Attributes:
    name: the dataset's config name.
    num_classes: classes in the dataset.
    train_per_class: training images per class (a guaranteed minimum).
    image_size: side of the square images its loader delivers.
    mean: per-channel normalisation mean on the [0, 1] scale; None: the training split's
      own pixel mean (grey images).
    std: likewise, the standard deviation.
  """

  name: str
  num_classes: int
  train_per_class: int
  image_size: int
  mean: tuple[float, float, float] | None
  std: tuple[float, float, float] | None


CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet ResNet-18 (its state_dict), the authors' pretrained F^t.
RESNET18_WEIGHTS_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

FACTS = {
  "cifar100": DatasetFacts("cifar100", 100, 500, 32, CIFAR_MEAN, CIFAR_STD),
  # 600 images of each class, the first 500 of them train (mark_jax.data.tfds_builders).
  "miniimagenet": DatasetFacts("miniimagenet", 100, 500, 84, IMAGENET_MEAN, IMAGENET_STD),
  # ILSVRC2012 as the authors load it: 1,000 class folders (at least 732 training images
  # each), every image resized to 128 on its shorter side and centre-cropped to 114.
  "imagenet": DatasetFacts("imagenet", 1000, 732, 114, IMAGENET_MEAN, IMAGENET_STD),
  # scikit-learn's 8x8 digits, enlarged to 32x32: at least 174 images of each class, a
  # seeded 120 of them train, the rest (about 32%) test.
  "digits": DatasetFacts("digits", 10, 120, 32, None, None),
}
"""The datasets whose facts are fixed; `synthetic` takes its facts from its config."""


def synthetic_facts(num_classes: int, train_per_class: int, image_size: int) -> DatasetFacts:
  """The facts of the generated dataset (mark_jax.data.datasets.synthetic_splits)."""
  return DatasetFacts("synthetic", num_classes, train_per_class, image_size, CIFAR_MEAN, CIFAR_STD)

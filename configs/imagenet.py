r"""MARK on ImageNet (ILSVRC2012) cut into 20 tasks of 50 classes, after the authors' code.

Prepare once from ILSVRC2012 class folders (train/<wnid>/, val/<wnid>/), then run:
  python -m mark_jax.data prepare imagenet --source PATH
  python launch.py --config configs/imagenet.py --workdir /tmp/mark_imagenet \
    --config.resnet18_weights=~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth

The authors' `imagenet` experiment resizes every image to 128 on its shorter side and
crops the centre 114x114; their F^t has no layer sizes for it, so it runs only with their
pretrained ResNet-18 as F, which sees the same 114x114 images. Their repository has no
config file for it: the task count and the learning rates here are those of their
MiniImageNet config. The prepared dataset is held in memory while a run trains (about
52 GB of uint8 pixels for the 1.33 million images).
"""

from configs import miniimagenet


def get_config():
  config = miniimagenet.get_config()
  config.dataset = "imagenet"
  config.classes_per_task = 50  # 20 tasks
  config.feature_extractor = "resnet18"
  config.resnet18_weights = "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth"
  config.resnet18_input_size = 0  # the 114x114 images as they are, as theirs
  return config

r"""MARK on 20-Split MiniImageNet with the authors' `resnet18` switch: one frozen ResNet-18
(torchvision's, ImageNet weights, without its `fc`) is F for every task; its 512 features
of each image, resized to 256 and centre-cropped to 224, feed the mask generators. No task
trains an F^t, and steps 3 and 5 learn at a tenth of learning_rate, as the authors' code.

Run, with the weights file torchvision downloads (resnet18-f37072fd.pth; torchvision keeps
it in the folder below, or fetch https://download.pytorch.org/models/resnet18-f37072fd.pth):
  python launch.py --config configs/miniimagenet_resnet18.py --workdir /tmp/mark_resnet18 \
    --config.resnet18_weights=~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth

Random weights (the authors' `resnet_pre_trained: False`): --config.resnet18_pretrained=False.
"""

from configs import miniimagenet


def get_config():
  config = miniimagenet.get_config()
  config.feature_extractor = "resnet18"
  config.resnet18_weights = "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth"
  return config

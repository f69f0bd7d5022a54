r"""MARK on 20-Split MiniImageNet (84x84) with the authors' hyperparameters.

Run:
  python launch.py --config configs/miniimagenet.py --workdir /tmp/mark_miniimagenet

Same protocol as configs/cifar100.py; MiniImageNet uses smaller learning rates, a wider
latent layer, thinner feature extractors and 2% validation (the authors' settings).
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.dataset = "miniimagenet"
  config.validation_fraction = 0.02
  config.feature_channels = (8, 8)
  config.latent_dim = 256
  config.learning_rate = 0.01  # lr_task
  config.inner_learning_rate = 0.001  # lr_meta
  config.meta_step_size = 0.0001  # lr_meta * 0.1
  return config

r"""MARK on real handwritten digits that ship with scikit-learn: the out-of-the-box run.

Run (about 85 s on a 2-core CPU, no download, no dataset to prepare):
  python launch.py --config configs/digits.py --workdir /tmp/mark_digits

scikit-learn's 1,797 8x8 digits, enlarged to 32x32, split into 5 tasks of 2 classes (a
seeded 120 digits of each class train, the other 54 to 63 test); the CIFAR-100 network and
optimisers with a short budget. The mask generator keeps the framework's (the authors')
initialisation: on these easy 2-class tasks, `--config.mask_bias_init=1.0` reached the
same test accuracies in our runs (ACC 0.9934 both).
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.dataset = "digits"
  config.classes_per_task = 2
  config.batch_size = 32
  config.eval_batch_size = 120
  config.epochs = 5
  config.meta_rounds = 1
  config.mini_tasks = 4
  config.inner_steps = 10
  return config

r"""A tiny MARK run on synthetic data: 3 tasks, 3 epochs per phase, one meta round.

Run (under 2 minutes on a 2-core CPU):
  python launch.py --config configs/smoke.py --workdir /tmp/mark_smoke

It exercises every phase of configs/cifar100.py at a fraction of the cost; the data are
generated from a seed (mark_jax.data.datasets.synthetic_splits), so no download is needed.
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.dataset = "synthetic"
  config.synthetic.num_classes = 15
  config.synthetic.train_per_class = 100
  config.synthetic.test_per_class = 20
  config.batch_size = 64
  config.eval_batch_size = 100
  config.epochs = 3
  config.meta_rounds = 1
  config.mini_tasks = 4
  config.inner_steps = 5
  return config

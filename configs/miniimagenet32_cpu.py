r"""Real MiniImageNet resized to 32x32, CIFAR-100 network and hyperparameters, short budget.

The CPU fidelity protocol of the results table (README, docs/results.md): 20 tasks of 5
classes, every training phase 5 epochs, one metalearning round of 5 mini-tasks x 20 inner
steps; everything else as configs/cifar100.py (15% validation).

Prepare the data once (README, "Real data"), then run:
  python launch.py --config configs/miniimagenet32_cpu.py --workdir /tmp/mi32 \
    --config.seed=48 --config.mask_bias_init=1.0
Ablations: --config.meta_rounds=0 (KB frozen after task 0), --config.use_metalearning=False.
"""

from configs import cifar100


def get_config():
  config = cifar100.get_config()
  config.dataset = "miniimagenet"
  config.image_size = 32
  config.epochs = 5
  config.meta_rounds = 1
  config.mini_tasks = 5
  config.inner_steps = 20
  return config

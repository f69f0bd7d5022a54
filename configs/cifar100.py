r"""MARK on 20-Split CIFAR-100 with the authors' hyperparameters (README, "Configs").

Run:
  python launch.py --config configs/cifar100.py --workdir /tmp/mark_cifar100

Overrides go on the command line, for example the authors' other seeds and the
paper's ablations:
  --config.seed=49
  --config.use_metalearning=False      # KB trained by plain SGD in step 4
  --config.meta_rounds=0               # KB frozen after task 0
  --config.use_masks=False             # all-ones masks
  --config.mask_bias_init=1.0          # mask generator starts near identity masks
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """The paper protocol: 20 tasks x 5 classes, 50 epochs per phase, 10 meta rounds."""
  config = ml_collections.ConfigDict()

  # Data.
  config.dataset = "cifar100"  # cifar100 | miniimagenet | digits | synthetic
  config.data_dir = ""  # TFDS data_dir; empty = TFDS's default (~/tensorflow_datasets)
  config.download = True  # let TFDS download and prepare a missing dataset (cifar100)
  config.image_size = 0  # resize images to this square size (0: the dataset's own)
  config.seed = 48  # authors' seeds: 48, 49, 51
  config.classes_per_task = 5
  config.validation_fraction = 0.15  # authors' pc_valid
  config.max_tasks = 0  # run only the first N tasks (0: all)
  config.passes = 1  # train the whole task sequence this many times (the authors' num_iter)
  config.synthetic = ml_collections.ConfigDict(
    dict(num_classes=100, train_per_class=500, test_per_class=100, image_size=32, seed=0)
  )

  # Networks (mark_jax/models.py).
  config.kb_channels = (64, 128, 256)
  config.feature_channels = (32, 32)
  config.latent_dim = 128
  config.dropout_rate = 0.5
  config.mask_activation = "relu"  # relu | sigmoid
  config.mask_bias_init = config_dict.placeholder(float)  # None: PyTorch's default init
  config.conv_impl = "auto"  # auto | native | patches | winograd (auto: winograd on CPU)
  # F^t's batch-norm statistics after its own phase (steps 3-5 and test):
  #   running: the running averages its phase left, F^t in inference mode afterwards
  #   recomputed: averaged over the task's training batches once F^t is trained (PreciseBN)
  #   batch: the authors' code: batch statistics while M^t, C^t and the KB train, running
  #     averages updated there and used at test
  config.feature_bn_statistics = "recomputed"
  # F: cnn (F^t above, one per task) | resnet18 (the authors' `resnet18`: one frozen
  # torchvision ResNet-18 serves every task, no F phase, masks at a tenth of learning_rate).
  config.feature_extractor = "cnn"
  config.resnet18_weights = ""  # torchvision's resnet18-f37072fd.pth (its state_dict)
  config.resnet18_pretrained = True  # False: random weights (the authors' resnet_pre_trained)
  config.resnet18_input_size = 224  # its crop after Resize (0: the images as they are)

  # Phases 1, 2, 3, 5 (and 4 without metalearning): SGD with momentum.
  config.batch_size = 128
  config.eval_batch_size = 128  # the authors' test batch; split over the devices like batch_size
  config.epochs = 50  # authors' feats_epochs, used by every SGD phase
  config.learning_rate = 0.1  # authors' lr_task
  config.momentum = 0.9
  config.weight_decay = 0.01
  config.feature_grad_clip = 0.5
  config.task_grad_clip = 0.0  # global gradient norm clip of steps 2, 3, 5 and 4 as SGD (0: off)
  config.pretrain_kb = True  # authors' pre_train_shared (task 0 only)

  # Phase 4: KB update by metalearning.
  config.use_metalearning = True  # False: plain SGD on KB + head (authors' use_meta)
  config.meta_rounds = 10  # authors' meta_epochs; 0 freezes the KB after task 0
  config.mini_tasks = 10  # K
  config.inner_steps = 40  # authors' inner_loop
  config.inner_learning_rate = 0.01  # authors' lr_meta
  config.inner_weight_decay = 0.1
  config.inner_grad_clip = 0.0  # global gradient norm clip of each inner step (0: off)
  config.inner_lr_plateau = False  # True: the authors' ReduceLROnPlateau on the inner loop
  config.meta_step_size = 0.001  # Reptile epsilon = lr_meta * 0.1
  config.meta_weight_decay = 0.1
  config.meta_sign = "paper"  # paper: towards the adapted copies | authors: away
  config.meta_accuracy_batch = "same"  # same (authors) | next: batch that scores acc_k
  # auto | vmap | map: each device adapts its share of the K mini-tasks at once (vmap) or
  # one after another (lax.map; the same numbers); auto: map on CPU, vmap elsewhere.
  config.mini_task_map = "auto"

  # Ablations (configs/ablations.py).
  config.use_masks = True  # False: all-ones masks
  config.use_feature_extractor = True  # False: KB only (needs use_masks=False)
  config.shared_feature_extractor = False  # True: F^0 serves every task
  # True (with shared_feature_extractor): F^0 is never trained, its random initialisation
  # serves every task, and steps 3 and 5 keep the full learning rate (the authors' random_f).
  config.random_feature_extractor = False
  # As the authors' code: steps 3 and 5 of a task without an F^t of its own (shared F^0
  # after task 0, KB only) learn at this fraction of learning_rate; KB only skips step 3.
  config.no_own_features_lr_factor = 0.1
  config.kb_only_skips_masks_step = True

  # Devices: the K mini-tasks and each batch are spread over all local devices (a mesh).
  config.distributed = False  # True on a multi-host TPU slice: jax.distributed.initialize()
  config.cpu_devices = 2  # XLA devices made of the host CPU when JAX runs on CPU (0: one)
  # --seeds / --sweep: train the runs as one program vmapped over them (None: by backend).
  config.runs_in_one_program = config_dict.placeholder(bool)

  # Checkpoints.
  config.restore_task = config_dict.placeholder(int)  # restart after this task
  config.restore_dir = ""  # workdir to restore restore_task from (default: --workdir)
  return config

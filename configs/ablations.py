r"""The paper's ablations of MARK on 20-Split CIFAR-100, each derived from configs/cifar100.py.

Run one ablation (here over the authors' three seeds):
  python launch.py --config configs/ablations.py:no_metalearning --workdir DIR --seeds=48,49,51

Ablations, as the authors' code expresses them (README, "Configs"):
  no_metalearning           step 4 trains KB + head by plain SGD (authors' use_meta: False)
  kb_frozen_after_task0     step 4 skipped: the KB keeps its task-0 pretraining (meta_epochs: 0)
  no_masks                  all-ones masks (use_mask: False)
  kb_only                   no F^t and no M^t: the KB and a head per task
  shared_feature_extractor  F^0 serves every task (use_one_representation)
  random_feature_extractor  F^0 at its random initialisation serves every task (random_f)
Any other key can still be overridden: --config.seed=49, --config.mask_bias_init=1.0, ...
"""

from configs import cifar100

ABLATIONS = {
  "no_metalearning": {"use_metalearning": False},
  "kb_frozen_after_task0": {"meta_rounds": 0},
  "no_masks": {"use_masks": False},
  "kb_only": {"use_feature_extractor": False, "use_masks": False},
  "shared_feature_extractor": {"shared_feature_extractor": True},
  "random_feature_extractor": {"shared_feature_extractor": True, "random_feature_extractor": True},
}


def get_config(ablation: str = ""):
  if ablation not in ABLATIONS:
    given = f"no ablation {ablation!r}" if ablation else "no ablation named"
    raise ValueError(
      f"{given}: name one after the file, e.g. configs/ablations.py:no_metalearning; "
      f"known: {', '.join(ABLATIONS)}"
    )
  config = cifar100.get_config()
  config.update(ABLATIONS[ablation])
  return config

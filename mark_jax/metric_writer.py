"""Every logged scalar to TensorBoard event files and to a JSON-lines file.

TensorBoard files are written by tensorboardX (no TensorFlow at training time) under
`workdir/tensorboard/`; `workdir/metrics.jsonl` gets one JSON object per record. Only the
writing process (process 0) writes; the others get a writer that drops everything.
"""

import json
import time

from etils import epath

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes records such as {'task': 3, 'phase': 'masks', 'epoch': 2, 'loss': 0.5}.

  Args:
    workdir: the run's directory, or None to write nothing.
  """

  def __init__(self, workdir: epath.Path | None):
    self.jsonl = self.tensorboard = None
    if workdir is None:
      return
    from tensorboardX import SummaryWriter  # Imported lazily: only writing runs need it.

    self.jsonl = (epath.Path(workdir) / METRICS_FILE).open("a")
    self.tensorboard = SummaryWriter(str(epath.Path(workdir) / TENSORBOARD_DIR))

  def write(self, tag: str, step: int, scalars: dict[str, float], **context) -> None:
    """Writes `scalars` as TensorBoard scalars `tag/name` at `step`, and one JSON line.

    Args:
      tag: TensorBoard prefix, e.g. 'task_03/masks'.
      step: the TensorBoard step (epoch, round or task index).
      scalars: name -> value.
      **context: extra JSON fields (task, phase, epoch, ...).
    """
    if self.jsonl is None:
      return
    for name, value in scalars.items():
      self.tensorboard.add_scalar(f"{tag}/{name}", value, step)
    record = {"time": time.time(), **context, **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()
    self.tensorboard.flush()

  def close(self) -> None:
    if self.jsonl is not None:
      self.jsonl.close()
      self.tensorboard.close()

"""What a run tells its user: progress, quiet library logs, and every metric on file.

Progress is a tqdm bar per phase on a terminal, plain log lines elsewhere. Metrics go to
TensorBoard event files, written by tensorboardX (no TensorFlow at training time) under
`workdir/tensorboard/`, and to `workdir/metrics.jsonl`, one JSON object per record. Only
the writing process (process 0) writes; the others get a writer that drops everything.
"""

import functools
import json
import logging as std_logging
import os
import sys
import time

import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def quiet_logs(keep_own_info: bool = True) -> None:
  """Hides the INFO lines of libraries (orbax writes dozens per checkpoint).

  Warnings and errors always pass. Call after absl has parsed flags (inside `main`).

  Args:
    keep_own_info: keep the INFO lines of mark_jax and of the command's own script (such as
      launch.py), else only warnings.
  """
  main_script = os.path.realpath(sys.argv[0])

  @functools.cache
  def is_own(pathname: str) -> bool:  # a few source files log; resolve each path once
    path = os.path.realpath(pathname)
    return path.startswith(PACKAGE_DIR) or path == main_script

  def keep(record) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return keep_own_info and is_own(record.pathname)

  logging.get_absl_handler().addFilter(keep)


def label_process(index: int, count: int) -> None:
  """Prefixes every log line of process `index` > 0 of a multi-process run with its number."""
  if index == 0 or count < 2:
    return

  def label(record) -> bool:
    record.msg = f"[process {index} of {count}] {record.msg}"
    return True

  logging.get_absl_handler().addFilter(label)


class PhaseProgress:
  """Progress through the epochs (or rounds) of one phase.

  On a terminal, a bar showing the task and phase, the epoch, the last loss and accuracy
  and the ETA; otherwise (CI, files) one log line per epoch with the same facts.

  Args:
    label: e.g. 'task 3 masks'.
    total: number of epochs or rounds.
    unit: 'epoch' or 'round'.
    interactive: draw a bar (default: whether stderr is a terminal).
  """

  def __init__(self, label: str, total: int, unit: str = "epoch", interactive: bool | None = None):
    self.label, self.total, self.unit = label, total, unit
    self.done = 0
    self.start = time.perf_counter()
    interactive = sys.stderr.isatty() if interactive is None else interactive
    self.bar = (
      tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
      if interactive
      else None
    )

  def update(self, metrics: dict[str, float]) -> None:
    """Marks one more epoch (or round) done, with its metrics."""
    self.done += 1
    text = " ".join(f"{name} {value:.4f}" for name, value in metrics.items())
    if self.bar is not None:
      self.bar.update()
      self.bar.set_postfix_str(text)  # Redraws: an epoch is rare enough to show every one.
      return
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * (self.total - self.done)
    logging.info(
      "%s %s %d/%d: %s (%.1fs, ETA %.0fs)",
      self.label,
      self.unit,
      self.done,
      self.total,
      text,
      elapsed,
      eta,
    )

  def close(self) -> float:
    """Closes the bar; returns the phase's wall time in seconds."""
    if self.bar is not None:
      self.bar.close()
    return time.perf_counter() - self.start

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported lazily (only writing runs need it) and without
  torch: tensorboardX imports torch whenever it is installed, only to accept its tensors,
  and a run would wait for that whole import. A torch imported earlier stays as it is."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # its optional `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes records such as {'task': 3, 'phase': 'masks', 'epoch': 2, 'loss': 0.5}.

  Files are opened at the first record: a writer that records nothing leaves the workdir
  as it was.

  Args:
    workdir: the run's directory, or None to write nothing.
  """

  def __init__(self, workdir: epath.Path | None):
    self.workdir = None if workdir is None else epath.Path(workdir)
    self.jsonl = self.tensorboard = None

  def _open(self) -> None:
    self.jsonl = (self.workdir / METRICS_FILE).open("a")
    self.tensorboard = _summary_writer_class()(str(self.workdir / TENSORBOARD_DIR))

  def write(self, tag: str, step: int, scalars: dict[str, float], **context) -> None:
    """Writes `scalars` as TensorBoard scalars `tag/name` at `step`, and one JSON line.

    Args:
      tag: TensorBoard prefix, e.g. 'task_03/masks'.
      step: the TensorBoard step (epoch, round or task index).
      scalars: name -> value.
      **context: extra JSON fields (task, phase, epoch, ...).
    """
    if self.workdir is None:
      return
    if self.jsonl is None:
      self._open()
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


class RunsWriter:
  """The MetricWriters of runs on a leading run axis (mark_jax.runs): each run's writer gets
  that run's entry of every scalar; runs in `stopped` get nothing more.

  Args:
    writers: one MetricWriter per run.
    stopped: the indices of stopped runs, kept up to date by the caller (a set or the keys
      of a dict, such as mark.Run.diverged).
  """

  def __init__(self, writers: list[MetricWriter], stopped):
    self.writers, self.stopped = writers, stopped

  def write(self, tag: str, step: int, scalars: dict, **context) -> None:
    for r, writer in enumerate(self.writers):
      if r not in self.stopped:
        run_scalars = {name: np.asarray(value)[r] for name, value in scalars.items()}
        writer.write(tag, step, run_scalars, **context)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()

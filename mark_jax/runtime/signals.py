"""Stopping a run cleanly on SIGINT or SIGTERM.

The first signal only sets a flag; the training loop calls `check` between steps (epochs,
metalearning rounds, tasks) and stops there with `Interrupted`, whose message says where
the run will resume. A second signal stops at once, as the default handlers would.
"""

import signal
import threading

from mark_jax.runtime.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
  """A context manager that turns SIGINT/SIGTERM into a stop request.

  Outside the main thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self):
    self.signal_number = None
    self.previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = {s: signal.signal(s, self._request) for s in SIGNALS}
    return self

  def __exit__(self, *exc_info):
    for number, handler in self.previous.items():
      signal.signal(number, handler)
    self.previous = {}

  def _request(self, number, frame):
    if self.signal_number is not None:  # The second signal: stop now.
      signal.signal(number, self.previous.get(number, signal.SIG_DFL))
      signal.raise_signal(number)
      return
    self.signal_number = number

  def check(self, where: str, resume_hint: str) -> None:
    """Raises Interrupted if a signal arrived.

    Args:
      where: what the run was doing, e.g. 'task 3 masks epoch 2'.
      resume_hint: where a relaunch resumes, e.g. 'after task 2'.
    """
    if self.signal_number is not None:
      name = signal.Signals(self.signal_number).name
      raise Interrupted(
        f"stopped by {name} during {where}; finished tasks are saved: relaunch the same "
        f"command to resume {resume_hint}",
        self.signal_number,
      )

"""Errors a user can act on. launch.py prints their message instead of a traceback."""


class UserError(Exception):
  """Base class: the message says what is wrong and what to do.

  Attributes:
    exit_code: the process's exit status when this error ends a run.
  """

  exit_code = 1


class ConfigError(UserError):
  """The config asks for something impossible."""

  exit_code = 2


class DataError(UserError):
  """A dataset is missing or unusable."""


class CheckpointError(UserError):
  """A requested checkpoint does not exist or cannot be used."""


class WorkdirError(UserError):
  """The workdir cannot hold the run (unwritable, too little space, another config)."""


class TrainingError(UserError):
  """Training cannot go on (a non-finite loss or parameter)."""


class Interrupted(UserError):
  """SIGINT or SIGTERM stopped the run between two steps; finished tasks are saved."""

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.exit_code = 128 + signal_number

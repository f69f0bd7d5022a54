"""Errors a user can act on. launch.py prints their message in one line instead of a traceback."""


class UserError(Exception):
  """Base class: the message says what is wrong and what to do."""


class ConfigError(UserError):
  """The config asks for something impossible."""


class DataError(UserError):
  """A dataset is missing or unusable."""


class CheckpointError(UserError):
  """A requested checkpoint does not exist or cannot be used."""


class TrainingError(UserError):
  """Training cannot go on (a non-finite loss)."""

"""Errors a user can act on, and `run_or_exit`: every command prints them as one line."""

import re
import sys
import threading

from absl import app, flags, logging


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


def one_line(error: BaseException) -> str:
  """An error's message as one line: the last line of a quoted traceback, without its type."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  last = lines[-1] if lines else type(error).__name__
  name, colon, rest = last.partition(": ")
  return rest if colon and name.isidentifier() and name.endswith(("Error", "Exception")) else last


def _exit(message: str, status: int):
  print(message, file=sys.stderr)
  sys.exit(status)


def missing_key_message(error: AttributeError, argv: list[str]) -> str:
  """One line for an override of a key the config lacks, with ml_collections' suggestion.

  ml_collections raises AttributeError(KeyError("'key'\\nDid you mean \"keys\" instead of
  \"key\"?")); the line names the flag as given: `--config.epoch=3: the config has no key
  'epoch'; did you mean 'epochs'?`.
  """
  cause = error.args[0] if error.args else error
  text = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
  first, _, rest = str(text).partition("\n")
  key = first.strip("\"'")
  given = [
    arg
    for arg in argv
    if arg.startswith("--config.") and arg.split("=")[0].rsplit(".", 1)[-1] == key
  ]
  flag = given[0] if given else key
  suggestion = re.search(r'Did you mean "([^"]+)"', rest)
  hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
  return f"{flag}: the config has no key {key!r}{hint}"


def _named(exc_type, exc_value) -> str:
  """'Type: message' of an exception as hooks receive it (the value may be missing)."""
  return f"{exc_type.__name__}: {one_line(exc_value) if exc_value is not None else ''}"


def _log_ignored(unraisable) -> None:
  """One warning line for an exception Python can only ignore (raised in a finalizer, e.g.
  a library's background read left behind by an error the run handled), not a traceback."""
  where = getattr(unraisable.object, "__qualname__", None) or repr(unraisable.object)
  logging.warning("ignored %s in %s", _named(unraisable.exc_type, unraisable.exc_value), where)


def _log_thread_error(args) -> None:
  """One warning line for an exception that ended a background thread (a library's), not
  a traceback; the run itself goes on or fails as it would."""
  name = args.thread.name if args.thread is not None else "?"
  logging.warning("thread %s stopped with %s", name, _named(args.exc_type, args.exc_value))


def run_or_exit(main, config_flag=None) -> None:
  """absl's `app.run(main)`, with every mistake a user can make as one line on stderr.

  Flag errors (an unknown flag or config key, a value of the wrong type) and errors of the
  config file (missing, failing in get_config) exit with status 2, as does an
  `app.UsageError` raised by `main`; a UserError raised by `main` exits with its own
  `exit_code`.

  Args:
    main: the command's `main(argv)`.
    config_flag: the command's ml_collections config flag, loaded while parsing (the file
      is read lazily otherwise, so that its errors would surface as tracebacks later).
  """

  def parse(argv):
    try:
      remaining = flags.FLAGS(argv)
      if config_flag is not None:
        config_flag.value.keys()  # a config file that failed to load raises here
    except AttributeError as error:  # ml_collections: an override of a key the config lacks
      _exit(f"error: {missing_key_message(error, argv)}", 2)
    except Exception as error:  # absl, ml_collections and the config file raise their own.
      _exit(f"error: {one_line(error)}", 2)
    return remaining

  def guarded_main(argv):
    sys.unraisablehook = _log_ignored
    threading.excepthook = _log_thread_error
    try:
      main(argv)
    except app.UsageError as error:
      _exit(f"error: {error}", 2)
    except UserError as error:
      _exit(f"error: {error}", error.exit_code)

  app.run(guarded_main, flags_parser=parse)

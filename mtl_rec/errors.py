"""The project's own errors: problems with what a user gave us, told apart from bugs.

A user's mistake (a flag, a config value, a data file, a run or export directory) raises an `Error`, whose message
names the problem and the fix; the command-line tools print it as one line, `error: <message>`, and exit 1
(`reported`). Anything else that escapes them, a numpy or JAX ValueError included, is a bug and keeps its
traceback. Each class subclasses ValueError, so callers that caught ValueError still do.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator


class Error(ValueError):
  """A problem with the user's input; the message names it and the fix."""


class ConfigError(Error):
  """A bad config value, flag or combination of them."""


class DataError(Error):
  """A corrupt, partial or malformed data file or row; the message names the file and the fix."""


@contextlib.contextmanager
def reported() -> Iterator[None]:
  """For a command-line tool's main: an Error exits with `error: <message>` (status 1), no traceback."""
  try:
    yield
  except Error as e:
    sys.exit(f'error: {e}')


def _flag_message(e: BaseException) -> str | None:
  """`error: ...` for an exception raised while flags or a --config file load; None if it looks like a bug."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  own, cause = None, e
  while cause is not None:  # the config file's own error, when it raised one: the innermost (ml_collections wraps it)
    own = cause if isinstance(cause, Error) else own
    cause = cause.__cause__ or cause.__context__
  if own is not None:
    return f'error: {own}'
  if isinstance(e, flags.Error):
    return f'error: {e}\nPass --help to see the flags.'
  if isinstance(e, (KeyError, AttributeError)):  # an override's path through the config: no such field
    detail = e
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(message))
      detail = detail.args[0]
    return (f'error: a --config.<field> flag names no field of the config: {detail}\n'
            'Pass --help to see the flags; every config field is documented in mtl_rec/config.py.')
  if isinstance(e, OSError):  # ml_collections: 'Failed loading config file ...'
    return f'error: {e}\nPass --config=<an existing config file>, e.g. configs/movielens_100k.py.'
  return None


def define_config_file(name: str, default: str, help_string: str) -> Any:
  """ml_collections' DEFINE_config_file, whose `--<name>.<field>=...` overrides are read from sys.argv right here,
  at import: one naming no field of the config exits with `error: <message>`, not a traceback."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except Exception as e:  # pylint: disable=broad-except
    message = _flag_message(e)
    if message is None:
      raise
    sys.exit(message)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`, every --config file loaded here too: a bad
  flag or config file exits with `error: <message>` (status 1), no traceback. (absl reports its own flag errors, a
  wrong type, in one line, but a config file that does not load, or raises the project's ConfigError, surfaces from
  ml_collections with a traceback.)"""
  from absl import flags  # pylint: disable=g-import-not-at-top

  try:
    rest = flags.FLAGS(argv)
    for name in list(flags.FLAGS):
      flag = flags.FLAGS[name]
      if type(flag).__name__ == '_ConfigFlag':  # a file that failed to load is a placeholder raising on first use
        getattr(flag.value, 'keys', None)
    return rest
  except Exception as e:  # pylint: disable=broad-except
    message = _flag_message(e)
    if message is None:
      raise
    sys.exit(message)

"""The project's own errors: problems with what a user gave us, told apart from bugs.

A user's mistake (a flag, a config value, a data file, a run or export directory) raises an `Error`, whose message
names the problem and the fix; the command-line tools print it as one line, `error: <message>`, and exit 1
(`reported`). Anything else that escapes them, a numpy or JAX ValueError included, is a bug and keeps its
traceback. Each class subclasses ValueError, so callers that caught ValueError still do.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


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

"""Where data files come from: a directory or zip the user names, the cache, a download, or a package index.

`Bundle` reads named files out of a directory or a zip (one folder deep is fine); `download` fetches a zip with a
short connect timeout so an unreachable host fails fast; `pip_download` fetches a wheel (never installed) from the
package index, for machines that reach PyPI and nothing else; `first_of` tries sources in order.
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import tqdm

from mtl_rec.errors import DataError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0
PIP_TIMEOUT_S = 600.0


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The cache directory: `cache_dir` if given (non-empty), else `$MTL_REC_DATA`, else `~/.cache/mtl_rec`."""
  if cache_dir:
    return pathlib.Path(cache_dir).expanduser()
  env = os.environ.get('MTL_REC_DATA')
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / '.cache' / 'mtl_rec'


@dataclasses.dataclass(frozen=True)
class Bundle:
  """Named data files inside a directory or a zip (possibly one folder deep, e.g. `ml-100k/u.data`).

  `fix` is the sentence appended to every error about these files, telling the user how to repair them.
  """

  root: pathlib.Path
  fix: str

  def read(self, name: str) -> tuple[bytes, str]:
    """Returns the bytes of file `name` and a display name for error messages."""
    if self.root.is_dir():
      for candidate in [self.root / name, *sorted(self.root.glob(f'*/{name}'))]:
        if candidate.is_file():
          return candidate.read_bytes(), str(candidate)
      raise DataError(f'{self.root} has no file {name!r}. {self.fix}')
    try:
      with zipfile.ZipFile(self.root) as zf:
        members = [m for m in zf.namelist() if m == name or m.endswith('/' + name)]
        if not members:
          raise DataError(f'{self.root} has no member {name!r}. {self.fix}')
        # The shallowest match, so a stray copy deeper in the archive never wins over `ml-100k/u.data`.
        member = min(members, key=lambda m: (m.count('/'), m))
        # ZipFile.read checks the CRC, so a damaged or truncated archive fails here rather than parsing junk.
        return zf.read(member), f'{self.root}:{member}'
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError) as e:
      raise DataError(f'{self.root} is not a readable zip archive ({e}). {self.fix}') from e


def is_bundle(path: pathlib.Path) -> bool:
  return path.is_dir() or (path.is_file() and zipfile.is_zipfile(path))


def download(url: str, dest: pathlib.Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> bool:
  """Downloads `url` to `dest` (a zip) with a progress bar. Returns False (after logging why) on any failure.

  The bytes go to `<dest>.part` first and are renamed only once complete and a valid zip, so an interrupted
  download never looks like cached data.
  """
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + '.part')
  try:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
      length = resp.headers.get('Content-Length')
      total = int(length) if length and length.isdigit() else None
      with open(part, 'wb') as f, tqdm.tqdm(total=total, unit='B', unit_scale=True, desc=dest.name) as bar:
        while chunk := resp.read(1 << 16):
          f.write(chunk)
          bar.update(len(chunk))
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    part.unlink(missing_ok=True)
    log.warning('Could not download %s: %s', url, e)
    return False
  size = part.stat().st_size
  if total is not None and size != total:
    log.warning('Download of %s stopped after %d of %d bytes; ignoring it.', url, size, total)
    part.unlink(missing_ok=True)
    return False
  if not zipfile.is_zipfile(part):
    log.warning('%s did not serve a zip archive (%d bytes); ignoring it.', url, size)
    part.unlink(missing_ok=True)
    return False
  os.replace(part, dest)
  log.info('Downloaded %s to %s (%d bytes).', url, dest, size)
  return True




def find_wheel(directory: pathlib.Path, pattern: str) -> pathlib.Path | None:
  wheels = sorted(directory.glob(pattern)) if directory.is_dir() else []
  return wheels[0] if wheels else None


def pip_download(requirement: str, directory: pathlib.Path, pattern: str) -> pathlib.Path:
  """Fetches a wheel with pip (its progress bar goes to the terminal; nothing is installed) and returns its path."""
  directory.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', requirement, '-d',
         str(directory)]
  log.info('fetching %s from the package index: %s', requirement, ' '.join(cmd))
  try:
    # Output is not captured on purpose: pip's own progress bar is the progress report.
    proc = subprocess.run(cmd, timeout=PIP_TIMEOUT_S, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise DataError(f'`{" ".join(cmd)}` failed: {e}') from e
  wheel = find_wheel(directory, pattern)
  if proc.returncode != 0 or wheel is None:
    raise DataError(f'`{" ".join(cmd)}` exited with status {proc.returncode} (see its output above) and left no '
                    f'{pattern} in {directory}.')
  return wheel


def cache_fix(cache: pathlib.Path, what: pathlib.Path) -> str:
  return f'Delete {what} (in the cache dir {cache}) and re-run to fetch it again.'


def path_fix(path: pathlib.Path, url: str) -> str:
  return f'Fix or replace {path} (a fresh copy is at {url}).'


def first_of(attempts: list[Callable[[], Any]]) -> Any:
  """The first attempt's result that is not None; the last attempt raises rather than return None."""
  for attempt in attempts:
    data = attempt()
    if data is not None:
      return data
  raise AssertionError('unreachable: the last attempt raises')

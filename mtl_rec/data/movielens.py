"""MovieLens 100K and 1M loaders.

`load_100k` looks for the data in this order and uses the first that works:

  1. `path`: a GroupLens-format directory or .zip (`u.data`, `u.user`, `u.item`, possibly under `ml-100k/`).
  2. The cache dir (`cache_dir`, else `$MTL_REC_DATA`, else `~/.cache/mtl_rec`), if an earlier run left the
     GroupLens zip or the recbole wheel there.
  3. A download of the GroupLens zip into the cache (short connect timeout, so an unreachable host fails fast).
  4. `pip download` of the recbole wheel from the package index into the cache; recbole ships ML-100K as
     `dataset_example/ml-100k/ml-100k.{inter,user,item}`, which are read straight out of the wheel (never
     installed). This is for machines that can reach PyPI but not files.grouplens.org.

`load_1m` has steps 1-3 only (no package ships ML-1M), then fails with a message saying where to put the files.

Every file is checked while it is parsed: a wrong column count, a non-numeric id, a rating outside 1..5 or a
truncated file raises `DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from mtl_rec.data import fetch
from mtl_rec.data.types import ItemTable, RatingsData, UserTable
from mtl_rec.errors import DataError

log = logging.getLogger(__name__)

# GroupLens' genre columns, in u.item's order. ML-1M, the recbole copy and TFDS use (a subset of) the same
# names, and every loader maps onto this tuple so all sources give the same `genre_names`.
GENRES: tuple[str, ...] = (
    'unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime', 'Documentary', 'Drama',
    'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western',
)

ML_100K_URL = 'https://files.grouplens.org/datasets/movielens/ml-100k.zip'
ML_1M_URL = 'https://files.grouplens.org/datasets/movielens/ml-1m.zip'
RECBOLE_VERSION = '1.2.1'
_RECBOLE_DIR = 'recbole/dataset_example/ml-100k'

# (ratings, users, items) of the full datasets. ML-1M: 3,706 movies are rated, movies.dat lists 3,883.
ML_100K_COUNTS = (100_000, 943, 1_682)
ML_1M_COUNTS = (1_000_209, 6_040, 3_706)
ML_1M_MOVIES_IN_FILE = 3_883



# ----------------------------------------------------------------------------------------------------------
# Parsing helpers.


def _line_of_row(data: bytes, row: int, skip: int) -> int:
  """The 1-based line number of data row `row` (0-based, blank lines and `skip` header lines not counted)."""
  seen = -1
  for lineno, line in enumerate(data.split(b'\n'), start=1):
    if lineno > skip and line.strip():
      seen += 1
      if seen == row:
        return lineno
  return 0


def _first_bad_numeric_line(text: str, sep: str, ncols: int, skip: int) -> tuple[int, str]:
  """Slow path, only run after the fast parse failed: finds the first malformed line (1-based)."""
  for lineno, line in enumerate(text.split('\n'), start=1):
    if lineno <= skip:
      continue
    line = line.rstrip('\r')
    if not line.strip():
      continue
    fields = line.split(sep)
    if len(fields) != ncols:
      return lineno, f'{len(fields)} {sep!r}-separated fields, expected {ncols}: {line[:80]!r}'
    for col, field in enumerate(fields, start=1):
      try:
        float(field)
      except ValueError:
        return lineno, f'field {col} is not a number: {field[:40]!r}'
  return 0, ''


def _parse_numeric(data: bytes, *, sep: str, ncols: int, where: str, fix: str, skip: int = 0) -> np.ndarray:
  """Parses a file of `ncols` numeric columns into an int64 [n, ncols] array (numpy's C parser, no per-line
  Python objects; ~0.6 s for ML-1M's ratings). `skip` header lines are ignored."""
  try:
    text = data.decode('ascii')
  except UnicodeDecodeError as e:
    lineno = data[: e.start].count(b'\n') + 1
    raise DataError(f'{where}, line {lineno}: non-ASCII byte in a numeric file. {fix}') from e
  if '\r' in text:
    text = text.replace('\r', '')
  body = text.split('\n', skip)[-1] if skip else text
  # np.loadtxt only takes a 1-character delimiter; ML-1M's '::' is mapped onto a tab. A stray tab in the
  # original then just shows up as a column-count error, which is what it is.
  parse_sep = sep
  if len(sep) > 1:
    body = body.replace(sep, '\t')
    parse_sep = '\t'
  for dtype in (np.int64, np.float64):
    try:
      table = np.loadtxt(io.StringIO(body), delimiter=parse_sep, dtype=dtype, comments=None, ndmin=2)
    except ValueError:
      continue
    if table.shape[0] == 0:
      raise DataError(f'{where} is empty. {fix}')
    if table.shape[1] != ncols:
      raise DataError(f'{where}: expected {ncols} {sep!r}-separated columns, found {table.shape[1]}. {fix}')
    if dtype == np.float64:
      # Some exports write integers as '3.0'; anything with a real fraction is not an id or a timestamp.
      bad = ~np.isfinite(table).all(axis=1) | (table != np.round(table)).any(axis=1)
      if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f'{where}, line {_line_of_row(data, row, skip)}: non-integer value in '
                        f'{table[row].tolist()}. {fix}')
      table = table.astype(np.int64)
    return table
  lineno, why = _first_bad_numeric_line(text, sep, ncols, skip)
  raise DataError(f'{where}, line {lineno}: {why or "cannot be parsed"}. {fix}')


def _lines(data: bytes, where: str, fix: str, encoding: str, skip: int = 0) -> list[tuple[int, str]]:
  """The non-blank lines of a small text file as (1-based line number, line)."""
  try:
    text = data.decode(encoding)
  except UnicodeDecodeError as e:
    lineno = data[: e.start].count(b'\n') + 1
    raise DataError(f'{where}, line {lineno}: not valid {encoding} text. {fix}') from e
  out = []
  for lineno, line in enumerate(text.split('\n'), start=1):
    line = line.rstrip('\r')
    if lineno > skip and line.strip():
      out.append((lineno, line))
  if not out:
    raise DataError(f'{where} is empty. {fix}')
  return out


def _split(line: str, lineno: int, sep: str, ncols: int, where: str, fix: str) -> list[str]:
  fields = line.split(sep)
  if len(fields) != ncols:
    raise DataError(f'{where}, line {lineno}: {len(fields)} {sep!r}-separated fields, expected {ncols}: '
                    f'{line[:80]!r}. {fix}')
  return fields


def _int(field: str, lineno: int, what: str, where: str, fix: str) -> int:
  try:
    return int(field)
  except ValueError:
    raise DataError(f'{where}, line {lineno}: {what} {field[:40]!r} is not an integer. {fix}') from None


def _check_header(line: str, expected: Sequence[str], where: str, fix: str) -> None:
  names = [f.split(':')[0] for f in line.split('\t')]
  if names != list(expected):
    raise DataError(f'{where}, line 1: header {line[:120]!r} does not have the columns {list(expected)}. {fix}')


# ----------------------------------------------------------------------------------------------------------
# Table builders and checks shared by all formats.


def _user_table(rows: list[tuple[int, int, str, int, str, str]], where: str, fix: str) -> UserTable:
  """rows: (line, user_id, gender, age, occupation, zip)."""
  ids = np.array([r[1] for r in rows], dtype=np.int64)
  _check_unique(ids, [r[0] for r in rows], 'user id', where, fix)
  order = np.argsort(ids, kind='stable')
  return UserTable(
      user_id=ids[order],
      gender=np.array([r[2] for r in rows], dtype=str)[order],
      age=np.array([r[3] for r in rows], dtype=np.int32)[order],
      occupation=np.array([r[4] for r in rows], dtype=str)[order],
      zip_code=np.array([r[5] for r in rows], dtype=str)[order],
  )


def _item_table(rows: list[tuple[int, int, str, int, list[str]]], where: str, fix: str) -> ItemTable:
  """rows: (line, item_id, title, year, genre names)."""
  ids = np.array([r[1] for r in rows], dtype=np.int64)
  _check_unique(ids, [r[0] for r in rows], 'item id', where, fix)
  genre_index = {g: i for i, g in enumerate(GENRES)}
  genres = np.zeros((len(rows), len(GENRES)), dtype=bool)
  for i, (lineno, _, _, _, names) in enumerate(rows):
    for g in names:
      if g not in genre_index:
        raise DataError(f'{where}, line {lineno}: unknown genre {g!r} (known: {", ".join(GENRES)}). {fix}')
      genres[i, genre_index[g]] = True
  order = np.argsort(ids, kind='stable')
  return ItemTable(
      item_id=ids[order],
      title=np.array([r[2] for r in rows], dtype=str)[order],
      year=np.array([r[3] for r in rows], dtype=np.int32)[order],
      genres=genres[order],
      genre_names=GENRES,
  )


def _check_unique(ids: np.ndarray, linenos: list[int], what: str, where: str, fix: str) -> None:
  uniq, counts = np.unique(ids, return_counts=True)
  if len(uniq) != len(ids):
    dup = int(uniq[np.argmax(counts > 1)])
    lines = [linenos[i] for i in np.flatnonzero(ids == dup)]
    raise DataError(f'{where}: {what} {dup} appears more than once (lines {lines}). {fix}')


def _ratings(raw: bytes, table: np.ndarray, where: str, fix: str, skip: int = 0) -> tuple[np.ndarray, ...]:
  """Splits a parsed [n, 4] (user, item, rating, timestamp) table and checks ids and the 1..5 range."""
  user, item, rating, ts = (table[:, i] for i in range(4))
  for col, bad, what in ((user, user <= 0, 'user id'), (item, item <= 0, 'item id'),
                         (rating, (rating < 1) | (rating > 5), 'rating (must be 1..5)')):
    if bad.any():
      row = int(np.argmax(bad))
      raise DataError(f'{where}, line {_line_of_row(raw, row, skip)}: {what} {col[row]} is invalid. {fix}')
  return user.astype(np.int64), item.astype(np.int64), rating.astype(np.float32), ts.astype(np.int64)


def _verify(data: RatingsData, where: str, fix: str, full_counts: tuple[int, int, int] | None,
            items_in_file: int | None = None) -> None:
  """Every rating refers to a listed user and item; with `full_counts`, the sizes of the complete dataset."""
  for ids, table, what in ((data.user_id, data.users.user_id, 'user'), (data.item_id, data.items.item_id, 'item')):
    missing = ~np.isin(ids, table)
    if missing.any():
      row = int(np.argmax(missing))
      raise DataError(f'{where}: rating row {row + 1} refers to {what} {ids[row]}, which is not in the {what} '
                      f'file. {fix}')
  if full_counts is None:
    return
  n_ratings, n_users, n_items = full_counts
  got = (data.num_ratings, len(np.unique(data.user_id)), len(np.unique(data.item_id)))
  tables = (len(data.users.user_id), len(data.items.item_id))
  want_tables = (n_users, items_in_file or n_items)
  if got != full_counts or tables != want_tables:
    raise DataError(
        f'{where}: found {got[0]:,} ratings by {got[1]:,} users on {got[2]:,} items (user file {tables[0]:,}, '
        f'item file {tables[1]:,}); the full {data.name} has {n_ratings:,} ratings by {n_users:,} users on '
        f'{n_items:,} items (item file {want_tables[1]:,}), so a file is partial or truncated. {fix} '
        '(Pass expect_full=False to load a subset on purpose.)')


# ----------------------------------------------------------------------------------------------------------
# ML-100K, GroupLens format.

_DATE_YEAR = re.compile(r'(\d{4})\s*$')


def _read_grouplens_100k(bundle: fetch.Bundle, source: str, expect_full: bool) -> RatingsData:
  fix = bundle.fix
  raw, where = bundle.read('u.data')
  table = _parse_numeric(raw, sep='\t', ncols=4, where=where, fix=fix)
  user, item, rating, ts = _ratings(raw, table, where, fix)

  raw, uwhere = bundle.read('u.user')
  users = []
  for lineno, line in _lines(raw, uwhere, fix, 'latin-1'):
    uid, age, gender, occupation, zip_code = _split(line, lineno, '|', 5, uwhere, fix)
    users.append((lineno, _int(uid, lineno, 'user id', uwhere, fix), gender,
                  _int(age, lineno, 'age', uwhere, fix), occupation, zip_code))

  raw, iwhere = bundle.read('u.item')
  items = []
  for lineno, line in _lines(raw, iwhere, fix, 'latin-1'):
    fields = _split(line, lineno, '|', 5 + len(GENRES), iwhere, fix)
    flags = fields[5:]
    if any(f not in ('0', '1') for f in flags):
      raise DataError(f'{iwhere}, line {lineno}: genre flags must be 0/1, got {flags}. {fix}')
    match = _DATE_YEAR.search(fields[2])  # '01-Jan-1995'; empty or '?' for a few movies.
    items.append((lineno, _int(fields[0], lineno, 'item id', iwhere, fix), fields[1],
                  int(match.group(1)) if match else -1, [g for g, f in zip(GENRES, flags) if f == '1']))

  data = RatingsData(name='movielens-100k', source=source, user_id=user, item_id=item, rating=rating,
                     timestamp=ts, users=_user_table(users, uwhere, fix), items=_item_table(items, iwhere, fix))
  _verify(data, str(bundle.root), fix, ML_100K_COUNTS if expect_full else None)
  return data


# ----------------------------------------------------------------------------------------------------------
# ML-100K, recbole's atomic files inside its wheel.


def _read_recbole_100k(wheel: pathlib.Path, source: str, expect_full: bool, fix: str) -> RatingsData:
  bundle = fetch.Bundle(wheel, fix)
  raw, where = bundle.read(f'{_RECBOLE_DIR}/ml-100k.inter')
  header = raw.split(b'\n', 1)[0].decode('ascii', 'replace')
  _check_header(header, ('user_id', 'item_id', 'rating', 'timestamp'), where, fix)
  table = _parse_numeric(raw, sep='\t', ncols=4, where=where, fix=fix, skip=1)
  user, item, rating, ts = _ratings(raw, table, where, fix, skip=1)

  raw, uwhere = bundle.read(f'{_RECBOLE_DIR}/ml-100k.user')
  lines = _lines(raw, uwhere, fix, 'utf-8')
  _check_header(lines[0][1], ('user_id', 'age', 'gender', 'occupation', 'zip_code'), uwhere, fix)
  users = []
  for lineno, line in lines[1:]:
    uid, age, gender, occupation, zip_code = _split(line, lineno, '\t', 5, uwhere, fix)
    users.append((lineno, _int(uid, lineno, 'user id', uwhere, fix), gender,
                  _int(age, lineno, 'age', uwhere, fix), occupation, zip_code))

  raw, iwhere = bundle.read(f'{_RECBOLE_DIR}/ml-100k.item')
  lines = _lines(raw, iwhere, fix, 'utf-8')
  _check_header(lines[0][1], ('item_id', 'movie_title', 'release_year', 'class'), iwhere, fix)
  items = []
  for lineno, line in lines[1:]:
    iid, title, year, classes = _split(line, lineno, '\t', 4, iwhere, fix)
    # recbole writes 'unkonwn' (sic) or 'V' where the year is missing.
    items.append((lineno, _int(iid, lineno, 'item id', iwhere, fix), title,
                  int(year) if year.isdigit() else -1, classes.split()))

  data = RatingsData(name='movielens-100k', source=source, user_id=user, item_id=item, rating=rating,
                     timestamp=ts, users=_user_table(users, uwhere, fix), items=_item_table(items, iwhere, fix))
  _verify(data, str(wheel), fix, ML_100K_COUNTS if expect_full else None)
  return data


# ----------------------------------------------------------------------------------------------------------
# Public loaders.


def _loaded(data: RatingsData) -> RatingsData:
  log.info('Loaded %s from %s: %d ratings, %d users, %d items.', data.name, data.source, data.num_ratings,
           len(data.users.user_id), len(data.items.item_id))
  return data


def _find_recbole_wheel(directory: pathlib.Path) -> pathlib.Path | None:
  return fetch.find_wheel(directory, f'recbole-{RECBOLE_VERSION}-*.whl')


def load_100k(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
              allow_download: bool = True, expect_full: bool = True) -> RatingsData:
  """Loads MovieLens-100K (see the module docstring for where it looks).

  Args:
    path: a directory or .zip in GroupLens format. When given (not None or ''), it is the only source tried.
    cache_dir: where downloads are kept; default `$MTL_REC_DATA`, else `~/.cache/mtl_rec`.
    allow_download: whether steps 3-4 (GroupLens download, then the recbole wheel from PyPI) may run.
    expect_full: check the complete dataset's counts (100,000 ratings, 943 users, 1,682 items). Set False to
      load a hand-made subset in the same format; structure and 1..5 ratings are always checked.

  Returns:
    The ratings in the file's row order (u.data's; the official u1..u5 splits rely on it).

  Raises:
    DataError: a file is corrupt, partial or malformed (the message names it and the fix), or no source
      worked.
  """
  if path:  # '' (the config default) means 'not given', like None.
    p = pathlib.Path(path).expanduser()
    if not fetch.is_bundle(p):
      raise DataError(f'{p} is neither a directory nor a zip archive with MovieLens-100K in GroupLens format '
                      f'(u.data, u.user, u.item). Download it from {ML_100K_URL}.')
    return _loaded(_read_grouplens_100k(fetch.Bundle(p, fetch.path_fix(p, ML_100K_URL)), f'grouplens files at {p}',
                                        expect_full))

  cache = fetch.default_cache_dir(cache_dir)
  zip_path, dir_path, wheel_dir = cache / 'ml-100k.zip', cache / 'ml-100k', cache / 'recbole'

  def cached() -> RatingsData | None:
    for candidate in (zip_path, dir_path):
      if fetch.is_bundle(candidate):
        return _read_grouplens_100k(fetch.Bundle(candidate, fetch.cache_fix(cache, candidate)),
                                    f'cached grouplens files at {candidate}', expect_full)
    wheel = _find_recbole_wheel(wheel_dir)
    if wheel is not None:
      return _read_recbole_100k(wheel, f'cached recbole {RECBOLE_VERSION} wheel at {wheel}', expect_full,
                                fetch.cache_fix(cache, wheel))
    return None

  def grouplens() -> RatingsData | None:
    if not allow_download:
      return None
    log.info('MovieLens-100K: downloading %s to %s', ML_100K_URL, zip_path)
    if not fetch.download(ML_100K_URL, zip_path):
      return None
    return _read_grouplens_100k(fetch.Bundle(zip_path, fetch.cache_fix(cache, zip_path)),
                                f'grouplens download {ML_100K_URL} -> {zip_path}', expect_full)

  def recbole() -> RatingsData | None:
    if not allow_download:
      raise DataError(f'MovieLens-100K is not in the cache dir {cache} and downloads are disabled. Put '
                      f'ml-100k.zip (from {ML_100K_URL}) there, or pass path=.')
    try:
      wheel = fetch.pip_download(f'recbole=={RECBOLE_VERSION}', wheel_dir, f'recbole-{RECBOLE_VERSION}-*.whl')
    except DataError as e:
      raise DataError(f'Could not get MovieLens-100K: {ML_100K_URL} is unreachable and so is the package '
                      f'index ({e}). Put ml-100k.zip into {cache}, or pass path=.') from e
    return _read_recbole_100k(wheel, f'recbole {RECBOLE_VERSION} wheel from the package index -> {wheel}',
                              expect_full, fetch.cache_fix(cache, wheel))

  return _loaded(fetch.first_of([cached, grouplens, recbole]))


_TITLE_YEAR = re.compile(r'\((\d{4})\)\s*$')


def _read_1m(bundle: fetch.Bundle, source: str, expect_full: bool) -> RatingsData:
  fix = bundle.fix
  raw, where = bundle.read('ratings.dat')
  table = _parse_numeric(raw, sep='::', ncols=4, where=where, fix=fix)
  user, item, rating, ts = _ratings(raw, table, where, fix)

  raw, uwhere = bundle.read('users.dat')
  users = []
  for lineno, line in _lines(raw, uwhere, fix, 'latin-1'):
    uid, gender, age, occupation, zip_code = _split(line, lineno, '::', 5, uwhere, fix)
    _int(occupation, lineno, 'occupation code', uwhere, fix)
    # Age is already ML-1M's bucket code (1, 18, 25, 35, 45, 50, 56); occupation an int code kept as text.
    users.append((lineno, _int(uid, lineno, 'user id', uwhere, fix), gender,
                  _int(age, lineno, 'age', uwhere, fix), occupation, zip_code))

  raw, iwhere = bundle.read('movies.dat')
  items = []
  for lineno, line in _lines(raw, iwhere, fix, 'latin-1'):
    iid, title, genres = _split(line, lineno, '::', 3, iwhere, fix)
    match = _TITLE_YEAR.search(title)
    items.append((lineno, _int(iid, lineno, 'movie id', iwhere, fix), title,
                  int(match.group(1)) if match else -1, [g for g in genres.split('|') if g]))

  data = RatingsData(name='movielens-1m', source=source, user_id=user, item_id=item, rating=rating,
                     timestamp=ts, users=_user_table(users, uwhere, fix), items=_item_table(items, iwhere, fix))
  _verify(data, str(bundle.root), fix, ML_1M_COUNTS if expect_full else None,
          items_in_file=ML_1M_MOVIES_IN_FILE)
  return data


def load_1m(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
            allow_download: bool = True, expect_full: bool = True) -> RatingsData:
  """Loads MovieLens-1M from `path` (directory or .zip, files possibly under `ml-1m/`), else the cache dir,
  else a GroupLens download into the cache.

  Args:
    path: a directory or .zip with ratings.dat, users.dat, movies.dat. When given (not None or ''), it is the
      only source tried.
    cache_dir: where downloads are kept; default `$MTL_REC_DATA`, else `~/.cache/mtl_rec`.
    allow_download: whether the GroupLens download may be tried.
    expect_full: check the complete dataset's counts (1,000,209 ratings, 6,040 users, 3,706 rated movies,
      3,883 in movies.dat). Structure and 1..5 ratings are always checked.

  Returns:
    The ratings in ratings.dat's row order. Age is ML-1M's bucket code, occupation its integer code as text.

  Raises:
    DataError: a file is corrupt or partial, or the data is nowhere to be found (the message says where to
      put it).
  """
  if path:  # '' (the config default) means 'not given', like None.
    p = pathlib.Path(path).expanduser()
    if not fetch.is_bundle(p):
      raise DataError(f'{p} is neither a directory nor a zip archive with MovieLens-1M (ratings.dat, users.dat, '
                      f'movies.dat). Download it from {ML_1M_URL}.')
    return _loaded(_read_1m(fetch.Bundle(p, fetch.path_fix(p, ML_1M_URL)), f'grouplens files at {p}', expect_full))

  cache = fetch.default_cache_dir(cache_dir)
  zip_path, dir_path = cache / 'ml-1m.zip', cache / 'ml-1m'

  def cached() -> RatingsData | None:
    for candidate in (zip_path, dir_path):
      if fetch.is_bundle(candidate):
        return _read_1m(fetch.Bundle(candidate, fetch.cache_fix(cache, candidate)),
                        f'cached grouplens files at {candidate}', expect_full)
    return None

  def grouplens() -> RatingsData | None:
    if allow_download:
      log.info('MovieLens-1M: downloading %s to %s', ML_1M_URL, zip_path)
      if fetch.download(ML_1M_URL, zip_path):
        return _read_1m(fetch.Bundle(zip_path, fetch.cache_fix(cache, zip_path)),
                        f'grouplens download {ML_1M_URL} -> {zip_path}', expect_full)
    tried = 'could not be downloaded' if allow_download else 'is not cached and downloads are disabled'
    raise DataError(f'MovieLens-1M {tried}. Fetch {ML_1M_URL} elsewhere and either copy it to {zip_path} '
                    '(or unzip it there as ml-1m/), or pass path= pointing at the zip or its folder.')

  return _loaded(fetch.first_of([cached, grouplens]))

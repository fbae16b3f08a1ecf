"""MovieLens through TensorFlow Datasets' random-access `tfds.data_source` (array_record; no TensorFlow needed).

TFDS stores one flat example per rating with the user's and movie's features repeated in it; this module turns
that back into ratings arrays plus side tables (one row per distinct user / movie, from its first example).

Differences from `movielens.load_100k` / `load_1m` that downstream code may notice:
  * Row order is TFDS's (shuffled while preparing), not u.data's, so the official u1..u5 splits do not apply.
  * TFDS genre labels are mapped onto `movielens.GENRES` ('Children' -> "Children's", 'Unknown' -> 'unknown'),
    so `genre_names` match the GroupLens loaders; a label with no GroupLens equivalent ('IMAX') becomes an
    extra column only if it occurs.
  * 100K: age is `raw_user_age` (years) as in u.user. 1M: age is the bucket code and occupation the ML-1M
    integer code as text, as in users.dat (TFDS' occupation text is mapped back to it).

Preparing needs files.grouplens.org; TFDS retries for minutes when it is unreachable, so reachability is
probed first (short timeout) and an unprepared dataset on an offline machine fails fast with `DataError`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from mtl_rec.data.movielens import GENRES, ML_100K_COUNTS, ML_1M_COUNTS
from mtl_rec.data.types import ItemTable, RatingsData, UserTable
from mtl_rec import errors
from mtl_rec.errors import DataError

log = logging.getLogger(__name__)

# TFDS name -> (RatingsData.name, full counts (ratings, users, rated items)).
DATASETS: dict[str, tuple[str, tuple[int, int, int]]] = {
    'movielens/100k-ratings': ('movielens-100k', ML_100K_COUNTS),
    'movielens/1m-ratings': ('movielens-1m', ML_1M_COUNTS),
}

# `movie_genres` ClassLabel names of TFDS' movielens 0.1.1, used when the data source carries no DatasetInfo.
TFDS_GENRES: tuple[str, ...] = (
    'Action', 'Adventure', 'Animation', 'Children', 'Comedy', 'Crime', 'Documentary', 'Drama', 'Fantasy',
    'Film-Noir', 'Horror', 'IMAX', 'Musical', 'Mystery', 'Romance', 'Sci-Fi', 'Thriller', 'Unknown', 'War',
    'Western', '(no genres listed)',
)
_GENRE_ALIASES = {'Children': "Children's", 'Unknown': 'unknown', '(no genres listed)': 'unknown'}

# ML-1M's occupation codes (users.dat) as TFDS spells them in `user_occupation_text`; index = code.
ML_1M_OCCUPATIONS: tuple[str, ...] = (
    'other/not specified', 'academic/educator', 'artist', 'clerical/admin', 'college/grad student',
    'customer service', 'doctor/health care', 'executive/managerial', 'farmer', 'homemaker', 'K-12 student',
    'lawyer', 'programmer', 'retired', 'sales/marketing', 'scientist', 'self-employed', 'technician/engineer',
    'tradesman/craftsman', 'unemployed', 'writer',
)

_GROUPLENS_HOST = 'files.grouplens.org'


def _grouplens_reachable(timeout: float = 10.0) -> bool:
  try:
    with socket.create_connection((_GROUPLENS_HOST, 443), timeout=timeout):
      return True
  except OSError:
    return False


def _open(name: str, data_dir: str | None, download: bool) -> Sequence[Any]:
  """The train split as a random-access sequence of decoded examples, preparing it if needed and allowed."""
  import tensorflow_datasets as tfds  # Heavy; imported only when this source is used.
  import tensorflow_datasets.structured  # pylint: disable=unused-import  # Registers the movielens builder.

  # With an explicit data_dir TFDS does not default to array_record, and the tfrecord default has no random
  # access, so the format is always passed.
  kwargs = dict(split='train', data_dir=data_dir, builder_kwargs={'file_format': 'array_record'})
  try:
    return tfds.data_source(name, download=False, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # TFDS signals "not prepared" with several types.
    not_ready = e
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  if not download:
    raise DataError(f'TFDS dataset {name} is not prepared in {where} ({not_ready}); call with download=True '
                    'on a machine that can reach files.grouplens.org, or use mtl_rec.data.movielens.') from not_ready
  if not _grouplens_reachable():
    raise DataError(f'TFDS dataset {name} is not prepared in {where} and {_GROUPLENS_HOST} is unreachable, so '
                    'TFDS cannot build it. Prepare it elsewhere and copy the data dir here, or use '
                    'mtl_rec.data.movielens.load_100k (it falls back to the package index).') from not_ready
  log.info('Preparing TFDS dataset %s in %s.', name, where)
  try:
    return tfds.data_source(name, download=True, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'TFDS could not prepare {name} in {where}: {e}. Delete the partial dataset folder there '
                    'and re-run.') from e


def _read_all(ds: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
  n = len(ds)
  examples: list[dict[str, Any]] = []
  batched = hasattr(ds, '__getitems__')
  with tqdm.tqdm(total=n, unit='ex', desc='tfds', disable=n < 50_000) as bar:
    for start in range(0, n, batch_size):
      keys = list(range(start, min(start + batch_size, n)))
      batch = None
      if batched:
        try:
          batch = ds.__getitems__(keys)  # One batched read: much faster on array_record files.
        except TypeError:
          # tfds 4.9.10's mock_data installs an unbound __getitems__ that cannot be called; read one by one.
          batched = False
      if batch is None:
        batch = [ds[i] for i in keys]
      examples.extend(batch)
      bar.update(len(keys))
  return examples


def _text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  return str(value)


def _ids(values: list[str], what: str) -> np.ndarray:
  """Raw ids as int64; TFDS stores them as text. Non-numeric ids (only seen in random mock data) are replaced
  by 1..K in sorted order, with a warning, so the result is still a valid RatingsData."""
  arr = np.array(values, dtype=str)
  try:
    return arr.astype(np.int64)
  except ValueError:
    log.warning('TFDS %s ids are not numeric (e.g. %r); renumbering them 1..K.', what, values[0])
    return np.unique(arr, return_inverse=True)[1].astype(np.int64) + 1


def _genre_columns(ds: Any) -> tuple[list[str], list[int]]:
  """The label names of `movie_genres` and, per label, its column in GENRES (+ extras appended)."""
  try:
    names = list(ds.dataset_info.features['movie_genres'].feature.names)
  except (AttributeError, KeyError, TypeError):
    names = list(TFDS_GENRES)
  columns = list(GENRES)
  index = []
  for label in names:
    canonical = _GENRE_ALIASES.get(label, label)
    if canonical not in columns:
      columns.append(canonical)
    index.append(columns.index(canonical))
  return columns, index


def load(name: str, data_dir: str | None = None, download: bool = True, expect_full: bool = True,
         batch_size: int = 10_000) -> RatingsData:
  """Loads `movielens/100k-ratings` or `movielens/1m-ratings` via `tfds.data_source` (train split, all rows).

  Args:
    name: the TFDS name, one of `DATASETS`.
    data_dir: the TFDS data dir; None or '' = TFDS' own (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    download: prepare the dataset if it is not there (needs files.grouplens.org).
    expect_full: check the full dataset's counts and that ratings are 1..5 (False for mock or partial data).
    batch_size: examples per batched read.

  Returns:
    The ratings in TFDS' row order with user and item tables built from the distinct ids.

  Raises:
    ValueError: `name` is not supported.
    DataError: the dataset is not available, or (with `expect_full`) does not have the full counts.
  """
  if name not in DATASETS:
    raise errors.ConfigError(f'Unsupported TFDS dataset {name!r}; supported: {sorted(DATASETS)}.')
  ratings_name, full_counts = DATASETS[name]
  data_dir = data_dir or None  # '' (the config default) means TFDS' default dir.
  ds = _open(name, data_dir, download)
  examples = _read_all(ds, batch_size)
  if not examples:
    raise DataError(f'TFDS dataset {name} has no examples.')
  is_1m = name == 'movielens/1m-ratings'

  user_id = _ids([_text(e['user_id']) for e in examples], 'user')
  item_id = _ids([_text(e['movie_id']) for e in examples], 'movie')
  rating = np.array([e['user_rating'] for e in examples], dtype=np.float32)
  timestamp = np.array([e['timestamp'] for e in examples], dtype=np.int64)
  if not np.isfinite(rating).all():
    raise DataError(f'TFDS dataset {name} has non-finite ratings; delete its folder in the data dir and re-run.')

  _, user_rows = np.unique(user_id, return_index=True)
  age_key = 'bucketized_user_age' if is_1m else 'raw_user_age'
  occupation_code = {text: str(code) for code, text in enumerate(ML_1M_OCCUPATIONS)} if is_1m else {}
  users = UserTable(
      user_id=user_id[user_rows],
      gender=np.array(['M' if bool(examples[r]['user_gender']) else 'F' for r in user_rows], dtype=str),
      age=np.array([int(examples[r][age_key]) if age_key in examples[r] else -1 for r in user_rows],
                   dtype=np.int32),
      occupation=np.array([occupation_code.get(t, t) for t in
                           (_text(examples[r]['user_occupation_text']) for r in user_rows)], dtype=str),
      zip_code=np.array([_text(examples[r]['user_zip_code']) for r in user_rows], dtype=str),
  )

  _, item_rows = np.unique(item_id, return_index=True)
  columns, column_of_label = _genre_columns(ds)
  genres = np.zeros((len(item_rows), len(columns)), dtype=bool)
  for i, r in enumerate(item_rows):
    for label in np.asarray(examples[r]['movie_genres']).reshape(-1):
      genres[i, column_of_label[int(label)]] = True
  # Extra columns stay only if some movie has them, so the usual case matches GENRES exactly.
  keep = np.ones(len(columns), dtype=bool)
  keep[len(GENRES):] = genres[:, len(GENRES):].any(axis=0)
  titles = [_text(examples[r]['movie_title']) for r in item_rows]
  items = ItemTable(
      item_id=item_id[item_rows],
      title=np.array(titles, dtype=str),
      year=np.array([_title_year(t) for t in titles], dtype=np.int32),
      genres=genres[:, keep],
      genre_names=tuple(c for c, k in zip(columns, keep) if k),
  )

  data = RatingsData(name=ratings_name, source=f'tfds {name} (data_dir={data_dir or "default"})',
                     user_id=user_id, item_id=item_id, rating=rating, timestamp=timestamp, users=users,
                     items=items)
  if expect_full:
    got = (data.num_ratings, len(users.user_id), len(items.item_id))
    bad_rating = (rating < 1) | (rating > 5)
    if got != full_counts or bad_rating.any():
      raise DataError(f'TFDS dataset {name} has {got[0]:,} ratings, {got[1]:,} users, {got[2]:,} items and '
                      f'{int(bad_rating.sum())} ratings outside 1..5; expected {full_counts} and 1..5. Delete '
                      'its folder in the TFDS data dir and re-run to prepare it again.')
  log.info('Loaded %s from %s: %d ratings, %d users, %d items.', data.name, data.source, data.num_ratings,
           len(users.user_id), len(items.item_id))
  return data


def _title_year(title: str) -> int:
  """'Toy Story (1995)' -> 1995; -1 when the title has no trailing (YYYY)."""
  title = title.rstrip()
  if len(title) >= 6 and title[-1] == ')' and title[-6] == '(' and title[-5:-1].isdigit():
    return int(title[-5:-1])
  return -1

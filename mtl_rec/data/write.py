"""Writes a Dataset as Parquet or CSV tables: log, users and items, the layout config.data declares for your own data.

  python -m mtl_rec.data.write --config=configs/movielens_100k.py --out=DIR --format=parquet   # or csv

writes DIR/log.<ext>, DIR/users.<ext> and DIR/items.<ext> from the config's source (here MovieLens-100K), so that
the same data can be trained through source='files' (configs/movielens_100k_files.py) and compared with the
built-in source. Multi-valued columns become lists in Parquet and '|'-joined strings in CSV; missing numbers nulls.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl_rec import errors
from mtl_rec import files
from mtl_rec.data.types import Dataset, MultiHot

FORMATS = ('parquet', 'csv')


def _arrow(values: Any, fmt: str, delimiter: str) -> pa.Array:
  if isinstance(values, MultiHot):
    values = np.asarray(values.lists() + [[]], dtype=object)[:-1]
  if isinstance(values, np.ndarray) and values.dtype == object:
    lists = [list(v) for v in values]
    return pa.array([delimiter.join(map(str, v)) for v in lists] if fmt == 'csv' else lists)
  values = np.asarray(values)
  if values.dtype.kind == 'f':
    return pa.array(values, mask=~np.isfinite(values))
  return pa.array(values)


def table(columns: dict[str, Any], fmt: str, delimiter: str = '|') -> pa.Table:
  return pa.table({name: _arrow(v, fmt, delimiter) for name, v in columns.items()})


def write_table(columns: dict[str, Any], path: str, fmt: str, delimiter: str = '|', row_group_size: int = 0) -> None:
  """One table, written atomically; `delimiter` joins multi-valued columns in CSV; Parquet row groups of
  `row_group_size` rows (0: pyarrow's default), the unit the streaming reader shards and shuffles."""
  t = table(columns, fmt, delimiter)
  if fmt == 'parquet':
    files.write_atomic(path, lambda tmp: pq.write_table(t, tmp, row_group_size=row_group_size or None))
  else:
    files.write_atomic(path, lambda tmp: pacsv.write_csv(t, tmp))


def write_dataset(ds: Dataset, out: str, fmt: str, row_group_size: int = 0) -> dict[str, str]:
  """{'log' | 'users' | 'items': path} of the tables written under `out`."""
  if fmt not in FORMATS:
    raise errors.ConfigError(f'format {fmt!r}: use one of {", ".join(FORMATS)}')
  os.makedirs(out, exist_ok=True)
  paths = {}
  for name in ('log', 'users', 'items'):
    paths[name] = os.path.join(out, f'{name}.{fmt}')
    write_table(getattr(ds, name), paths[name], fmt, row_group_size=row_group_size if name == 'log' else 0)
  return paths


def main(argv: Sequence[str]) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from mtl_rec.data import loader  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --out=DIR')
  with errors.reported():
    if f.row_group_size < 0:
      raise errors.ConfigError(f'--row_group_size={f.row_group_size}: give a number of rows (0 = pyarrow\'s default)')
    paths = write_dataset(loader.load_data(f.config), f.out, f.format, f.row_group_size)
  for name, path in paths.items():
    print(f'{name}: {path}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  errors.define_config_file('config', 'configs/movielens_100k.py', 'Config whose data source to write.')
  flags.DEFINE_string('out', None, 'Output directory.', required=True)
  flags.DEFINE_enum('format', 'parquet', list(FORMATS), 'Table format.')
  flags.DEFINE_integer('row_group_size', 0, "Parquet: rows per row group of the log (the streaming reader's unit of "
                       "sharding and shuffling); 0 = pyarrow's default.")
  app.run(main, flags_parser=errors.parse_flags)

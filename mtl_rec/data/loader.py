"""config.data -> Dataset: the one place that picks a source and assembles the log and the side tables.

`source='files'` reads the declared Parquet/CSV tables, only the columns the config uses (ids, timestamp, label,
split and gain columns, and every feature's column, from the table its entity lives in). A user feature comes
from the users side table when one is declared, else from the log (the value of the user's first row); likewise
for items; context features always come from the log. Log ids missing from a side table are added with unknown
side values. The built-in sources (MovieLens-100K/1M, TFDS, synthetic) are converted to the same columns.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec.data import readers
from mtl_rec.data.types import Dataset, MultiHot, RatingsData, shown, to_dataset
from mtl_rec.errors import DataError

log = logging.getLogger(__name__)


def column_uses(config: ml_collections.ConfigDict) -> list[tuple[str, str, str, str]]:
  """(table: 'log' | 'users' | 'items', column, forced CSV type or '', the config field that names it) for every
  column the config reads, the one list behind `columns_needed` and `column_fields`. The side tables' own id
  columns are not listed (`_entity_table` reads them)."""
  d = config.data
  uses = [('log', d.log.user_column, '', 'data.log.user_column'),
          ('log', d.log.item_column, '', 'data.log.item_column'),
          ('log', d.log.timestamp_column, '', 'data.log.timestamp_column'),
          ('log', d.split_column if d.split == 'column' else '', '', 'data.split_column'),
          ('log', config.eval.gain_column, '', 'eval.gain_column')]
  uses += [('log', t.label, '', f'tasks.{name}.label') for name, t in config_lib.ordered(config.tasks)
           if t.label != config_lib.OBSERVED]
  uses += [('log', config_lib.history_condition(f.where, f'features.{name}.where')[0], '', f'features.{name}.where')
           for name, f in config_lib.ordered(config.features) if f.kind == 'history' and f.where]
  builtin = d.source != 'files'  # built-in sources come with both side tables
  side = {'user': ('users', builtin or bool(d.user_table.paths), d.log.user_column),
          'item': ('items', builtin or bool(d.item_table.paths), d.log.item_column)}
  entity_columns = [(f.entity, config_lib.feature_column(name, f), f.dtype,
                     f'features.{name}' + ('.column' if f.column else ''))
                    for name, f in config_lib.ordered(config.features)
                    if f.kind != 'history']  # histories come from the log's id columns
  entity_columns.append(('item', d.item_table.title_column, 'str', 'data.item_table.title_column'))
  for entity, column, dtype, field in entity_columns:
    if entity == 'context':
      uses.append(('log', column, dtype, field))
      continue
    table, has_side_table, id_column = side[entity]
    if column != id_column:
      uses.append((table, column, dtype, field))
      if not has_side_table:  # read from the log: the value of the entity's first row
        uses.append(('log', column, dtype, field))
    elif dtype:  # the id feature's dtype is the log's id column's (e.g. 'str': '007' stays '007', not 7)
      uses.append(('log', column, dtype, field))
  return [u for u in uses if u[1]]


def columns_needed(config: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
  """{'log' | 'users' | 'items': {column: forced CSV type or ''}} that the config reads (a column read as text by
  one use and untyped by another is read as text)."""
  need: dict[str, dict[str, str]] = {'log': {}, 'users': {}, 'items': {}}
  for table, column, dtype, _ in column_uses(config):
    if dtype or column not in need[table]:
      need[table][column] = dtype
  return need


def column_fields(config: ml_collections.ConfigDict, table: str) -> dict[str, str]:
  """{column of `table` ('log', 'users', 'items'): the config field that names it}, for errors about a column a file
  lacks (the first field wins)."""
  out = {}
  if table != 'log':
    side = 'user_table' if table == 'users' else 'item_table'
    out[config.data[side].id_column] = f'data.{side}.id_column'
  for t, column, _, field in column_uses(config):
    if t == table:
      out.setdefault(column, field)
  return out


def _named_by(config: ml_collections.ConfigDict, table: str, read: Callable[[], Any]) -> Any:
  """read(), a missing column of `table`'s files named with the config field that asks for it."""
  try:
    return read()
  except readers.MissingColumn as e:
    field = column_fields(config, table).get(e.column)
    if field is None:
      raise
    raise DataError(f'{e}; config.{field} names it') from None


def _missing_value(values: Any) -> Any:
  if isinstance(values, MultiHot) or values.dtype == object:
    return []
  return '' if values.dtype.kind == 'U' else np.nan


def _append_rows(table: dict[str, Any], id_column: str, new_ids: np.ndarray) -> dict[str, Any]:
  out = {id_column: np.concatenate([table[id_column], new_ids])}
  for name, values in table.items():
    if name == id_column:
      continue
    fill = _missing_value(values)
    if isinstance(values, MultiHot):
      values = np.asarray(values.lists() + [[] for _ in new_ids], dtype=object)
    elif isinstance(fill, list):
      values = np.asarray(list(values) + [[] for _ in new_ids], dtype=object)
    else:
      values = np.concatenate([values.astype(np.float64) if values.dtype.kind in 'iub' else values,
                               np.full(new_ids.size, fill, values.dtype if values.dtype.kind == 'U' else np.float64)])
    out[name] = values
  return out


def _same_id_type(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Integer ids against string ids compare as strings."""
  if (a.dtype.kind == 'U') != (b.dtype.kind == 'U'):
    return a.astype(np.str_), b.astype(np.str_)
  return a, b


def _entity_table(config: ml_collections.ConfigDict, entity: str, log_table: dict[str, Any],
                  need: dict[str, dict[str, str]], origins: dict[str, Any]) -> dict[str, Any]:
  """The entity's side table (`need`: columns_needed), or its ids and first log values where none is declared."""
  d = config.data
  side_config, id_column = (d.user_table, d.log.user_column) if entity == 'user' else (d.item_table, d.log.item_column)
  table_name = 'users' if entity == 'user' else 'items'
  columns = need[table_name]
  log_ids = np.unique(log_table[id_column])
  if not side_config.paths:
    ids, first = np.unique(log_table[id_column], return_index=True)
    return {id_column: ids, **{c: log_table[c][first] for c in columns}}
  what = f'{table_name} table'
  id_dtype = need['log'].get(id_column, '')  # the side table's ids are read as the log's are
  side, origins[table_name] = _named_by(config, table_name, lambda: readers.read_tables(
      side_config.paths, d.format, d.csv_delimiter, {side_config.id_column: id_dtype, **columns}, what))
  ids = readers.check_ids(side.pop(side_config.id_column), side_config.id_column, origins[table_name], what,
                          unique=True)
  ids, log_ids = _same_id_type(ids, log_ids)
  log_table[id_column] = _same_id_type(log_table[id_column], ids)[0]
  table = {id_column: ids, **side}
  missing = np.setdiff1d(log_ids, ids)
  if missing.size and missing.size == log_ids.size:  # not one id in common: the tables do not describe this log
    raise DataError(f'{what}: none of the log\'s {log_ids.size} {entity} ids is in {", ".join(side_config.paths)} '
                    f'(the log has e.g. {shown(log_ids[0])}, the table {shown(ids[0])}); its '
                    f'{side_config.id_column!r} column must hold the log\'s {id_column!r} ids, spelled alike')
  if missing.size:
    log.warning('%d %ss of the log are not in the %s table (e.g. %s): their side features are unknown', missing.size,
                entity, table_name, shown(missing[0]))
    table = _append_rows(table, id_column, missing)
  return table


def _check_columns(ds: Dataset, need: dict[str, dict[str, str]], source: str) -> None:
  for table_name, columns in need.items():
    table = getattr(ds, table_name)
    for column in columns:
      if column not in table:
        raise DataError(f'the {table_name} of {source} have no column {column!r} (they have: '
                        f'{", ".join(table)}); fix the column name in the config')


def _builtin(config: ml_collections.ConfigDict) -> RatingsData | Dataset:
  d = config.data
  path, cache = d.path or None, d.cache_dir or None
  if d.source == 'movielens_100k':
    from mtl_rec.data import movielens  # pylint: disable=g-import-not-at-top
    return movielens.load_100k(path, cache_dir=cache)
  if d.source == 'movielens_1m':
    from mtl_rec.data import movielens  # pylint: disable=g-import-not-at-top
    return movielens.load_1m(path, cache_dir=cache)
  if d.source == 'tfds':
    from mtl_rec.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.load(d.tfds_name, data_dir=d.tfds_data_dir or None)
  from mtl_rec.data import synthetic  # pylint: disable=g-import-not-at-top
  sc = d.synthetic
  if sc.generator == 'shop':
    return synthetic.shop(num_users=sc.num_users, num_items=sc.num_items, interactions_per_user=sc.interactions_per_user,
                          latent_dim=sc.latent_dim, seed=config.seed, item_vector_dim=sc.item_vector_dim)
  return synthetic.generate(num_users=sc.num_users, num_items=sc.num_items,
                            interactions_per_user=sc.interactions_per_user, latent_dim=sc.latent_dim,
                            seed=config.seed)


def load_data(config: ml_collections.ConfigDict) -> Dataset:
  """The Dataset of config.data (see the module docstring); raises DataError naming any problem and its fix."""
  d = config.data
  need = columns_needed(config)
  if d.source != 'files':
    ds = _builtin(config)
    ds = ds if isinstance(ds, Dataset) else to_dataset(ds)  # the shop generator writes a Dataset directly
    if d.log.user_column != ds.user_column or d.log.item_column != ds.item_column:
      raise DataError(f"source '{d.source}' names its ids {ds.user_column!r} and {ds.item_column!r}; set "
                      'data.log.user_column / item_column to those')
    _check_columns(ds, need, f"source '{d.source}'")
    return Dataset(**{**ds.__dict__, 'name': d.name or ds.name})
  origins: dict[str, Any] = {}
  log_table, origins['log'] = _named_by(config, 'log', lambda: readers.read_tables(
      d.log.paths, d.format, d.csv_delimiter, need['log'], 'interaction log'))
  for column in (d.log.user_column, d.log.item_column):
    log_table[column] = readers.check_ids(log_table[column], column, origins['log'], 'interaction log')
  if d.log.timestamp_column:
    log_table[d.log.timestamp_column] = readers.timestamps(
        log_table[d.log.timestamp_column], d.log.timestamp_column, origins['log'], 'interaction log')
  users = _entity_table(config, 'user', log_table, need, origins)
  items = _entity_table(config, 'item', log_table, need, origins)
  return Dataset(name=d.name or 'files', source=', '.join(d.log.paths), log=log_table, users=users, items=items,
                 user_column=d.log.user_column, item_column=d.log.item_column,
                 timestamp_column=d.log.timestamp_column or None, origins=origins)


def entity_tables(config: ml_collections.ConfigDict, user_ids: np.ndarray,
                  item_ids: np.ndarray) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """(users, items, origins) for a log known only by its distinct ids (data.reader='stream'): the declared side
  tables with the log's ids they lack appended, or the ids alone."""
  d, need, origins = config.data, columns_needed(config), {}
  ids = {d.log.user_column: np.asarray(user_ids), d.log.item_column: np.asarray(item_ids)}
  users = _entity_table(config, 'user', ids, need, origins)
  items = _entity_table(config, 'item', ids, need, origins)
  return users, items, origins

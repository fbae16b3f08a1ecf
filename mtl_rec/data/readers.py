"""Parquet and CSV tables (paths or globs, read with pyarrow) -> columns, and the checks that need only the files.

Every problem is a `DataError` raised before anything is trained or written, naming the file, the column, the row
where one applies, and the fix: a path or glob that matches nothing, an empty or corrupt/truncated file, a missing
column, a column of the wrong type, a null or empty id, a side table with a duplicate id.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mtl_rec.data.types import Origin, shown, where
from mtl_rec.errors import DataError

log = logging.getLogger(__name__)

FORMATS = {'.parquet': 'parquet', '.pq': 'parquet', '.csv': 'csv', '.tsv': 'csv'}
ARROW_TYPES = {'str': pa.string(), 'int': pa.int64(), 'float': pa.float64()}
_CSV_BLOCK_BYTES = 64 << 20  # what the streaming CSV conversion reads at a time (its first block fixes the types)


def expand(patterns: Sequence[str], what: str) -> list[str]:
  """The files of `patterns` (paths or globs), each pattern's matches sorted, in pattern order."""
  files = []
  for pattern in patterns:
    matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
    matches = [m for m in matches if os.path.isfile(m) or not glob.has_magic(pattern)]
    if not matches or not all(os.path.isfile(m) for m in matches):
      missing = matches[0] if matches else pattern
      raise DataError(f'{what}: {missing!r} matches no file; fix the path (globs like logs/*.parquet are fine) in '
                      'the config')
    files += matches
  return files


def file_format(path: str, fmt: str) -> str:
  """'parquet' or 'csv': `fmt` when given, else by the file's extension."""
  if fmt:
    return fmt
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise DataError(f'{path}: cannot tell the format from the extension {ext!r}; name the file .parquet or .csv, '
                    "or set --config.data.format='parquet' or 'csv'")
  return FORMATS[ext]


def _csv_header(path: str, delimiter: str) -> list[str]:
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    first = f.readline()
  if not first.strip():
    raise DataError(f'{path} is empty (no header line); write the column names on its first line')
  return next(csv.reader(io.StringIO(first), delimiter=delimiter))


def _check_file(path: str, fmt: str, delimiter: str, columns: Sequence[str], what: str) -> None:
  """A non-empty, readable file of format `fmt` that has every one of `columns`; else a DataError saying which."""
  if os.path.getsize(path) == 0:
    raise DataError(f'{what}: {path} is empty (0 bytes); write the data again or drop it from the paths')
  try:
    available = pq.read_schema(path).names if fmt == 'parquet' else _csv_header(path, delimiter)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f'{what}: {path} is not a readable {fmt} file ({e}); it may be truncated or corrupt: write it '
                    'again') from e
  require_columns(path, available, columns, what)


class MissingColumn(DataError):
  """A file lacks a column the config reads (`column`); the caller may add which config field names it."""

  def __init__(self, message: str, column: str):
    super().__init__(message)
    self.column = column


def require_columns(path: str, available: Sequence[str], columns: Sequence[str], what: str) -> None:
  """A DataError naming the first of `columns` that file `path` (with columns `available`) lacks, and the fix."""
  twice = sorted({c for c in columns if list(available).count(c) > 1})
  if twice:  # which of the two a reader takes is not what the file's author decided
    raise DataError(f'{what}: {path} has {len(list(available)) - len(set(available))} repeated column name(s) in its '
                    f'header, among them {twice[0]!r}, which the config reads; rename one of them')
  missing = [c for c in columns if c not in available]
  if missing:
    fix = 'rename the column in the file or point the config at the right one'
    if available and available[0].startswith('\ufeff'):
      fix = ('the file starts with a UTF-8 byte-order mark (as Excel\'s "CSV UTF-8" writes it), read as part of the '
             'first column\'s name: save it as plain UTF-8 (no BOM)')
    elif len(available) == 1:  # the whole header read as one column: another delimiter
      found = [d for d in (';', '\t', '|', ',') if d in available[0]]
      if found:
        flag = "$'\\t'" if found[0] == '\t' else repr(found[0])  # as a shell passes a tab
        fix = (f'the header reads as one column: the file is delimited by {found[0]!r}; pass '
               f'--config.data.csv_delimiter={flag}')
    raise MissingColumn(f'{what}: {path} has no column {missing[0]!r} (its columns: {", ".join(available)}); {fix}',
                        missing[0])


def _read_file(path: str, fmt: str, delimiter: str, columns: dict[str, str], what: str) -> tuple[pa.Table, int | None]:
  """One file's `columns` ({name: '' | 'str' | 'int' | 'float'}) as an arrow table, and its first data line."""
  _check_file(path, fmt, delimiter, columns, what)
  try:
    if fmt == 'parquet':
      table = pq.read_table(path, columns=list(columns))
      first_line = None
    else:
      table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                             convert_options=_csv_convert(columns))
      first_line = 2
  except (pa.ArrowException, OSError) as e:
    _check_utf8_error(e, path, what)
    raise DataError(f'{what}: {path} could not be read ({e}); it may be truncated, corrupt, or hold a value of the '
                    'wrong type (set the feature\'s dtype for CSV columns that look numeric but are not)') from e
  if table.num_rows == 0:
    raise DataError(f'{what}: {path} has no rows; write the data again or drop it from the paths')
  _check_text(table.schema, path, what)
  return table, first_line


def _csv_convert(columns: dict[str, str], inferred: dict[str, pa.DataType] | None = None) -> pacsv.ConvertOptions:
  """How a CSV file's `columns` are parsed (`inferred`: types found for undeclared ones). Only an empty field is a
  missing string: pyarrow's null words (NA, null, nan, N/A...) stay text in string columns, where they may be real
  values (Namibia's country code 'NA'); in number columns they still mark a missing value."""
  return pacsv.ConvertOptions(include_columns=list(columns), strings_can_be_null=False,
                              column_types={**(inferred or {}),
                                            **{c: ARROW_TYPES[t] for c, t in columns.items() if t}})


_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): CSV conversion error to [^:]+: invalid value '(.*)'", re.S)


def _widened(error: Exception, header: list[str], schema: pa.Schema, columns: dict[str, str]
             ) -> tuple[str, pa.DataType] | None:
  """(column, type) when `error` is a block of the streamed CSV holding a value of another type than the type its
  first block gave an undeclared column: the type that holds both (null -> number -> float -> string), as reading
  the file whole infers it; None for any other error."""
  m = _CONVERSION_ERROR.search(str(error))
  if not m or int(m.group(1)) >= len(header) or header[int(m.group(1))] not in schema.names:
    return None
  column, value = header[int(m.group(1))], m.group(2)
  if columns.get(column):  # a declared type: the value is wrong, not the inference
    return None
  was = schema.field(column).type
  kind = 'int' if _INT.fullmatch(value.strip()) else 'float' if is_number(value) else 'str'
  if pa.types.is_null(was) and kind != 'str':
    return column, ARROW_TYPES[kind]
  if pa.types.is_integer(was) and kind != 'str':
    return column, pa.float64()
  return (column, pa.string()) if not pa.types.is_string(was) else None


_INT = re.compile(r'[+-]?\d+')


def _not_utf8(path: str, where_: str) -> DataError:
  return DataError(f'{where_} holds text that is not UTF-8 (a legacy encoding such as Latin-1 or Windows-1252?); '
                   f'save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {os.path.basename(path)} > utf8.csv`')


def _check_text(schema: pa.Schema, path: str, what: str) -> None:
  """A DataError if a CSV column came out as bytes: pyarrow's reading of text that is not UTF-8."""
  for field in schema:
    if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
      raise _not_utf8(path, f'{what}: {path}: column {field.name!r}')


def _check_utf8_error(e: Exception, path: str, what: str) -> None:
  """The encoding DataError for pyarrow's error on invalid UTF-8 past the block its types were inferred from."""
  if 'invalid UTF8' in str(e):
    raise _not_utf8(path, f'{what}: {path}') from e


def value_type(t: pa.DataType) -> pa.DataType:
  """The type of a column's values: a dictionary-encoded column's values' (Parquet writers encode text that way)."""
  return t.value_type if pa.types.is_dictionary(t) else t


def common_type(types: Sequence[pa.DataType]) -> pa.DataType:
  """The type columns of `types` in several files are read as (an all-null column takes the others' type, int32
  and int64 widen...): what concatenating the files gives."""
  return pa.unify_schemas([pa.schema([pa.field('c', value_type(t))]) for t in types],
                          promote_options='permissive').field('c').type


def check_same_types(files: Sequence[str], schemas: Sequence[pa.Schema], columns: Sequence[str], what: str) -> None:
  """A DataError naming the column and two files if the files' `columns` have types that do not combine (text in
  one, numbers in another); types that widen into one (int32 and int64, int and float, text and dictionary-encoded
  text) pass."""
  for column in columns:
    fields = [(f, s.field(column)) for f, s in zip(files, schemas) if column in s.names]
    for f, field in fields[1:]:
      try:
        common_type([fields[0][1].type, field.type])
      except (pa.ArrowException, TypeError):
        raise DataError(f'{what}: column {column!r} holds {field.type} in {f} but {fields[0][1].type} in '
                        f'{fields[0][0]}; every file must hold the same kind of values in it: write them with one '
                        "schema (for CSV files, setting the feature's dtype reads the column as one type in all)"
                        ) from None


def to_numpy(col: pa.ChunkedArray | pa.Array, name: str, what: str) -> Any:
  """An arrow column as the numpy column mtl_rec works on (strings as str, nullable ints as float, lists as
  object arrays of lists of str)."""
  t = col.type
  if pa.types.is_dictionary(t):
    col, t = col.cast(t.value_type), t.value_type
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    return np.asarray(pc.fill_null(col, '').to_numpy(zero_copy_only=False)).astype(np.str_)
  if pa.types.is_integer(t):
    return _integers(col, name, what)
  if pa.types.is_floating(t) or pa.types.is_decimal(t):
    return col.cast(pa.float64()).to_numpy()
  if pa.types.is_boolean(t):
    return col.cast(pa.float64()).to_numpy() if col.null_count else col.to_numpy()
  if pa.types.is_timestamp(t) or pa.types.is_date(t):
    seconds = pc.cast(col, pa.timestamp('s'), safe=False)  # whole seconds: sub-second parts are dropped, not an error
    return seconds.cast(pa.int64()).to_numpy().astype(np.float64 if col.null_count else np.int64)
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    out = np.empty(len(col), dtype=object)
    out[:] = [[str(v) for v in x if v is not None] if x is not None else [] for x in col.to_pylist()]
    return out
  if pa.types.is_null(t):  # every file's cells empty (a file where only some are takes the others' type)
    raise DataError(f'{what}: column {name!r} is empty in every row; fill it, or drop the feature or task that reads '
                    'it')
  raise DataError(f'{what}: column {name!r} has type {t}, which mtl_rec does not read; use strings, numbers, '
                  'booleans, timestamps or lists of strings')


def _integers(col: pa.ChunkedArray | pa.Array, name: str, what: str) -> np.ndarray:
  """An integer column as int64, or float64 (NaN = missing) where it has empty cells; a DataError for values
  neither holds exactly (uint64 beyond 2**63 - 1; beyond 2**53 beside empty cells): ids or categories that would
  silently become other values."""
  low, high = (pc.min_max(col)[k].as_py() for k in ('min', 'max'))
  too_large = None
  if high is not None and high >= 2**63:
    too_large = high
  elif col.null_count and high is not None and max(abs(low), abs(high)) > 2**53:
    too_large = high if abs(high) >= abs(low) else low
  if too_large is not None:
    why = ('is beyond a 64-bit signed integer' if too_large >= 2**63 else
           'is beyond 2**53 in a column with empty cells, read as floats, which cannot hold it exactly')
    raise DataError(f'{what}: column {name!r} holds {too_large}, which {why}; store the column as text (ids and '
                    'categories may be strings)' + ('' if too_large >= 2**63 else ' or fill the empty cells'))
  return col.to_numpy(zero_copy_only=False).astype(np.float64 if col.null_count else np.int64)


def read_tables(paths: Sequence[str], fmt: str, delimiter: str, columns: dict[str, str],
                what: str) -> tuple[dict[str, Any], tuple[Origin, ...]]:
  """The `columns` of every file of `paths` (concatenated in order) as numpy columns, and where each row came from.

  `columns` maps a column to '' (type inferred) or a forced CSV type 'str' / 'int' / 'float'.
  """
  tables, origins, start = [], [], 0
  for path in expand(paths, what):
    table, first_line = _read_file(path, file_format(path, fmt), delimiter, columns, what)
    table = table.select(list(columns))
    tables.append(table.cast(pa.schema([pa.field(f.name, value_type(f.type)) for f in table.schema])))
    origins.append(Origin(path, start, table.num_rows, first_line))
    start += table.num_rows
  check_same_types([o.path for o in origins], [t.schema for t in tables], list(columns), what)
  table = pa.concat_tables(tables, promote_options='permissive')
  return {name: to_numpy(table.column(name), name, what) for name in columns}, tuple(origins)


def check_ids(ids: np.ndarray, column: str, origins: tuple[Origin, ...], what: str, unique: bool = False) -> np.ndarray:
  """The id column as int64 or str, after checking that no id is null or empty (and, for a side table, that none
  repeats); raises DataError at the first bad row."""
  if ids.dtype.kind == 'f':
    bad = np.flatnonzero(~np.isfinite(ids) | (ids != np.round(ids)))
    if bad.size:
      value = ids[bad[0]]
      raise DataError(f'{what}: {where(origins, int(bad[0]))}: column {column!r} holds '
                      f'{"a null id" if not np.isfinite(value) else f"the non-integer id {value}"}; every row needs an '
                      'id (drop or fix the row)')
    big = np.flatnonzero(np.abs(ids) >= 2.0**53)  # read as floating point (beyond int64): digits already lost
    if big.size:
      raise DataError(f'{what}: {where(origins, int(big[0]))}: column {column!r} holds the id {ids[big[0]]:.0f}, too '
                      'large to read exactly as a number (distinct ids would merge); read the ids as text: '
                      "feature(..., dtype='str') on the id feature, or a string column in Parquet")
    ids = ids.astype(np.int64)
  elif ids.dtype.kind == 'U':
    bad = np.flatnonzero(np.char.str_len(ids) == 0) if ids.size else np.zeros(0, int)
    if bad.size:
      raise DataError(f'{what}: {where(origins, int(bad[0]))}: column {column!r} holds a null or empty id; every row '
                      'needs an id (drop or fix the row)')
  elif ids.dtype.kind == 'b' or ids.dtype == object:
    raise DataError(f'{what}: column {column!r} holds {"booleans" if ids.dtype.kind == "b" else "lists"}, not ids; '
                    'ids are strings or integers')
  if unique:
    order = np.argsort(ids, kind='stable')
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
      row = int(order[dup[0] + 1])
      raise DataError(f'{what}: {where(origins, row)}: id {shown(ids[row])} appears again (first at '
                      f'{where(origins, int(order[dup[0]]))}); a side table has one row per id: drop the duplicates')
  return ids


def numeric(values: np.ndarray, column: str, origins: tuple[Origin, ...], what: str, why: str) -> np.ndarray:
  """The column as float64 (NaN = missing); raises DataError if it holds text or lists."""
  if values.dtype.kind in 'iufb':
    return values.astype(np.float64)
  sample = values[0] if len(values) else None
  if values.dtype.kind == 'U':
    try:
      return np.where(values == '', 'nan', values).astype(np.float64)
    except ValueError:
      bad = next(j for j, v in enumerate(values) if v and not is_number(v))
      sample = values[bad]
      raise DataError(f'{what}: {where(origins, bad)}: column {column!r} holds {shown(sample)}; {why} needs numbers: '
                      'fix the row or the column') from None
  raise DataError(f'{what}: column {column!r} holds {type(sample).__name__} values; {why} needs numbers')


def timestamps(values: np.ndarray, column: str, origins: tuple[Origin, ...], what: str) -> np.ndarray:
  """The timestamp column as float64; raises DataError at the first row without one (empty, null or infinite):
  splits by time and the histories' recency order need every row's time, and a NaN would sort as the latest."""
  ts = numeric(values, column, origins, what, 'the timestamp column')
  bad = np.flatnonzero(~np.isfinite(ts))
  if bad.size:
    raise DataError(f'{what}: {where(origins, int(bad[0]))}: column {column!r} holds no time '
                    f'({"empty or null" if np.isnan(ts[bad[0]]) else ts[bad[0]]}); every row needs its timestamp: '
                    'fix or drop the row')
  return ts


def is_number(value: Any, finite: bool = False) -> bool:
  """Whether float(value) reads `value` (a number's text: 'nan' and 'inf' too, unless `finite`)."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    return False
  return not finite or math.isfinite(x)


def csv_to_parquet(path: str, out: str, delimiter: str, columns: dict[str, str], what: str,
                   row_group_size: int = 1 << 20) -> None:
  """Converts the CSV file `path` (its `columns`, types as in read_tables) into the Parquet file `out`, block by
  block in bounded memory: the streaming reader (data.reader='stream') reads Parquet row groups."""
  _check_file(path, 'csv', delimiter, columns, what)
  tmp = out + '.tmp'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  # The types of undeclared columns come from the first block. A later block holding another type of value (a
  # column empty for the first 64 MB, integers and then '0.5') starts the conversion again with the column widened,
  # as reading the whole file at once infers it (read_tables): the same columns as the in-memory reader's.
  inferred: dict[str, pa.DataType] = {}
  header = _csv_header(path, delimiter)
  while True:
    writer, rows, schema = None, 0, None
    try:
      reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                              parse_options=pacsv.ParseOptions(delimiter=delimiter),
                              convert_options=_csv_convert(columns, inferred))
      schema = reader.schema
      _check_text(schema, path, what)
      for batch in reader:
        table = pa.Table.from_batches([batch])
        if writer is None:
          writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=row_group_size)
        rows += table.num_rows
      break
    except (pa.ArrowException, OSError) as e:
      widened = None if schema is None else _widened(e, header, schema, columns)
      if widened is not None:
        log.info('%s: column %r holds %s values after the first block; converting again', path, *widened)
        inferred[widened[0]] = widened[1]
        continue
      _check_utf8_error(e, path, what)
      raise DataError(f"{what}: {path} could not be read ({e}) at about row {rows + 1}: a value of another type "
                      "than the rows before it (set the feature's dtype for CSV columns that look numeric but are "
                      'not), or a truncated or corrupt file') from e
    finally:
      if writer is not None:
        writer.close()
  if not rows:
    raise DataError(f'{what}: {path} has no rows; write the data again or drop it from the paths')
  os.replace(tmp, out)

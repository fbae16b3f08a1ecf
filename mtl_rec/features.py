"""Feature specs and encoders: raw side features -> rows of embedding tables, by rules that are data.

Vocabularies are fitted on the training split only; row 0 of every categorical table is the reserved
out-of-vocabulary (OOV) row, so ids and values never seen in training (cold start) still get an embedding. Each
feature's rule (`FeatureSpec.encoding`, see `mtl_rec.encoding`) is what both training and serving apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from mtl_rec import encoding
from mtl_rec.data.types import RatingsData
from mtl_rec.encoding import OOV_ROW, Vocab

__all__ = ['OOV_ROW', 'Vocab', 'FeatureSpec', 'FeatureEncoder', 'fit', 'feature_rules']


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One model input: which entity it describes, how it is embedded, its table's rows, and its encoding rule."""

  name: str
  entity: str  # 'user' or 'item'
  kind: str  # 'categorical' (one row per example) or 'multi_hot' (mean-pooled rows)
  vocab_size: int  # rows, the OOV row included (for multi_hot: number of columns)
  large: bool  # id tables: row-sharded over the 'model' mesh axis and L2-regularized per use
  encoding: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the rule (mtl_rec.encoding), JSON-able


@dataclasses.dataclass(frozen=True)
class FeatureEncoder:
  """Fitted rules and vocabularies, and the encoded side tables of every user and item of the dataset.

  `user_table[name]` / `item_table[name]` are indexed by position in `data.users` / `data.items`, so a batch of
  (user index, item index) pairs gets its features with one fancy-indexing gather on the host.
  """

  specs: tuple[FeatureSpec, ...]
  vocabs: dict[str, Vocab]
  user_table: dict[str, np.ndarray]
  item_table: dict[str, np.ndarray]

  def gather(self, user_index: np.ndarray, item_index: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Model inputs for pairs given as positions in the side tables."""
    return {'user': {k: v[user_index] for k, v in self.user_table.items()},
            'item': {k: v[item_index] for k, v in self.item_table.items()}}

  def spec(self, name: str) -> FeatureSpec:
    return next(s for s in self.specs if s.name == name)


# name -> (entity, column of the side table, the rule before fitting); a rule of kind 'vocab' gets its vocabulary
# (named like the feature) fitted on the training split.
def feature_rules(features_config: Any, genre_names: tuple[str, ...]) -> dict[str, tuple[str, str, dict[str, Any]]]:
  """Every feature config.features can name, with its rule (config.features sets prefix, bucket edges, spans)."""
  fc = features_config
  vocab = lambda raw, raw_type, **kw: {'kind': 'vocab', 'raw': raw, 'raw_type': raw_type, 'vocab': raw, **kw}
  return {
      'user_id': ('user', 'user_id', vocab('user_id', 'id')),
      'gender': ('user', 'gender', vocab('gender', 'str')),
      'age': ('user', 'age', {'kind': 'bucket', 'raw': 'age', 'raw_type': 'int',
                              'boundaries': [int(b) for b in fc.age_boundaries]}),
      'occupation': ('user', 'occupation', vocab('occupation', 'str')),
      'zip': ('user', 'zip_code', vocab('zip', 'str', prefix=int(fc.zip_prefix_len))),
      'item_id': ('item', 'item_id', vocab('item_id', 'id')),
      'genres': ('item', 'genres', {'kind': 'multi_hot', 'raw': 'genres', 'raw_type': 'list[str]',
                                    'names': list(genre_names)}),
      'year': ('item', 'year', vocab('year', 'int', divide=int(fc.year_bucket_years))),
  }


def _known(values: np.ndarray) -> np.ndarray:
  """Values that mean something (not '' for strings, not -1 for ints after `encoding.vocab_values`)."""
  return values != ('' if values.dtype.kind == 'U' else -1)


def fit(data: RatingsData, train_rows: np.ndarray, features_config: Any, row_multiple: int = 1) -> FeatureEncoder:
  """Fits the rules on the training ratings `train_rows` and encodes every user and item of `data`.

  Args:
    data: the whole dataset (side tables of all users and items).
    train_rows: indices of the training ratings; only their users/items (and those users' and items' side values)
      enter the vocabularies.
    features_config: `config.features`.
    row_multiple: large tables get their row count padded to a multiple of this (for row sharding); padding rows
      are never looked up.
  """
  fc = features_config
  tables = {'user': data.users, 'item': data.items}
  known = {'user': np.isin(data.users.user_id, data.user_id[train_rows]),
           'item': np.isin(data.items.item_id, data.item_id[train_rows])}
  rules = feature_rules(fc, tuple(data.items.genre_names))
  vocabs: dict[str, Vocab] = {}
  specs, encoded = [], {'user': {}, 'item': {}}
  for name in (*fc.user, *fc.item):
    entity, column, rule = rules[name]
    raw = getattr(tables[entity], column)
    if rule['kind'] == 'vocab':
      values = encoding.vocab_values(rule, raw)
      vocabs[rule['vocab']] = Vocab.fit(values[known[entity] & _known(values)])
    encoded[entity][name] = encoding.encode(rule, raw, vocabs)
    large = name in ('user_id', 'item_id')
    rows = encoding.rows(rule, vocabs)
    if large:
      rows = -(-rows // row_multiple) * row_multiple
    specs.append(FeatureSpec(name, entity, 'multi_hot' if rule['kind'] == 'multi_hot' else 'categorical', rows,
                             large, rule))
  return FeatureEncoder(specs=tuple(specs), vocabs=vocabs, user_table=encoded['user'], item_table=encoded['item'])

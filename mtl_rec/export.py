"""Export of the scoring and retrieval functions: `W/export/<version>/`, the contract between training and serving.

  python -m mtl_rec.export --workdir W            # the best checkpoint (else the latest)
  python -m mtl_rec.export --workdir W --step S   # any checkpoint

A version directory holds:

  score           serialized `jax.export` artifact, symbolic batch dim `b`:
                    (params, user features [b], item features [b], context features [b], fusion weights [b, T])
                    -> {task: [b] for every task, 'score': [b]}
  recommend       serialized `jax.export` artifact, symbolic user dim `u`: each user's top max_k catalog items by the
                  fused score, inside the graph (no custom ops). With a retrieval task (export.retrieve_n > 0,
                  manifest functions.recommend.retrieval) it retrieves then re-ranks: the top-N items of one matrix
                  product of the user's query vector with the item vectors, re-ranked by the fused heads:
                    (params, catalog item features [I], item vectors float32 [I, d], user features [u],
                     context features [u], exclude mask bool [u, I], fusion weights [u, T])
                  without one the fused heads score the whole catalog (the item vectors argument is absent):
                    (params, catalog item features [I], user features [u], context features [u],
                     exclude mask bool [u, I], fusion weights [u, T])
                  -> {'items': int32 [u, max_k], 'scores': float32 [u, max_k]}. The fused heads score the catalog in
                  blocks of `chunk_items` merged with a running top-k (memory u x chunk_items rows of the network);
                  the retrieval stage is one [u, I] product and one top-N
  weights.npz     every parameter, keyed by '<member>/<path>' (numpy's npz: numpy alone reads it, no pickle)
  users.npz       raw user ids ('raw.ids') and every user's encoded features (keyed by input name), by position
  catalog.npz     raw item ids ('raw.ids'), titles ('raw.title', if the data has them), every item's encoded features
  item_vectors.npz  with a retrieval stage: 'vectors', float32 [I, d], every catalog item's retrieval vector
  seen.npz        CSR (indptr, indices) users.npz position -> catalog positions rated in train + valid
  vocab.npz       vocabularies too large for the manifest (the id vocabularies of big datasets)
  manifest.json   what a server needs to call the above without any of mtl_rec's model or training code: every input
                  (user, item and request-time context features) with its encoding rule, the tasks, fusion weights

The parameters are *inputs* of the exported functions (in the order of manifest['weights']['order']), so the
artifacts hold only the computation and stay a few hundred KB whatever the table sizes.

Task outputs: binary heads give a probability, regression heads the predicted value, multiclass heads the expected
class value sum_c v_c * p_c. The fused ranking score is sum_t w_t * s_t with s_t = p_t for binary heads and
(value - lo) / (hi - lo) on the task's scale otherwise (tasks.fusion_term, which mtl_rec.fusion uses too), so every
s_t is on a [0, 1] scale.

An export is a list of networks (scoring.Network: graphdef + params + the tasks it answers): the unified model
is one network with all tasks; the ensemble-fusion baseline is one per task. The server cannot tell them apart.
`write_export` takes the networks and narrow inputs (`Tables`: users, catalog, seen items, feature rules and
vocabularies); `export_trained` / `export_run` derive those from a trained run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import distributed
from mtl_rec import errors
from mtl_rec import evaluation
from mtl_rec import files
from mtl_rec import metrics as metrics_lib
from mtl_rec import runs as runs_lib
from mtl_rec import scoring
from mtl_rec import tasks as tasks_lib
from mtl_rec import trees
from mtl_rec import encoding
from mtl_rec.encoding import Vocab, manifest_vocab
from mtl_rec.experiment import Experiment
from mtl_rec.features import FeatureSpec
from mtl_rec.scoring import Network

log = logging.getLogger(__name__)

FORMAT = 'mtl_rec.export/2'  # /2: `recommend` may retrieve then re-rank (functions.recommend.retrieval)
ITEM_VECTORS, VECTORS_KEY = 'item_vectors.npz', 'vectors'
IDS_KEY, TITLES_KEY = 'raw.ids', 'raw.title'  # users.npz / catalog.npz keys beside the features (named by manifest)
# Vocabularies with more entries than this go to vocab.npz instead of the manifest (a 2M-id list would make the
# manifest a 20 MB JSON file that every tool has to parse).
INLINE_VOCAB_MAX = 10_000


@dataclasses.dataclass(frozen=True)
class Tables:
  """Everything an export serves besides the networks: who the users and items are, their encoded features, what
  each user has seen, and how raw request values are encoded (the features' rules and vocabularies)."""

  user_ids: np.ndarray  # raw ids, by position
  user_features: dict[str, np.ndarray]  # encoded model inputs, by position
  item_ids: np.ndarray
  item_features: dict[str, np.ndarray]
  item_titles: np.ndarray | None
  context_specs: tuple[FeatureSpec, ...]  # request-time inputs (no table: the request gives them)
  seen_indptr: np.ndarray  # CSR: user position -> catalog positions seen in train + valid
  seen_indices: np.ndarray
  features: tuple[FeatureSpec, ...]  # rules (FeatureSpec.encoding) of every model input
  vocabs: dict[str, Vocab]
  seen_history: str = 'train + valid ratings'  # what the seen lists hold (the manifest says it)


def tables_from_experiment(exp: Experiment) -> Tables:
  """The export tables of an experiment: all its users and items, and seen = train + valid ratings."""
  rows = exp.history_rows('test')
  indptr, indices = metrics_lib.csr_from_pairs(exp.user_index[rows], exp.item_index[rows], exp.num_users)[:2]
  ds, title = exp.data, exp.config.data.item_table.title_column
  return Tables(user_ids=np.asarray(ds.users[ds.user_column]), user_features=dict(exp.encoder.user_table),
                item_ids=np.asarray(ds.items[ds.item_column]), item_features=dict(exp.encoder.item_table),
                item_titles=np.asarray(ds.items[title]).astype(np.str_) if title else None,
                context_specs=tuple(s for s in exp.encoder.specs if s.entity == 'context'),
                seen_indptr=np.asarray(indptr, np.int64), seen_indices=np.asarray(indices, np.int32),
                features=exp.encoder.specs, vocabs=dict(exp.encoder.vocabs),
                seen_history=('train + valid ratings' if 'sampled' not in exp.counts else
                              f"train + valid ratings: all of them for the {exp.counts['sampled']['evaluation_users']} "
                              'evaluation users, for the others only their rows in the fitting sample (a streamed '
                              "log, data.reader='stream')"))


def _output_kind(spec: tasks_lib.TaskSpec) -> dict[str, Any]:
  if spec.kind == 'binary':
    return {'output': 'probability', 'range': [0.0, 1.0], 'fusion_term': 'p'}
  if spec.kind == 'retrieval':
    return {'output': 'score', 'description': "cosine of the user and item towers' vectors", 'range': [-1.0, 1.0],
            'fusion_term': '(score + 1) / 2'}
  what = 'predicted value' if spec.kind == 'regression' else 'expected class value sum_c v_c * p_c'
  lo, hi = spec.value_range
  out = {'output': 'value', 'description': what, 'scale': [lo, hi], 'fusion_term': f'(value - {lo:g}) / {hi - lo:g}'}
  if spec.kind == 'multiclass':
    out['classes'] = list(spec.values)
  return out


def host_params(params: Any) -> Any:
  """The params as numpy arrays on the host; on a multi-host run every process must call it (it all-gathers)."""
  leaves = jax.tree.leaves(params)
  if all(getattr(x, 'is_fully_addressable', True) for x in leaves):
    return jax.device_get(params)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.device_get(multihost_utils.process_allgather(params, tiled=True))


# ---------------------------------------------------------------------------------------------------------------
# The exported functions.


class _Flat:
  """The networks' parameters as one flat tuple of leaves (the exported functions' first argument)."""

  def __init__(self, networks: Sequence[Network]):
    self.networks = tuple(networks)
    self.specs = scoring.check_tasks(self.networks)
    self.task_names = tuple(s.name for s in self.specs)
    if 'score' in self.task_names:
      raise errors.ConfigError("a task may not be named 'score': that is the fused output's name")
    self.treedefs, self.counts, self.keys, self.leaves = [], [], [], []
    for i, n in enumerate(self.networks):
      flat, treedef = jax.tree_util.tree_flatten_with_path(n.params)
      self.treedefs.append(treedef)
      self.counts.append(len(flat))
      for path, leaf in flat:
        self.keys.append(f'm{i}/{trees.path_name(path)}')
        self.leaves.append(leaf)

  def unflatten(self, leaves: Sequence[jax.Array]) -> list[Any]:
    out, start = [], 0
    for treedef, n in zip(self.treedefs, self.counts):
      out.append(jax.tree.unflatten(treedef, list(leaves[start:start + n])))
      start += n
    return out

  def values(self, leaves, user, item, context) -> dict[str, jax.Array]:
    """{task: value [n]} for paired feature rows."""
    features = {'user': user, 'item': item, 'context': context}
    return scoring.task_values(scoring.predictions(self.networks, self.unflatten(leaves), features), self.specs)

  def fused(self, values: dict[str, jax.Array], weights: jax.Array) -> jax.Array:
    return jnp.sum(scoring.fusion_terms(values, self.specs) * weights, axis=-1)

  def score(self, leaves, user, item, context, weights):
    values = self.values(leaves, user, item, context)
    return {**values, 'score': self.fused(values, weights)}

  def query_vectors(self, leaves, user, context, task: str) -> jax.Array:
    """[u, dim]: the retrieval task's query vectors of users in contexts."""
    return scoring.retrieval_vectors(self.networks, self.unflatten(leaves), task, {'user': user, 'context': context})

  def item_vectors(self, leaves, items, task: str) -> jax.Array:
    """[i, dim]: the retrieval task's item vectors (what retrieve-then-rerank matches the query against)."""
    return scoring.retrieval_vectors(self.networks, self.unflatten(leaves), task, {'item': items})

  def recommend(self, leaves, catalog, user, context, exclude, weights, *, k: int, chunk: int):
    """Top-k fused scores of the whole catalog per user, excluded items at -inf."""
    u = jax.tree.leaves(user)[0].shape[0]

    def fused_block(cat):  # cat: {name: [c, ...]} -> [u, c]
      c = jax.tree.leaves(cat)[0].shape[0]
      return self._fused_rows(leaves, cat, user, context, weights, jnp.broadcast_to(jnp.arange(c), (u, c)))

    scores, items = _blocked_top_k(fused_block, catalog, exclude, k, chunk)
    return {'items': items, 'scores': scores}

  def retrieve_rerank(self, leaves, catalog, vectors, user, context, exclude, weights, *, task: str, n: int, k: int):
    """Top-k fused scores among each user's top-n retrieval candidates: the n catalog items whose item vectors
    (`vectors` [I, dim]) have the largest dot product with the user's query vector (excluded items never), re-ranked
    by the fused heads. With n = the catalog size it is the whole catalog ranked by the fused heads.

    The retrieval scores are one [u, I] matrix product and one top-n, not blocks merged into a running top-n: on a
    1M-item catalog (2 CPU cores) that is 13 ms per user against 90-170 ms for blocks of 64k-4k items (each block's
    top-n sorts), for u x I floats of memory (4 MB per user at 1M items, 4x the exclude mask it comes with)."""
    query = self.query_vectors(leaves, user, context, task)  # [u, dim]
    sims, candidates = jax.lax.top_k(jnp.where(exclude, -jnp.inf, query @ vectors.T), n)
    fused = self._fused_rows(leaves, catalog, user, context, weights, candidates)
    scores, pos = jax.lax.top_k(jnp.where(jnp.isneginf(sims), -jnp.inf, fused), k)
    return {'items': jnp.take_along_axis(candidates, pos, axis=1).astype(jnp.int32), 'scores': scores}

  def _fused_rows(self, leaves, catalog, user, context, weights, positions):
    """[u, c]: fused scores of the catalog items at `positions` [u, c] for each user (row) of user/context/weights."""
    u, c = positions.shape
    per_user = lambda x: jnp.broadcast_to(x[:, None], (u, c) + x.shape[1:]).reshape((u * c,) + x.shape[1:])
    items = {n: jnp.take(x, positions.reshape(-1), axis=0) for n, x in catalog.items()}
    values = self.values(leaves, {n: per_user(x) for n, x in user.items()}, items,
                         {n: per_user(x) for n, x in context.items()})
    return self.fused(values, per_user(weights)).reshape((u, c))


def _blocked_top_k(block_scores: Callable[[dict[str, jax.Array]], jax.Array], items: dict[str, jax.Array],
                   exclude: jax.Array, k: int, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(scores float32 [u, k], item positions int32 [u, k]): the k best of `block_scores(items' rows [c, ...]) ->
  [u, c]` over all rows of `items`, excluded ones (bool [u, I]) at -inf; the rows are scored `chunk` at a time
  against a running top-k, so memory is u * chunk scores whatever the catalog size."""
  num_items = jax.tree.leaves(items)[0].shape[0]
  u = exclude.shape[0]
  num_chunks = -(-num_items // chunk)
  if num_chunks == 1:
    scores, idx = jax.lax.top_k(jnp.where(exclude, -jnp.inf, block_scores(items)), k)
    return scores, idx.astype(jnp.int32)
  pad = num_chunks * chunk - num_items
  blocks = {n: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((num_chunks, chunk) + x.shape[1:])
            for n, x in items.items()}
  excl = jnp.pad(exclude, [(0, 0), (0, pad)], constant_values=True).reshape((u, num_chunks, chunk))

  def body(carry, xs):
    best_s, best_i = carry
    c, block, excl_c = xs
    s, i = jax.lax.top_k(jnp.where(excl_c, -jnp.inf, block_scores(block)), k)
    top_s, pos = jax.lax.top_k(jnp.concatenate([best_s, s], axis=1), k)
    all_i = jnp.concatenate([best_i, i.astype(jnp.int32) + c * chunk], axis=1)
    return (top_s, jnp.take_along_axis(all_i, pos, axis=1)), None

  init = (jnp.full((u, k), -jnp.inf, jnp.float32), jnp.zeros((u, k), jnp.int32))
  (scores, idx), _ = jax.lax.scan(body, init, (jnp.arange(num_chunks, dtype=jnp.int32), blocks,
                                               jnp.moveaxis(excl, 1, 0)))
  return scores, idx


def _sds(shape: tuple[Any, ...], dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype)


def recommend_sizes(num_items: int, max_k: int, chunk_items: int,
                    retrieval: tuple[str, int] | None) -> tuple[int, int, int | None]:
  """(k, chunk, n) of `recommend` on a catalog of `num_items`: the list length (max_k, at most the catalog), the
  brute-force block size (at least k), and the retrieval stage's candidates (None without one; between k and the
  catalog)."""
  k = min(max_k, num_items)
  n = None if retrieval is None else min(max(retrieval[1], k), num_items)
  return k, max(min(chunk_items, num_items), k), n


def export_functions(networks: Sequence[Network], user_table: dict[str, np.ndarray],
                     catalog: dict[str, np.ndarray], context: dict[str, np.ndarray], max_k: int, chunk_items: int,
                     platforms: Sequence[str] = ('cpu',), retrieval: tuple[str, int] | None = None,
                     ) -> tuple[jax.export.Exported, jax.export.Exported, _Flat]:
  """(score, recommend, flat params): the two functions exported with symbolic batch dims, and their parameters.

  `user_table` / `catalog` / `context` (one example row each) give the feature names, dtypes and trailing shapes of
  the user, item and context inputs. `retrieval` = (retrieval task, n): `recommend` retrieves n candidates and
  re-ranks them (`_Flat.retrieve_rerank`, an extra argument: the item vectors [I, dim]); None: it ranks the whole
  catalog with the fused heads.
  """
  flat = _Flat(networks)
  num_tasks = len(flat.specs)
  leaves = tuple(_sds(np.shape(x), np.asarray(x).dtype if not hasattr(x, 'dtype') else x.dtype)
                 for x in flat.leaves)
  (b,) = jax.export.symbolic_shape('b')
  user = {n: _sds((b,) + v.shape[1:], v.dtype) for n, v in user_table.items()}
  item = {n: _sds((b,) + v.shape[1:], v.dtype) for n, v in catalog.items()}
  ctx = {n: _sds((b,) + v.shape[1:], v.dtype) for n, v in context.items()}
  score = jax.export.export(jax.jit(flat.score), platforms=tuple(platforms))(
      leaves, user, item, ctx, _sds((b, num_tasks), jnp.float32))

  num_items = int(next(iter(catalog.values())).shape[0])
  k, chunk, num_candidates = recommend_sizes(num_items, max_k, chunk_items, retrieval)
  (u,) = jax.export.symbolic_shape('u')
  users = {n: _sds((u,) + v.shape[1:], v.dtype) for n, v in user_table.items()}
  cat = {n: _sds(v.shape, v.dtype) for n, v in catalog.items()}
  ctxs = {n: _sds((u,) + v.shape[1:], v.dtype) for n, v in context.items()}
  rest = (users, ctxs, _sds((u, num_items), jnp.bool_), _sds((u, num_tasks), jnp.float32))
  if retrieval is None:
    def recommend(leaves, catalog, user, context, exclude, weights):
      return flat.recommend(leaves, catalog, user, context, exclude, weights, k=k, chunk=chunk)
    rec = jax.export.export(jax.jit(recommend), platforms=tuple(platforms))(leaves, cat, *rest)
  else:
    task = retrieval[0]
    dim = jax.eval_shape(lambda p, c: flat.item_vectors(p, c, task), leaves, cat).shape[-1]

    def recommend(leaves, catalog, vectors, user, context, exclude, weights):
      return flat.retrieve_rerank(leaves, catalog, vectors, user, context, exclude, weights, task=task,
                                  n=num_candidates, k=k)
    rec = jax.export.export(jax.jit(recommend), platforms=tuple(platforms))(
        leaves, cat, _sds((num_items, dim), jnp.float32), *rest)
  return score, rec, flat


def item_vectors(flat: _Flat, catalog: dict[str, np.ndarray], task: str, chunk: int) -> np.ndarray:
  """float32 [I, dim]: every catalog item's retrieval vector, computed `chunk` items at a time (one compilation)."""
  num_items = int(next(iter(catalog.values())).shape[0])
  chunk = min(chunk, num_items)
  fn = jax.jit(lambda leaves, items: flat.item_vectors(leaves, items, task))
  leaves = tuple(jnp.asarray(x) for x in flat.leaves)
  return scoring.in_padded_batches(lambda idx: fn(leaves, {n: v[idx] for n, v in catalog.items()}), num_items,
                                   chunk).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Writing a version directory.


def _vocab_entry(name: str, vocab: Vocab, big: dict[str, np.ndarray]) -> dict[str, Any]:
  entry = manifest_vocab(vocab)
  if vocab.keys.shape[0] > INLINE_VOCAB_MAX:
    big[name] = np.asarray(entry.pop('values'), np.int64 if entry['dtype'] == 'int' else np.str_)
    entry['file'] = 'vocab.npz'
    entry['key'] = name
  return entry


def _context_example(specs: Sequence[FeatureSpec]) -> dict[str, np.ndarray]:
  """One unknown context row per context input: its dtype and trailing shape."""
  return {s.name: encoding.missing(s.encoding)[None] for s in specs}


def _inputs(tables: Tables) -> dict[str, list[dict[str, Any]]]:
  """Every model input: its dtype and shape, its table's rows, and its encoding rule (FeatureSpec.encoding), which
  the server applies to raw request values with mtl_rec.encoding, exactly as training did."""
  out = {'user': [], 'item': [], 'context': []}
  for entity, table in (('user', tables.user_features), ('item', tables.item_features),
                        ('context', _context_example(tables.context_specs))):
    for name, col in table.items():
      spec = next(s for s in tables.features if s.name == name)
      out[entity].append({'name': name, 'dtype': str(col.dtype), 'shape': ['b', *col.shape[1:]],
                          'kind': spec.kind, 'rows': int(spec.vocab_size), 'pooling': spec.pooling,
                          'encoding': dict(spec.encoding)})
  return out


def next_version(export_root: str) -> int:
  """1 + the largest integer version under `export_root` (1 if none)."""
  if not os.path.isdir(export_root):
    return 1
  versions = [int(d) for d in os.listdir(export_root) if d.isdigit()]
  return max(versions, default=0) + 1


def write_export(export_root: str, networks: Sequence[Network], tables: Tables, config: ml_collections.ConfigDict,
                 metrics: dict[str, Any] | None = None, fusion_weights: dict[str, float] | None = None,
                 name: str | None = None, version: int | None = None, source: dict[str, Any] | None = None) -> str:
  """Writes `export_root/<version>/` for `networks` and returns its path.

  Args:
    export_root: usually `W/export`; versions are integer subdirectories.
    networks: the networks; their tasks must be distinct.
    tables: users, catalog, seen items, feature rules and vocabularies (`tables_from_experiment`).
    config: the run's config (saved in the manifest; `config.export` sets max_k, chunk_items and platforms).
    metrics: test metrics to record (e.g. metrics.json's 'test').
    fusion_weights: default weight per task; default `config.tasks.<t>.fusion_weight` (0 for tasks not there).
    name: model name served; default `config.name`.
    version: default `next_version(export_root)`.
    source: free-form provenance recorded in the manifest (workdir, step, system).
  """
  ec = config.export
  users = {n: np.asarray(v) for n, v in tables.user_features.items()}
  catalog = {n: np.asarray(v) for n, v in tables.item_features.items()}
  host = [dataclasses.replace(n, params=host_params(n.params)) for n in networks]
  retrieval = config_lib.retrieval_stage(config, [s.name for s in scoring.check_tasks(host)])
  score, rec, flat = export_functions(host, users, catalog, _context_example(tables.context_specs), int(ec.max_k),
                                      int(ec.chunk_items), tuple(ec.platforms), retrieval)
  if fusion_weights is None:
    fusion_weights = {s.name: float(config.tasks[s.name].fusion_weight) if s.name in config.tasks else 0.0
                      for s in flat.specs}
  unknown = set(fusion_weights) - set(flat.task_names)
  if unknown:
    raise errors.ConfigError(f'fusion weights name tasks {sorted(unknown)} that no network predicts '
                             f'({flat.task_names})')
  weights = {t: float(fusion_weights.get(t, 0.0)) for t in flat.task_names}

  version = next_version(export_root) if version is None else int(version)
  final = os.path.join(export_root, str(version))
  if os.path.exists(final):
    raise errors.Error(f'{final} exists; versions are immutable: pass another --version or none for the next one')
  os.makedirs(export_root, exist_ok=True)
  tmp = os.path.join(export_root, f'.tmp-{version}-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)

  with open(os.path.join(tmp, 'score'), 'wb') as f:
    f.write(score.serialize())
  with open(os.path.join(tmp, 'recommend'), 'wb') as f:
    f.write(rec.serialize())
  leaves = [np.asarray(x) for x in flat.leaves]
  np.savez(os.path.join(tmp, 'weights.npz'), **dict(zip(flat.keys, leaves)))
  # Raw ids and titles under keys no feature can have (feature names are identifiers: a 'title' text feature).
  np.savez(os.path.join(tmp, 'users.npz'), **{IDS_KEY: tables.user_ids}, **users)
  titles = {} if tables.item_titles is None else {TITLES_KEY: tables.item_titles}
  np.savez(os.path.join(tmp, 'catalog.npz'), **{IDS_KEY: tables.item_ids}, **titles, **catalog)
  np.savez(os.path.join(tmp, 'seen.npz'), indptr=tables.seen_indptr, indices=tables.seen_indices)
  num_items = int(tables.item_ids.shape[0])
  k, chunk, num_candidates = recommend_sizes(num_items, int(ec.max_k), int(ec.chunk_items), retrieval)
  recommend_args = ['params (tuple, weights.order)', 'catalog item features {name: [I, ...]}',
                    'user features {name: [u]}', 'context features {name: [u, ...]}', 'exclude bool [u, I]',
                    'fusion weights float32 [u, T] (fusion.order)']
  stage = {}
  if retrieval is not None:
    vectors = item_vectors(flat, catalog, retrieval[0], chunk)
    np.savez(os.path.join(tmp, ITEM_VECTORS), **{VECTORS_KEY: vectors})
    recommend_args.insert(2, f'item vectors float32 [I, {vectors.shape[1]}] ({ITEM_VECTORS})')
    stage = {'retrieval': {
        'task': retrieval[0], 'candidates': num_candidates,
        'item_vectors': {'file': ITEM_VECTORS, 'key': VECTORS_KEY, 'shape': list(vectors.shape), 'dtype': 'float32'},
        'rule': f"the {num_candidates} catalog items (excluded ones never) whose item vector has the largest dot "
                f"product with the user's query vector (the '{retrieval[0]}' task's towers, unit vectors) are "
                're-ranked by the fused score; the top max_k of them are returned'}}
  big_vocabs: dict[str, np.ndarray] = {}
  vocabularies = {n: _vocab_entry(n, v, big_vocabs) for n, v in tables.vocabs.items()}
  if big_vocabs:
    np.savez(os.path.join(tmp, 'vocab.npz'), **big_vocabs)

  manifest = {
      'format': FORMAT,
      'name': name or config.name,
      'version': version,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'jax_version': jax.__version__,
      'platforms': list(score.platforms),
      'source': source or {},
      'members': [{'name': n.name, 'tasks': [s.name for s in n.specs],
                   'num_params': scoring.count_params(n.params)} for n in host],
      'tasks': [{'name': s.name, 'kind': s.kind, 'label': s.label, 'rows': s.rows, 'threshold': s.threshold,
                 **_output_kind(s)} for s in flat.specs],
      'fusion': {'formula': 'score = sum_t w_t * s_t', 'default_weights': weights,
                 'order': list(flat.task_names)},
      'functions': {
          'score': {'file': 'score', 'batch_dim': 'b',
                    'args': ['params (tuple, weights.order)', 'user features {name: [b]}',
                             'item features {name: [b, ...]}', 'context features {name: [b, ...]}',
                             'fusion weights float32 [b, T] (fusion.order)'],
                    'outputs': {**{t: 'float32 [b]' for t in flat.task_names}, 'score': 'float32 [b]'}},
          'recommend': {'file': 'recommend', 'batch_dim': 'u', 'max_k': k, 'chunk_items': chunk, **stage,
                        'args': recommend_args,
                        'outputs': {'items': f'int32 [u, {k}] catalog positions',
                                    'scores': f'float32 [u, {k}] fused scores, -inf where excluded'}},
      },
      'weights': {'file': 'weights.npz', 'format': 'npz',
                  'order': [{'key': key, 'shape': list(x.shape), 'dtype': str(x.dtype)}
                            for key, x in zip(flat.keys, leaves)]},
      'inputs': _inputs(tables),
      'vocabularies': {'oov_row': 0, 'policy': 'row = 1 + position of the raw value in the sorted list; any other '
                                                'value (unseen in training) -> row 0, the out-of-vocabulary row',
                       'entries': vocabularies},
      'users': {'file': 'users.npz', 'count': int(tables.user_ids.shape[0]), 'ids': IDS_KEY, 'columns': list(users)},
      'catalog': {'file': 'catalog.npz', 'count': num_items, 'ids': IDS_KEY,
                  'titles': TITLES_KEY if titles else None, 'columns': list(catalog)},
      'seen': {'file': 'seen.npz', 'format': 'csr: items of users.npz row r are indices[indptr[r]:indptr[r+1]] '
                                             '(catalog.npz rows)', 'history': tables.seen_history},
      'metrics': files.jsonable(metrics or {}),
      'config': files.jsonable(config.to_dict()),
  }
  with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=False)
  # A version appears whole or not at all: a server picking the newest version never sees a partial one.
  os.replace(tmp, final)
  log.info('exported %s version %d to %s', manifest['name'], version, final)
  return final


def export_trained(run: runs_lib.Run, workdir: str, metrics: dict[str, Any] | None = None) -> str | None:
  """Exports a trained run to `workdir/export/<next version>`: every process gathers the parameters (a collective),
  process 0 writes; returns the version directory there (None elsewhere)."""
  network = dataclasses.replace(run.network, params=host_params(run.network.params))
  if not distributed.is_lead():
    return None
  return write_export(os.path.join(workdir, 'export'), [network], tables_from_experiment(run.exp), run.config,
                      metrics=(metrics or {}).get('test'), fusion_weights=default_fusion_weights(metrics),
                      source={'workdir': os.path.abspath(workdir), 'step': run.step, 'system': 'unified'})


def default_fusion_weights(metrics: dict[str, Any] | None) -> dict[str, float] | None:
  """The fusion weights training chose on validation (metrics.json 'default_fusion'); None: the config's."""
  return (metrics or {}).get('default_fusion', {}).get('weights')


def export_run(workdir: str, step: int | None = None, export_root: str | None = None,
               version: int | None = None) -> str:
  """Exports a run's best checkpoint (or the one at `step`) to `export_root` (default `W/export`)."""
  export_root = export_root or os.path.join(workdir, 'export')
  if version is not None and os.path.exists(os.path.join(export_root, str(version))):
    raise errors.Error(f'{export_root}/{version} exists; versions are immutable: pass another --version or none')
  run = runs_lib.load(workdir, step, devices=jax.devices()[:1])
  metrics, weights = None, None
  path = os.path.join(workdir, 'metrics.json')
  if os.path.exists(path):
    saved = files.read_json(path)
    if saved.get('best_step') == run.step:
      metrics, weights = saved.get('test'), default_fusion_weights(saved)
  if metrics is None:  # not the checkpoint metrics.json describes: measure this one
    scorer = scoring.NetworkScorer([run.network], run.exp.encoder, run.config.eval.batch_size)
    metrics = evaluation.full_metrics(scorer, run.exp, 'test')
  return write_export(export_root, [run.network], tables_from_experiment(run.exp), run.config, metrics=metrics,
                      fusion_weights=weights, version=version,
                      source={'workdir': os.path.abspath(workdir), 'step': run.step, 'system': 'unified'})


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m mtl_rec.export --workdir W [--step S] [--export_dir D] [--version V]`."""
  parser = argparse.ArgumentParser(prog='python -m mtl_rec.export', description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='run directory of train.py')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: best, else latest)')
  parser.add_argument('--export_dir', default=None, help='export root (default: WORKDIR/export)')
  parser.add_argument('--version', type=int, default=None, help='version number (default: next free integer)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  if args.version is not None and args.version < 0:
    parser.error(f'--version={args.version}: versions are non-negative integers (serving picks the largest)')
  with errors.reported():
    if args.export_dir:
      files.output_directory(args.export_dir, '--export_dir')  # before the checkpoint is loaded
    path = export_run(args.workdir, args.step, args.export_dir, args.version)
  print(path)


if __name__ == '__main__':
  main()

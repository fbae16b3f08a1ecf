"""One interface for everything that scores (user, item) pairs: the unified model, the ensemble, the baselines.

A `Scorer` answers, for pairs given as positions in the experiment's user and item tables, one column per task:
the task's fusion term s_t on the [0, 1] scale (tasks.fusion_term). A ranking score is those columns dotted with
weights: the fused score with fusion weights, one task's score with a one-hot vector. Evaluation, the ensemble's
fusion fits, and both benchmarks take a Scorer; the export builds its functions from the same `Network`s and
`predictions`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl_rec import sharding as sharding_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.features import FeatureEncoder


@dataclasses.dataclass(frozen=True)
class Network:
  """One trained network and the tasks it answers (the unified model: all tasks; an ensemble member: one).

  Called as `nnx.merge(graphdef, params)(user_features, item_features)` -> ({task: raw head output}, aux), like
  `model.MultiTaskModel`; only the tasks of `specs` are taken from it.
  """

  graphdef: Any
  params: Any  # pure dict (nnx.to_pure_dict layout) of arrays, on any device(s) or the host
  specs: tuple[tasks_lib.TaskSpec, ...]
  name: str = 'unified'


def check_tasks(networks: Sequence[Network]) -> tuple[tasks_lib.TaskSpec, ...]:
  """The networks' task specs in order; raises ValueError if two networks answer the same task."""
  specs = tuple(s for n in networks for s in n.specs)
  names = [s.name for s in specs]
  if not specs:
    raise ValueError('scoring needs at least one network with at least one task')
  if len(set(names)) != len(names):
    raise ValueError(f'networks predict overlapping tasks {names}; each task needs exactly one network')
  return specs


def predictions(networks: Sequence[Network], params: Sequence[Any], features: Mapping[str, Mapping[str, jax.Array]],
                items: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """{task: prediction (tasks.predictions)} of every network's tasks for rows of features {'user', 'item',
  'context'}; with `items` ([I] item features), for every pair of the query rows of `features` ({'user',
  'context'}, [U]) x items, row u * I + i (model.cross). Traceable."""
  out = {}
  for n, p in zip(networks, params):
    model = nnx.merge(n.graphdef, p)
    outputs = model(features)[0] if items is None else model.cross(features, items)
    out.update(tasks_lib.predictions(outputs, n.specs))
  return out


def retrieval_vectors(networks: Sequence[Network], params: Sequence[Any], task: str,
                      features: Mapping[str, Mapping[str, jax.Array]]) -> jax.Array:
  """[B, dim]: the retrieval task's query vectors of {'user', 'context'} features or item vectors of {'item'}
  features (model.MultiTaskModel.retrieval_vectors), from the network that answers `task`. Traceable."""
  for n, p in zip(networks, params):
    if any(s.name == task and s.kind == 'retrieval' for s in n.specs):
      return nnx.merge(n.graphdef, p).retrieval_vectors(task, features)
  raise ValueError(f"no network answers a retrieval task '{task}'")


def task_values(preds: Mapping[str, jax.Array], specs: Sequence[tasks_lib.TaskSpec]) -> dict[str, jax.Array]:
  """{task: one float32 number per row} (tasks.task_value)."""
  return {s.name: tasks_lib.task_value(preds[s.name], s).astype(jnp.float32) for s in specs}


def fusion_terms(values: Mapping[str, jax.Array], specs: Sequence[tasks_lib.TaskSpec]) -> jax.Array:
  """[..., T]: every task's fusion term s_t, in the order of `specs`."""
  return jnp.stack([tasks_lib.fusion_term(values[s.name], s) for s in specs], axis=-1)


class Scorer(abc.ABC):
  """Scores pairs given as positions in the experiment's user and item tables, in the context of log rows (-1 or
  None: an unknown context); one column per task."""

  task_names: tuple[str, ...]

  @abc.abstractmethod
  def terms_pairs(self, users: np.ndarray, items: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, T]: the tasks' fusion terms for each (user, item) pair."""

  @abc.abstractmethod
  def terms_catalog(self, users: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
    """float32 [U, num_items, T]: the tasks' fusion terms of every catalog item for each user (in context rows)."""

  def weights(self, task: str) -> np.ndarray:
    """The one-hot weights that rank by `task` alone."""
    if task not in self.task_names:
      raise ValueError(f"no task '{task}' among this scorer's tasks {self.task_names}")
    return np.asarray([1.0 if t == task else 0.0 for t in self.task_names], np.float32)

  def score_pairs(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray,
                  rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [N]: the ranking score sum_t w_t s_t of each pair."""
    return np.asarray(jnp.asarray(self.terms_pairs(users, items, rows)) @ jnp.asarray(weights, jnp.float32))

  def score_catalog(self, users: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
    """float32 [U, num_items]: the ranking score of every catalog item for each user."""
    return self.terms_catalog(users, rows) @ jnp.asarray(weights, jnp.float32)


class NetworkScorer(Scorer):
  """The scores of trained networks (the unified model, or an ensemble's members) over an experiment's tables.

  Pairs are predicted in batches of `batch_size` rows (the last one padded), placed with `batch_sharding` when the
  parameters live on a mesh; `predict(params, batch)` (default: `predictions` jitted) may be a trainer's eval step.
  """

  def __init__(self, networks: Sequence[Network], encoder: FeatureEncoder, batch_size: int,
               batch_sharding: jax.sharding.NamedSharding | None = None,
               predict: Callable[[Sequence[Any], Any], dict[str, jax.Array]] | None = None):
    self.networks = tuple(networks)
    self.specs = check_tasks(self.networks)
    self.task_names = tuple(s.name for s in self.specs)
    self.encoder = encoder
    self.params = [n.params for n in self.networks]
    self.batch_sharding = batch_sharding
    data = 1 if batch_sharding is None else batch_sharding.mesh.shape['data']
    self.batch_size = max(batch_size - batch_size % data, data)
    nets = self.networks
    self._predict = predict or jax.jit(lambda params, batch: predictions(nets, params, batch))
    self._catalog = jax.jit(self._catalog_terms)
    self._vector_fns: dict[str, Callable] = {}
    self._item_vector_cache: dict[str, np.ndarray] = {}
    self.catalog_features = dict(encoder.item_table)  # the item table as is (histories whole: see _catalog_terms)

  @property
  def num_params(self) -> int:
    return sum(count_params(p) for p in self.params)

  def predict_pairs(self, users: np.ndarray, items: np.ndarray,
                    rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{task: predictions [N] (or [N, C])} for (user, item) position pairs, in fixed-size batches."""
    n, bs, out = users.shape[0], self.batch_size, []
    for start in range(0, n, bs):
      idx = np.minimum(np.arange(start, start + bs), n - 1)
      batch = self.encoder.gather(users[idx], items[idx], None if rows is None else rows[idx])
      if self.batch_sharding is not None:
        batch = sharding_lib.global_batch(batch, self.batch_sharding)
      out.append({k: np.asarray(v)[:n - start] for k, v in self._predict(self.params, batch).items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

  def terms_pairs(self, users: np.ndarray, items: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    preds = self.predict_pairs(users, items, rows)
    return np.asarray(fusion_terms(task_values(preds, self.specs), self.specs), np.float32)

  def _catalog_terms(self, params: Sequence[Any], query: Mapping[str, Mapping[str, jax.Array]],
                     items: Mapping[str, jax.Array]) -> jax.Array:
    """query: {'user': [U] features, 'context': [U] features}; items: [I] features. Each network's `cross`: every
    user's and item's feature vectors once, then the U x I pairs (histories whole: only the items a user's history
    holds, which rankings exclude, score otherwise than pair by pair)."""
    nu = jax.tree.leaves(query['user'])[0].shape[0]
    ni = jax.tree.leaves(items)[0].shape[0]
    terms = fusion_terms(task_values(predictions(self.networks, params, query, items), self.specs), self.specs)
    return terms.reshape((nu, ni, terms.shape[-1]))

  def catalog_fn(self) -> Callable:
    """jit: (params list, {'user': [U], 'context': [U]} features, item features [I]) -> fusion terms [U, I, T]."""
    return self._catalog

  def query_features(self, users: np.ndarray, rows: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The user and context features of users (in the context of log rows `rows`, else unknown)."""
    return self.encoder.query(users, rows)

  def terms_catalog(self, users: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
    return self._catalog(self.params, self.query_features(users, rows), self.catalog_features)

  # Ranking by a retrieval task alone (one-hot weights): its towers' vectors, one dot product per pair and one
  # matrix product per catalog, instead of the whole network per pair. Equal to the pair path wherever no history
  # holds the pair's own id, i.e. for every item a user did not interact with in training (the ones ranked).

  def _retrieval_task(self, weights: np.ndarray) -> tasks_lib.TaskSpec | None:
    w = np.asarray(weights)
    hot = np.flatnonzero(w)
    if hot.size == 1 and w[hot[0]] == 1.0 and self.specs[hot[0]].kind == 'retrieval':
      return self.specs[hot[0]]
    return None

  def _vectors(self, task: str, features: Callable[[np.ndarray], dict[str, Any]], n: int) -> np.ndarray:
    """float32 [n, dim]: retrieval vectors of `features(positions)` for positions 0..n-1, in padded batches."""
    if task not in self._vector_fns:
      nets = self.networks
      out = None if self.batch_sharding is None else jax.sharding.NamedSharding(self.batch_sharding.mesh,
                                                                                jax.sharding.PartitionSpec())
      self._vector_fns[task] = jax.jit(lambda params, batch: retrieval_vectors(nets, params, task, batch),
                                       out_shardings=out)
    place = (lambda b: b) if self.batch_sharding is None else (
        lambda b: sharding_lib.global_batch(b, self.batch_sharding))
    return in_padded_batches(lambda idx: self._vector_fns[task](self.params, place(features(idx))), n,
                             self.batch_size)

  def _item_vectors(self, task: str) -> np.ndarray:
    if task not in self._item_vector_cache:
      items = self.catalog_features
      self._item_vector_cache[task] = self._vectors(
          task, lambda idx: {'item': {k: v[idx] for k, v in items.items()}}, _rows(items))
    return self._item_vector_cache[task]

  def _query_vectors(self, task: str, users: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    rows = np.full(users.shape, -1, np.int64) if rows is None else np.asarray(rows, np.int64)
    return self._vectors(task, lambda idx: self.encoder.query(users[idx], rows[idx]), users.shape[0])

  def score_pairs(self, users: np.ndarray, items: np.ndarray, weights: np.ndarray,
                  rows: np.ndarray | None = None) -> np.ndarray:
    spec = self._retrieval_task(weights)
    if spec is None:
      return super().score_pairs(users, items, weights, rows)
    rows = np.full(users.shape, -1, np.int64) if rows is None else np.asarray(rows, np.int64)
    queries, inverse = np.unique(np.stack([users, rows], 1), axis=0, return_inverse=True)  # each (user, context) once
    q = self._query_vectors(spec.name, queries[:, 0], queries[:, 1])[inverse.reshape(-1)]
    cosine = np.sum(q * self._item_vectors(spec.name)[items], axis=-1)
    return np.asarray(tasks_lib.fusion_term(cosine, spec), np.float32)

  def score_catalog(self, users: np.ndarray, weights: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
    spec = self._retrieval_task(weights)
    if spec is None:
      return super().score_catalog(users, weights, rows)
    q = jnp.asarray(self._query_vectors(spec.name, users, rows))
    return tasks_lib.fusion_term(q @ jnp.asarray(self._item_vectors(spec.name)).T, spec)


class PopularityScorer(Scorer):
  """The non-personalized floor: every user gets the items' training interaction counts (one column)."""

  task_names = ('popularity',)

  def __init__(self, counts: np.ndarray):
    self.counts = np.asarray(counts, np.float32)

  def terms_pairs(self, users: np.ndarray, items: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    return self.counts[items][:, None]

  def terms_catalog(self, users: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(self.counts)[None, :, None], (users.shape[0], self.counts.shape[0], 1))


class ItemItemScorer(Scorer):
  """An item-item model (EASE): a user's score of item j is sum_i X[u, i] B[i, j] over the items i of the user's
  profile X (one column)."""

  task_names = ('item_item',)

  def __init__(self, profiles: np.ndarray, weights: np.ndarray, users_per_block: int = 1024):
    self.profiles = np.asarray(profiles, np.float32)  # [num_users, num_items]
    self.weights = np.asarray(weights, np.float32)  # [num_items, num_items]
    self.users_per_block = users_per_block

  def terms_pairs(self, users: np.ndarray, items: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    uniq, inverse = np.unique(users, return_inverse=True)
    out = np.empty(users.shape[0], np.float32)
    for start in range(0, uniq.size, self.users_per_block):  # each distinct user's row of scores once
      block = self.profiles[uniq[start:start + self.users_per_block]] @ self.weights
      sel = (inverse >= start) & (inverse < start + block.shape[0])
      out[sel] = block[inverse[sel] - start, items[sel]]
    return out[:, None]

  def terms_catalog(self, users: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
    return (jnp.asarray(self.profiles[users]) @ jnp.asarray(self.weights))[..., None]


def in_padded_batches(fn: Callable[[np.ndarray], Any], n: int, batch_size: int) -> np.ndarray:
  """fn(positions) over positions 0..n-1, `batch_size` at a time, the last batch padded by repeating position n-1
  (one shape: one compilation), its padding rows dropped; the results concatenated."""
  parts = []
  for start in range(0, n, batch_size):
    parts.append(np.asarray(fn(np.minimum(np.arange(start, start + batch_size), n - 1)))[:n - start])
  return np.concatenate(parts)


def count_params(params: Any) -> int:
  """Number of scalars in a params pytree (embedding tables as stored, padding rows included)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _rows(table: Mapping[str, np.ndarray]) -> int:
  return int(next(iter(table.values())).shape[0])

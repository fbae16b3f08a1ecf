"""The unified multi-task network (Flax NNX).

shared embeddings (user + item features) -> backbone (shared-bottom MLP | MMoE | PLE/CGC) -> one tower + head per task.

The module returns raw per-task outputs (logits for binary/multiclass heads, values for regression); losses, masks and
metrics live in `tasks.py`. Every parameter carries `axes` metadata with logical axis names; `sharding.py` maps them
to mesh axes through its one rules table.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_rec import config as config_lib
from mtl_rec.features import FeatureSpec
from mtl_rec.tasks import TaskSpec


def _take_valid(table: jax.Array, ids: jax.Array, valid: jax.Array) -> jax.Array:
  """The rows of `ids` [..., L] where `valid`, zeros elsewhere: [..., L, dim]. An invalid entry reads one row past
  the end (filled with zeros; its gradient dropped), so no [..., L, dim] mask is multiplied in and out: masking's
  numbers up to rounding, in about a tenth less of the train step time (2 CPU cores)."""
  return jnp.take(table, jnp.where(valid, ids, table.shape[0]), axis=0, mode='fill', fill_value=0)


def _dense(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, rngs=rngs, kernel_init=nnx.initializers.lecun_normal())


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class MLP(nnx.Module):
  """Dense + ReLU layers (ReLU after every layer: outputs feed further layers or heads)."""

  def __init__(self, din: int, dims: Sequence[int], dropout: float, rngs: nnx.Rngs):
    self.layers = nnx.List([_dense(a, b, rngs) for a, b in zip((din, *dims[:-1]), dims)])
    self.dropout = dropout
    self.out_dim = dims[-1] if dims else din

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    for i, layer in enumerate(self.layers):
      x = jax.nn.relu(layer(x))
      x = _dropout(x, self.dropout, None if rng is None else jax.random.fold_in(rng, i))
    return x


EMBEDDING_STDDEV = 0.05  # initial rows ~ N(0, 0.05^2)
# Sharded tables with more rows than this start at zero in the model and are filled with their N(0, 0.05^2) rows
# after placement, shard by shard and block by block (trainer.fill_large_tables): generating a 5 GB table in one
# piece took ~6x its size in temporaries, more than this 24 GB machine has for 10M x 10M x 64. Each row's values
# come from the seed and the row's number alone, so every mesh gets the same table.
LARGE_INIT_ROWS = 1 << 20


def large_init_tables(specs: Sequence[FeatureSpec]) -> list[tuple[str, ...]]:
  """Parameter paths of the tables trainer.fill_large_tables fills (the model builds them as zeros)."""
  return [('embeddings', 'tables', s.name) for s in specs
          if s.large and s.kind in ('categorical', 'multi') and s.encoding.get('kind') != 'text'
          and s.vocab_size > LARGE_INIT_ROWS]


DENSE_POOLING_MAX_ROWS = 256  # multi-valued features with at most this many rows (genres, tags) pool by a multi-hot
# matmul; larger ones (hashed text) gather their rows: a [B, L, rows] one-hot would cost more than the table


class Embeddings(nnx.Module):
  """One vector per feature and example, from tables shared by every task. Sharded (id) tables are row-sharded
  (logical axis 'vocab'); numeric features go through a learned 1 -> dim projection."""

  def __init__(self, specs: Sequence[FeatureSpec], dim: int, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=EMBEDDING_STDDEV)
    self.specs = tuple(specs)
    # Hashed text starts at zero: a token only cold items have is never trained, and a random row would be noise
    # in their pooled vector, where a zero row adds nothing (rows still train: their gradient is the layer above's).
    # Very large tables start at zero here and are filled after placement (LARGE_INIT_ROWS).
    zero = {p[-1] for p in large_init_tables(specs)}
    start = lambda s, shape: (jnp.zeros(shape) if s.encoding.get('kind') == 'text' or s.name in zero
                              else init(rngs.params(), shape))
    self.tables = nnx.data({
        s.name: nnx.Param(start(s, (max(s.vocab_size, 1), dim)), axes=('vocab' if s.large else 'small_vocab', 'embed'))
        for s in specs if s.kind in ('categorical', 'multi')})
    self.numeric = nnx.data({s.name: _dense(1, dim, rngs) for s in specs if s.kind == 'numeric'})
    # vectors (e.g. a pretrained text or image encoder's) through a learned projection to the embedding width
    self.vectors = nnx.data({s.name: _dense(int(s.encoding['dim']), dim, rngs) for s in specs if s.kind == 'vector'})

  def embed(self, spec: FeatureSpec, x: jax.Array, exclude: jax.Array | None = None) -> jax.Array:
    """The feature's vector [B, dim]; for a history, `exclude` is the example's own id of the table it pools ([B]),
    left out of the pool (None: nothing left out)."""
    if spec.kind == 'history':  # ids [B, L] of another feature's rows, -1 padding: their mean (or sum)
      table = self.tables[spec.encoding['of']][...]
      valid = x >= 0 if exclude is None else (x >= 0) & (x != exclude[..., None])
      pooled = jnp.sum(_take_valid(table, x, valid), axis=-2)
      if spec.pooling == 'sum':
        return pooled
      return pooled * (1.0 / jnp.maximum(valid.sum(-1, keepdims=True, dtype=table.dtype), 1.0))  # see below
    if spec.kind == 'numeric':
      return self.numeric[spec.name](x[..., None])
    if spec.kind == 'vector':
      return self.vectors[spec.name](x)
    table = self.tables[spec.name][...]
    if spec.kind == 'multi':  # ids [B, L], -1 padding: the sum or mean of the rows of the values
      rows = table.shape[0]
      if rows <= DENSE_POOLING_MAX_ROWS:  # a multi-hot [B, rows] times the table: one matmul, exact counts
        hot = jax.nn.one_hot(x, rows, dtype=table.dtype).sum(axis=-2)
        pooled, count = hot @ table, hot.sum(-1, keepdims=True)
      else:
        valid = x >= 0
        pooled = jnp.sum(_take_valid(table, x, valid), axis=-2)
        count = valid.sum(-1, keepdims=True, dtype=table.dtype)
      if spec.pooling == 'sum':
        return pooled
      # times a reciprocal, not divided: XLA rewrites some divisions into that and not others, which made the
      # gradient round differently from one mesh's program to another's
      return pooled * (1.0 / jnp.maximum(count, 1.0))
    return jnp.take(table, x, axis=0)


class SharedBottom(nnx.Module):
  def __init__(self, din: int, hidden: Sequence[int], tasks: Sequence[str], dropout: float, rngs: nnx.Rngs, **_):
    self.mlp = MLP(din, hidden, dropout, rngs)
    self.tasks = tuple(tasks)
    self.out_dim = self.mlp.out_dim

  def __call__(self, x, rng=None):
    h = self.mlp(x, rng)
    return {t: h for t in self.tasks}


class MMoE(nnx.Module):
  """Multi-gate mixture of experts (Ma et al. 2018): shared experts, one softmax gate per task."""

  def __init__(self, din: int, hidden: Sequence[int], tasks: Sequence[str], dropout: float, rngs: nnx.Rngs,
               num_experts: int = 4, **_):
    self.experts = nnx.List([MLP(din, hidden, dropout, rngs) for _ in range(num_experts)])
    self.gates = nnx.data({t: _dense(din, num_experts, rngs) for t in tasks})
    self.out_dim = hidden[-1]

  def __call__(self, x, rng=None):
    e = jnp.stack([ex(x, None if rng is None else jax.random.fold_in(rng, i))
                   for i, ex in enumerate(self.experts)], axis=1)  # [B, E, H]
    return {t: jnp.einsum('be,beh->bh', jax.nn.softmax(g(x), -1), e) for t, g in self.gates.items()}


class PLE(nnx.Module):
  """Customized gate control (Tang et al. 2020, one PLE level): shared experts plus experts owned by each task."""

  def __init__(self, din: int, hidden: Sequence[int], tasks: Sequence[str], dropout: float, rngs: nnx.Rngs,
               num_shared_experts: int = 2, num_task_experts: int = 1, **_):
    self.shared = nnx.List([MLP(din, hidden, dropout, rngs) for _ in range(num_shared_experts)])
    self.own = nnx.data({t: nnx.List([MLP(din, hidden, dropout, rngs) for _ in range(num_task_experts)])
                         for t in tasks})
    self.gates = nnx.data({t: _dense(din, num_shared_experts + num_task_experts, rngs) for t in tasks})
    self.out_dim = hidden[-1]

  def __call__(self, x, rng=None):
    def run(experts, salt):
      return [ex(x, None if rng is None else jax.random.fold_in(rng, salt + i)) for i, ex in enumerate(experts)]
    shared = run(self.shared, 0)
    out = {}
    for j, (t, gate) in enumerate(self.gates.items()):
      e = jnp.stack(shared + run(self.own[t], 100 * (j + 1)), axis=1)
      out[t] = jnp.einsum('be,beh->bh', jax.nn.softmax(gate(x), -1), e)
    return out


BACKBONES = dict(zip(config_lib.BACKBONES, (SharedBottom, MMoE, PLE)))  # config.BACKBONES names them


class Head(nnx.Module):
  """A task's tower MLP and output layer."""

  def __init__(self, din: int, tower: Sequence[int], units: int, dropout: float, rngs: nnx.Rngs,
               bias_init: float = 0.0):
    self.tower = MLP(din, tower, dropout, rngs)
    self.out = _dense(self.tower.out_dim, units, rngs)
    self.out.bias[...] = jnp.full((units,), bias_init, jnp.float32)

  def __call__(self, h, rng=None):
    return self.out(self.tower(h, rng))


class Towers(nnx.Module):
  """A retrieval task's user tower (user and context vectors) and item tower (item vectors): MLPs to the embedding
  width, L2-normalized, so a pair's score is the cosine of the two (tasks.in_batch_softmax trains them)."""

  def __init__(self, user_din: int, item_din: int, tower: Sequence[int], dim: int, dropout: float, rngs: nnx.Rngs):
    self.user = MLP(user_din, tower, dropout, rngs)
    self.user_out = _dense(self.user.out_dim, dim, rngs)
    self.item = MLP(item_din, tower, dropout, rngs)
    self.item_out = _dense(self.item.out_dim, dim, rngs)

  def query(self, user: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """[B, dim] unit vectors of the user tower (input: the user and context vectors, concatenated)."""
    return _unit(self.user_out(self.user(user, rng)))

  def candidate(self, item: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """[B, dim] unit vectors of the item tower (input: the item vectors, concatenated)."""
    return _unit(self.item_out(self.item(item, rng)))

  def __call__(self, user: jax.Array, item: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """[B, 2, dim]: the user and the item vector of each row."""
    fold = lambda i: None if rng is None else jax.random.fold_in(rng, i)
    return jnp.stack([self.query(user, fold(0)), self.candidate(item, fold(1))], axis=-2)

  def on_rows(self, user: jax.Array, item: jax.Array, rows: jax.Array, bound: int,
              rng: jax.Array | None = None) -> jax.Array:
    """__call__'s [B, 2, dim] on the rows where `rows` [B] is non-zero, zeros elsewhere. The towers run on `bound`
    rows (a static width: the selected rows, then padding that is dropped), or on all B rows when more than `bound`
    are selected. The in-batch softmax reads the observed rows alone, a fifth of a batch with 4 sampled negatives
    per row; the streaming reader's batches hold a shard's observed rows first, so their first gradient groups take
    the second way."""
    n, keep = user.shape[0], rows != 0
    every_row = lambda: self(user, item, rng) * keep[:, None, None].astype(user.dtype)
    if bound >= n:
      return every_row()
    idx = jnp.nonzero(keep, size=bound, fill_value=n)[0]  # n: padding, dropped by the scatter below

    def compact():
      at = jnp.minimum(idx, n - 1)
      vecs = self(user[at], item[at], rng)
      return jnp.zeros((n,) + vecs.shape[1:], vecs.dtype).at[idx].set(vecs, mode='drop')
    return jax.lax.cond(jnp.sum(keep) <= bound, compact, every_row)


def _unit(x: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class MultiTaskModel(nnx.Module):
  """Shared embeddings -> backbone -> per-task heads.

  Call with a batch's feature dicts {'user': ..., 'item': ..., 'context': ...} (see input_pipeline) ->
  ({task: output}, aux) where output is [B] for binary/regression heads and [B, C] for multiclass, and
  aux['embedding_sq_norm'] is the per-example squared norm of the sharded-table rows used (for the embedding L2
  penalty). Sharded tables are read only by `jnp.take(table, ids, axis=0)` of the inputs `table_inputs()` names.
  The user and context vectors form the query side of the interaction product, the item vectors the other.
  """

  def __init__(self, specs: Sequence[FeatureSpec], tasks: Sequence[TaskSpec], model_config: Any, embed_dim: int,
               rngs: nnx.Rngs):
    mc = model_config
    self.embeddings = Embeddings(specs, embed_dim, rngs)
    self.entities = {s.name: s.entity for s in specs}
    self.interaction = bool(mc.interaction)
    num_feats = len(specs)
    din = embed_dim * (num_feats + (1 if self.interaction else 0))
    retrieval = [t for t in tasks if t.kind == 'retrieval']  # two towers on the embeddings, not a backbone head
    all_tasks, tasks = tasks, [t for t in tasks if t.kind != 'retrieval']
    self.backbone = BACKBONES[mc.backbone](
        din, tuple(mc.hidden_dims), tuple(t.name for t in tasks), mc.dropout, rngs, num_experts=mc.num_experts,
        num_shared_experts=mc.num_shared_experts, num_task_experts=mc.num_task_experts)
    self.heads = nnx.data({t.name: Head(self.backbone.out_dim, tuple(mc.tower_dims), t.units, mc.dropout, rngs,
                                        bias_init=t.bias_init)
                           for t in tasks})
    num_item = sum(s.entity == 'item' for s in specs)
    self.towers = nnx.data({t.name: Towers(embed_dim * (num_feats - num_item), embed_dim * num_item,
                                           tuple(mc.hidden_dims) if t.tower is None else t.tower,
                                           t.dim or embed_dim, mc.dropout, rngs)
                              for t in retrieval})
    self.kinds = {t.name: t.kind for t in tasks}
    # Wide part: a per-task scalar bias for every user and item id (the b_u + b_i of biased MF), added to binary
    # logits and regression values; the deep part then only has to model the interaction.
    # GMF part (NeuMF, He et al. 2017): a per-task linear read-out of the user x item product straight into the head,
    # because MLPs learn dot products poorly (Rendle et al. 2020); the deep part models what a dot product cannot.
    self.gmf = nnx.data({t.name: nnx.Linear(embed_dim, t.units, use_bias=False, rngs=rngs,
                                            kernel_init=nnx.initializers.ones_init())
                         for t in tasks} if mc.gmf else {})
    large = [s for s in specs if s.large]
    self.id_biases = nnx.data({
        t.name: {s.name: nnx.Param(jnp.zeros((s.vocab_size,), jnp.float32), axes=('vocab',)) for s in large}
        for t in tasks if mc.id_biases and t.kind != 'multiclass'})
    if mc.loss_weighting == 'uncertainty':  # log sigma^2 per task (Kendall et al. 2018)
      self.log_vars = nnx.Param(jnp.zeros((len(all_tasks),), jnp.float32), axes=('task',))
    else:
      self.log_vars = None

  def table_inputs(self) -> dict[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """{parameter path (nnx.to_pure_dict layout): batch inputs (entity, feature)} for every row-sharded table: the
    id inputs that index it. What reads those tables, stated as data (the fixed-order gradient uses it)."""
    out = {('embeddings', 'tables', s.name): ((s.entity, s.name),) for s in self.embeddings.specs if s.large}
    for s in self.embeddings.specs:  # a history reads the table of the id feature it pools
      if s.kind == 'history' and ('embeddings', 'tables', s.encoding['of']) in out:
        out['embeddings', 'tables', s.encoding['of']] += ((s.entity, s.name),)
    for task, tables in self.id_biases.items():
      out.update({('id_biases', task, feature): ((self.entities[feature], feature),) for feature in tables})
    return out

  def _vectors(self, features: dict[str, dict[str, jax.Array]]) -> list[tuple[FeatureSpec, jax.Array]]:
    """(spec, vector [B, dim]) of every feature of the entities `features` holds, in declaration order. A history
    leaves out the example's own id of the table it pools when `features` holds it (training and pair scoring), and
    nothing when it does not (one side alone: a retrieval tower's vectors)."""
    out = []
    for spec in self.embeddings.specs:
      if spec.entity not in features:
        continue
      exclude = None
      if spec.kind == 'history':
        of = spec.encoding['of']
        exclude = features.get(self.entities[of], {}).get(of)
      out.append((spec, self.embeddings.embed(spec, features[spec.entity][spec.name], exclude)))
    return out

  def retrieval_vectors(self, task: str, features: dict[str, dict[str, jax.Array]]) -> jax.Array:
    """[B, dim]: the retrieval task's unit query vectors when `features` holds {'user', 'context'} features, its
    item vectors when it holds {'item'} (one side only: what retrieve-then-rerank precomputes and matches)."""
    vecs = [e for _, e in self._vectors(features)]
    towers = self.towers[task]
    return towers.candidate(jnp.concatenate(vecs, -1)) if 'item' in features else towers.query(
        jnp.concatenate(vecs, -1))

  def __call__(self, features: dict[str, dict[str, jax.Array]], rng: jax.Array | None = None,
               tower_rows: dict[str, tuple[jax.Array, int]] | None = None
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """`tower_rows`: {retrieval task: (rows [B], bound)}, the only rows whose tower outputs are read (the loss's);
    the others' are zeros (Towers.on_rows). None: every row's."""
    return self._forward(self._vectors(features), features, rng, tower_rows)

  def cross(self, query: dict[str, dict[str, jax.Array]],
            items: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Outputs [U * I] of every (user, item) pair of `query` ({'user', 'context'} features [U]) x `items` (item
    features [I]), row u * I + i: each side's feature vectors computed once (U + I rows, not U x I: a history of L
    ids costs U x L lookups, not U x I x L), then paired. Histories are pooled whole, no pair's own id left out:
    that changes only the pairs a history holds, i.e. the items a user interacted with in training, which a
    catalog ranking excludes. Evaluation mode (no dropout)."""
    nu, ni = jax.tree.leaves(query['user'])[0].shape[0], jax.tree.leaves(items)[0].shape[0]
    pair = lambda x, side: jnp.repeat(x, ni, axis=0) if side != 'item' else jnp.tile(x, (nu,) + (1,) * (x.ndim - 1))
    vecs = {spec.name: (spec, pair(e, spec.entity)) for spec, e in [*self._vectors(query),
                                                                  *self._vectors({'item': items})]}
    sides = {**query, 'item': items}
    ids = {entity: {name: pair(sides[entity][name], entity) for name in names}  # what the id biases read per row
           for entity, names in self._id_bias_inputs().items()}
    outputs, _ = self._forward([vecs[s.name] for s in self.embeddings.specs if s.name in vecs], ids, None)
    return outputs

  def _id_bias_inputs(self) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for feature in sorted({f for tables in self.id_biases.values() for f in tables}):
      out.setdefault(self.entities[feature], []).append(feature)
    return out

  def _forward(self, vectors: list[tuple[FeatureSpec, jax.Array]], features: dict[str, dict[str, jax.Array]],
               rng: jax.Array | None, tower_rows: dict[str, tuple[jax.Array, int]] | None = None
               ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Outputs from the feature vectors (`_vectors`, declaration order); `features` gives the id biases' ids."""
    feats, user_vecs, item_vecs, sq = [], [], [], 0.0
    for spec, e in vectors:
      feats.append(e)
      (item_vecs if spec.entity == 'item' else user_vecs).append(e)
      if spec.large:
        sq = sq + jnp.sum(e * e, axis=-1)
    product = sum(user_vecs) * sum(item_vecs)
    if self.interaction:
      feats.append(product)
    x = jnp.concatenate(feats, axis=-1)
    reps = self.backbone(x, None if rng is None else jax.random.fold_in(rng, 1))
    out = {}
    for j, (name, head) in enumerate(self.heads.items()):
      y = head(reps[name], None if rng is None else jax.random.fold_in(rng, 10 + j))
      if name in self.gmf:
        y = y + self.gmf[name](product)
      if self.kinds[name] == 'multiclass':
        out[name] = y
        continue
      y = y[..., 0]
      for feature, table in self.id_biases.get(name, {}).items():
        y = y + jnp.take(table[...], features[self.entities[feature]][feature], axis=0)
      out[name] = y
    for j, (name, towers) in enumerate(self.towers.items()):
      args = (jnp.concatenate(user_vecs, axis=-1), jnp.concatenate(item_vecs, axis=-1))
      task_rng = None if rng is None else jax.random.fold_in(rng, 100 + j)
      if tower_rows and name in tower_rows:
        out[name] = towers.on_rows(*args, *tower_rows[name], task_rng)
      else:
        out[name] = towers(*args, task_rng)
    return out, {'embedding_sq_norm': sq}


def build(config: Any, features: Sequence[FeatureSpec], tasks: Sequence[TaskSpec]) -> MultiTaskModel:
  """The model of `config` for these features and tasks, initialized from config.seed."""
  return MultiTaskModel(features, tasks, config.model, config.model.embed_dim, nnx.Rngs(params=config.seed))

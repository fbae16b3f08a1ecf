"""Task specs: label, rows, head kind, loss, weight and metrics of each declared task (apart from the network).

A task's label is the log column it names (a threshold of it for binary heads, its declared values in class order
for multiclass heads), or 'observed' — implicit feedback: 1 on every log row, 0 on sampled negatives. A task is
defined on 'all' rows (log rows and sampled negatives, which are negatives of a binary task) or on 'observed' rows
(log rows only); a log row whose label is missing is not defined for that task either.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_rec import config as config_lib
from mtl_rec import metrics as metrics_lib
from mtl_rec.data import readers
from mtl_rec.data.types import Dataset, shown
from mtl_rec.errors import DataError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str  # 'binary' | 'multiclass' | 'regression' | 'retrieval'
  label: str  # a log column, or 'observed'
  weight: float  # static loss weight
  fusion_weight: float  # default weight in the fused ranking score
  rows: str = 'observed'  # 'all' (log rows and sampled negatives) or 'observed'
  threshold: float | None = None  # binary from a numeric column; multiclass: classes counted as positive
  values: tuple[Any, ...] = ()  # multiclass: the label values in class order
  value_range: tuple[float, float] | None = None  # regression and multiclass: the scale of the task's value
  bias_init: float = 0.0  # the head's initial output bias (regression: the training mean)
  temperature: float = 0.05  # retrieval: softmax temperature of the towers' cosine similarity
  logq: bool = True  # retrieval: subtract log q(item) in the in-batch softmax
  dim: int = 0  # retrieval: the towers' output width; 0 = the embedding width
  tower: tuple[int, ...] | None = None  # retrieval: the towers' hidden widths; None = model.hidden_dims
  negatives: str = 'in_batch'  # retrieval: 'in_batch' (observed rows' items) or 'mixed' (and the sampled negatives')

  @property
  def all_rows(self) -> bool:
    return self.rows == 'all'

  @property
  def implicit(self) -> bool:
    return self.label == config_lib.OBSERVED

  @property
  def units(self) -> int:
    """Outputs of the head: 1, or one per class."""
    return len(self.values) if self.kind == 'multiclass' else 1

  @property
  def class_values(self) -> np.ndarray:
    """Multiclass: each class's value (the declared values where numeric, else the class index)."""
    try:
      return np.asarray([float(v) for v in self.values], np.float32)
    except (TypeError, ValueError):
      return np.arange(len(self.values), dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class LabelColumn:
  """A task's label on every log row (float32, or int32 class indices) and whether the row has one."""

  values: np.ndarray
  present: np.ndarray  # bool


def _finite_or_missing(x: np.ndarray, column: str, ds: Dataset, what: str) -> np.ndarray:
  """The label column as read (NaN: the row has no label); raises DataError at an infinite label, which no loss
  or metric can use (it used to be taken for a missing one and dropped without a word)."""
  bad = np.flatnonzero(np.isinf(x))
  if bad.size:
    raise DataError(f'interaction log: {ds.where("log", int(bad[0]))}: column {column!r} holds {x[bad[0]]}, '
                    f'which {what} cannot learn from; labels are finite numbers (leave the cell empty for no label)')
  return x


def label_columns(config: ml_collections.ConfigDict, ds: Dataset) -> dict[str, LabelColumn]:
  """{task: its label on every log row}; raises DataError at the first row whose label is outside what the task
  declares (not 0/1, out of range, not one of the classes), naming the file, column and fix."""
  out = {}
  origins = ds.origins.get('log', ())
  for name, t in config_lib.ordered(config.tasks):
    if t.label == config_lib.OBSERVED:
      out[name] = LabelColumn(np.ones(ds.num_rows, np.float32), np.ones(ds.num_rows, bool))
      continue
    raw = ds.log[t.label]
    what = f"task '{name}'"
    if t.kind == 'multiclass':
      classes = {v: j for j, v in enumerate(t.classes)}
      # numbers, or text classes ('1', '2') of a number column (one with empty cells holds 1.0, whose text is no class)
      numeric = all(isinstance(v, (int, float)) for v in t.classes) or (
          np.asarray(raw).dtype.kind in 'iuf' and all(readers.is_number(v, finite=True) for v in t.classes))
      if numeric:
        x = _finite_or_missing(readers.numeric(raw, t.label, origins, 'interaction log', what), t.label, ds, what)
        present = ~np.isnan(x)
        keys = np.asarray([float(v) for v in t.classes])
        idx = np.searchsorted(np.sort(keys), x)
        pos = np.argsort(keys)[np.minimum(idx, keys.size - 1)]
        ok = ~present | (keys[pos] == x)
        values = np.where(present, pos, 0)
      else:
        text = np.asarray(raw).astype(np.str_)
        present = text != ''
        values = np.asarray([classes.get(v, -1) for v in text])
        ok = ~present | (values >= 0)
      bad = np.flatnonzero(~ok)
      if bad.size:
        raise DataError(f'interaction log: {ds.where("log", int(bad[0]))}: column {t.label!r} holds '
                        f'{shown(raw[bad[0]])}, which is not one of the classes {tuple(t.classes)} of {what}; add it to '
                        f'tasks.{name}.classes or fix the row')
      out[name] = LabelColumn(np.where(present, values, 0).astype(np.int32), present)
      continue
    x = _finite_or_missing(readers.numeric(raw, t.label, origins, 'interaction log', what), t.label, ds, what)
    present = ~np.isnan(x)
    if t.kind == 'binary' and t.threshold is not None:
      out[name] = LabelColumn(np.where(present, x >= t.threshold, 0).astype(np.float32), present)
      continue
    if t.kind == 'binary':
      bad = np.flatnonzero(present & (x != 0) & (x != 1))
      fix = f'binary labels are 0 or 1: give tasks.{name}.threshold to turn the column into one, or fix the row'
    elif t.range:
      bad = np.flatnonzero(present & ((x < t.range[0]) | (x > t.range[1])))
      fix = f'the declared range of tasks.{name} is {tuple(t.range)}: widen it or fix the row'
    else:
      bad = np.zeros(0, int)
    if bad.size:
      raise DataError(f'interaction log: {ds.where("log", int(bad[0]))}: column {t.label!r} holds {x[bad[0]]:g}, '
                      f'outside what {what} declares; {fix}')
    out[name] = LabelColumn(np.where(present, x, 0).astype(np.float32), present)
  return out


def task_specs(config: ml_collections.ConfigDict, labels: dict[str, LabelColumn], train_rows: np.ndarray,
               ranges: dict[str, tuple[float, float]] | None = None) -> tuple[TaskSpec, ...]:
  """The tasks of config.tasks; a regression head takes its scale (declared, else the data's range: `ranges`
  {task: (lo, hi)} where the labels at hand are a sample of the log's, a streamed log's survey) and initial
  bias (the training mean) from its label. Raises DataError for a binary label of one class in the training rows
  (nothing to learn, no AUC to report: a threshold beyond the data's range, or a column of one value)."""
  out = []
  for name, t in config_lib.ordered(config.tasks):
    spec = TaskSpec(name, t.kind, t.label, float(t.weight), float(t.fusion_weight), rows=t.rows,
                    threshold=None if t.threshold is None else float(t.threshold), values=tuple(t.classes),
                    temperature=float(t.temperature), logq=bool(t.logq),
                    negatives=str(t.negatives), dim=int(t.dim),
                    tower=None if t.tower is None else tuple(int(w) for w in t.tower))
    col = labels[name]
    if t.kind == 'regression':
      train = col.values[train_rows][col.present[train_rows]]
      have = col.values[col.present]
      whole = (ranges or {}).get(name, (np.nan, np.nan))  # the whole log's (a streamed log: its survey's)
      if not t.range and np.isfinite(whole).all():
        have = np.asarray(whole, np.float32)
      if not t.range and not have.size:
        raise DataError(f"task '{name}': column {t.label!r} holds no value in the rows its scale is taken from "
                        f"(every row of the log): declare tasks.{name}.range=(lo, hi), or fill the column")
      value_range = tuple(map(float, t.range)) if t.range else (float(have.min()), float(have.max()))
      spec = dataclasses.replace(spec, value_range=value_range, bias_init=float(train.mean()) if train.size else 0.0)
    elif t.kind == 'binary' and t.label != config_lib.OBSERVED:
      train = col.values[train_rows][col.present[train_rows]]
      if train.size and train.min() == train.max():
        how = (f'column {t.label!r} >= tasks.{name}.threshold={t.threshold}' if t.threshold is not None
               else f'column {t.label!r}')
        raise DataError(f"task '{name}': every one of the {train.size:,} training labels ({how}) is "
                        f'{int(train[0])}; a binary task needs both classes: check the threshold or the column')
    elif t.kind == 'multiclass':
      cv = spec.class_values
      spec = dataclasses.replace(spec, value_range=(float(cv.min()), float(cv.max())))
    out.append(spec)
  return tuple(out)


def esmm_pair(specs: tuple[TaskSpec, ...]) -> tuple[str, str]:
  """ESMM's (implicit task, the first binary task on observed rows)."""
  implicit = next(s.name for s in specs if s.implicit and s.kind == 'binary')
  conditional = next(s.name for s in specs if s.kind == 'binary' and not s.all_rows)
  return implicit, conditional


def loss_masks(batch: dict[str, Any], specs: tuple[TaskSpec, ...], esmm: bool = False) -> dict[str, jax.Array]:
  """{task: [B] 0/1 mask of the rows its loss is defined on} (an ESMM conditional head: every valid row; a retrieval
  head: the observed rows)."""
  valid, defined = batch['valid'], batch['defined']
  masks = {s.name: valid * (batch['labels'][s.name] if s.kind == 'retrieval' else defined[s.name]) for s in specs}
  if esmm:
    masks[esmm_pair(specs)[1]] = valid
  return masks


def normalizers(batch: dict[str, Any], specs: tuple[TaskSpec, ...], esmm: bool = False) -> dict[str, Any]:
  """The whole batch's denominators of the mean losses: rows per task mask, and valid rows. Sums of 0/1 values, so
  they are exact in any order; a loss summed over parts of the batch divides by these."""
  masks = loss_masks(batch, specs, esmm)
  return {'tasks': {k: jnp.maximum(jnp.sum(m), 1.0) for k, m in masks.items()},
          'valid_rows': jnp.maximum(jnp.sum(batch['valid']), 1.0)}


def loss_terms(outputs: dict[str, jax.Array], batch: dict[str, Any], specs: tuple[TaskSpec, ...],
               esmm: bool = False) -> dict[str, jax.Array]:
  """{task: [B] per-row loss}, before masking (see `loss_masks`) and averaging."""
  labels = batch['labels']
  terms = {}
  for s in specs:
    out = outputs[s.name]
    if s.kind == 'binary':
      terms[s.name] = optax.sigmoid_binary_cross_entropy(out, labels[s.name])
    elif s.kind == 'retrieval':
      terms[s.name] = in_batch_softmax(out, labels[s.name] * batch['valid'], batch['item_key'],
                                       batch['logq'] if s.logq else jnp.zeros_like(batch['logq']), s.temperature,
                                       batch['valid'] if s.negatives == 'mixed' else None)
    elif s.kind == 'regression':
      terms[s.name] = jnp.square(out - labels[s.name])
    else:
      terms[s.name] = optax.softmax_cross_entropy_with_integer_labels(out, labels[s.name])
  if esmm:
    # ESMM: the conditional head is P(y | observed); it is trained through P(observed & y) = P(observed) P(y | obs.)
    # on every row, which removes the sample-selection bias of training it on observed rows only.
    implicit, conditional = esmm_pair(specs)
    p = jax.nn.sigmoid(outputs[implicit]) * jax.nn.sigmoid(outputs[conditional])
    target = labels[implicit] * labels[conditional]
    terms[conditional] = -(target * jnp.log(p + 1e-7) + (1 - target) * jnp.log(1 - p + 1e-7))
  return terms


def tower_share(num_negatives: int) -> float:
  """The share of a batch's rows a retrieval task's towers are computed for at most (`tower_rows`): twice the
  observed rows' expected share, 1 / (1 + num_negatives). A batch of 128 rows with 4 negatives per observed row holds
  25.6 observed rows on average (sd 4.5) and its towers run on 52: more than 52 is a 5.8 sd event, and then they
  run on all 128, the same numbers."""
  return 2.0 / (1 + num_negatives)


def tower_rows(batch: dict[str, Any], specs: tuple[TaskSpec, ...], share: float) -> dict[str, tuple[jax.Array, int]]:
  """{retrieval task: (the rows its loss reads [B], at most how many of them the towers run on at once)} for the
  model (MultiTaskModel.__call__): with in-batch negatives the observed, valid rows; with mixed negatives every valid
  row (every row is a softmax column), so no task of those is listed."""
  n = batch['valid'].shape[0]
  return {s.name: (batch['labels'][s.name] * batch['valid'], min(n, math.ceil(n * share)))
          for s in specs if s.kind == 'retrieval' and s.negatives != 'mixed'}


def in_batch_softmax(towers: jax.Array, positive: jax.Array, item: jax.Array, logq: jax.Array,
                     temperature: float, candidates: jax.Array | None = None) -> jax.Array:
  """[B] the retrieval loss of each positive row (0 elsewhere): softmax cross-entropy of its own item against the
  items of the batch's other positive rows (Yi et al. 2019), or of its other `candidates` rows.

  towers: [B, 2, d] each row's user and item tower outputs (unit vectors); positive: [B] 1 on observed, valid rows;
  item: [B] the rows' item keys; logq: [B] log of each row's item's sampling probability; candidates: [B] 1 on the
  rows whose items are columns of the softmax (default `positive`; mixed negative sampling adds the sampled-negative
  rows, Yang et al. 2020). Logit (i, j) = u_i . v_j / temperature - logq_j (frequent items, often in a batch, would
  otherwise be pushed down for it); a column j != i holding row i's own item (an accidental hit) and columns of
  rows that are not candidates are left out.
  """
  u, v = towers[:, 0], towers[:, 1]
  logits = (u @ v.T) / temperature - logq[None, :]
  candidates = positive if candidates is None else jnp.maximum(candidates, positive)
  keep = (candidates[None, :] > 0) & ((item[:, None] != item[None, :]) | jnp.eye(item.shape[0], dtype=bool))
  logits = jnp.where(keep, logits, -1e9)
  loss = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
  return jnp.where(positive > 0, loss, 0.0)


def masked_sums(outputs: dict[str, jax.Array], batch: dict[str, Any], specs: tuple[TaskSpec, ...],
                esmm: bool = False) -> dict[str, jax.Array]:
  """{task: sum of its row losses over the rows it is defined on}; divided by `normalizers`' counts, the mean loss.
  Rows a task is not defined on (and padding rows) contribute nothing."""
  terms, masks = loss_terms(outputs, batch, specs, esmm), loss_masks(batch, specs, esmm)
  return {k: jnp.sum(terms[k] * masks[k]) for k in terms}


def weighted_loss(per_task: dict[str, jax.Array], specs: tuple[TaskSpec, ...],
                  log_vars: jax.Array | None = None) -> jax.Array:
  """The weighted sum of per-task losses (linear in them: per-part losses add up to the batch's). Under uncertainty
  weighting each task's loss is scaled by a learned precision exp(-s); the `+ s` that keeps s finite is
  `uncertainty_weights` . s, which depends on the parameters alone."""
  weights = jnp.asarray([s.weight for s in specs], jnp.float32)
  stacked = jnp.stack([per_task[s.name] for s in specs])
  if log_vars is None:
    return jnp.sum(weights * stacked)
  return jnp.sum(weights * (jnp.exp(-log_vars) * stacked))


def uncertainty_weights(specs: tuple[TaskSpec, ...]) -> jax.Array:
  """d(uncertainty regularizer)/d(log_vars): the static task weights (Kendall et al. 2018's sum_t w_t s_t)."""
  return jnp.asarray([s.weight for s in specs], jnp.float32)


def predictions(outputs: dict[str, jax.Array], specs: tuple[TaskSpec, ...]) -> dict[str, jax.Array]:
  """Probabilities for binary heads, class probabilities for multiclass, values for regression."""
  preds = {}
  for s in specs:
    out = outputs[s.name]
    if s.kind == 'retrieval':  # the towers' cosine similarity
      preds[s.name] = jnp.sum(out[..., 0, :] * out[..., 1, :], axis=-1)
      continue
    preds[s.name] = (jax.nn.sigmoid(out) if s.kind == 'binary' else jax.nn.softmax(out, -1)
                     if s.kind == 'multiclass' else out)
  return preds


def task_value(pred: jax.Array, spec: TaskSpec) -> jax.Array:
  """One number per row from a task's prediction (`predictions`): the probability of a binary head, the predicted
  value of a regression head, the expected class value sum_c v_c * p_c of a multiclass head."""
  if spec.kind == 'multiclass':
    return (pred * jnp.asarray(spec.class_values, pred.dtype)).sum(-1)
  return pred


def fusion_term(value: jax.Array, spec: TaskSpec) -> jax.Array:
  """s_t: a task value (`task_value`) on the [0, 1] scale of the fused score: p, or (v - lo) / (hi - lo)."""
  if spec.kind == 'binary':
    return value
  if spec.kind == 'retrieval':  # cosine in [-1, 1]
    return (value + 1.0) / 2.0
  lo, hi = spec.value_range
  return (value - lo) / (hi - lo)


def task_metrics(spec: TaskSpec, pred: np.ndarray, labels: np.ndarray, defined: np.ndarray) -> dict[str, float]:
  """Host-side metrics of one task over the rows it is defined on (valid rows only are passed in)."""
  n = spec.name
  rows = defined > 0
  if spec.kind == 'binary':
    y, p = labels[rows], pred[rows]
    out = {f'{n}_auc': metrics_lib.auc(y, p), f'{n}_logloss': metrics_lib.logloss(y, p)}
    if not spec.implicit:
      out[f'{n}_accuracy'] = metrics_lib.accuracy(y, p)
    return out
  if spec.kind == 'retrieval':  # its score against sampled negatives
    return {f'{n}_auc': metrics_lib.auc(labels[rows], pred[rows])}
  if spec.kind == 'regression':
    y, p = labels[rows], np.clip(pred[rows], *spec.value_range)
    return {f'{n}_rmse': metrics_lib.rmse(y, p), f'{n}_mae': metrics_lib.mae(y, p)}
  probs, y = pred[rows], labels[rows]
  out = {f'{n}_class_accuracy': float(np.mean(probs.argmax(-1) == y))}
  if spec.threshold is None:
    p_true = np.clip(probs[np.arange(y.size), y], 1e-7, 1.0)
    out[f'{n}_class_logloss'] = float(-np.mean(np.log(p_true)))
    return out
  positive = spec.class_values >= spec.threshold
  p_pos = probs[:, positive].sum(-1)
  y_pos = positive[y].astype(np.float32)
  out.update({f'{n}_auc': metrics_lib.auc(y_pos, p_pos), f'{n}_logloss': metrics_lib.logloss(y_pos, p_pos),
              f'{n}_accuracy': metrics_lib.accuracy(y_pos, p_pos)})
  return out

"""Task specs: which label, mask, head kind, loss, weight and metrics each task has (apart from the network)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_rec import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str  # 'binary' | 'multiclass' | 'regression'
  label: str  # 'click' | 'like' | 'rating' | 'rating_class'
  weight: float  # static loss weight
  fusion_weight: float  # default weight in the fused ranking score
  value_range: tuple[float, float] | None = None  # rating labels: the scale (lowest, highest rating) of the data
  threshold: float | None = None  # like and rating_class: like = rating >= threshold
  bias_init: float = 0.0  # the head's initial output bias (regression: the training mean)

  @property
  def all_rows(self) -> bool:
    """click is defined on every row (observed and sampled); the others only on observed pairs."""
    return self.label == 'click'

  @property
  def units(self) -> int:
    """Outputs of the head: 1, or one per rating class."""
    if self.kind != 'multiclass':
      return 1
    lo, hi = self.value_range
    return int(round(hi - lo)) + 1


def task_specs(config: Any, rating_range: tuple[float, float], rating_mean: float) -> tuple[TaskSpec, ...]:
  """The tasks of `config.tasks`; rating labels take their scale and head init from the data."""
  out = []
  for name, t in config.tasks.items():
    rated = t.label in ('rating', 'rating_class')
    out.append(TaskSpec(name, t.kind, t.label, float(t.weight), float(t.fusion_weight),
                        value_range=tuple(map(float, rating_range)) if rated else None,
                        threshold=float(config.data.like_threshold) if t.label in ('like', 'rating_class') else None,
                        bias_init=float(rating_mean) if t.kind == 'regression' else 0.0))
  return tuple(out)


def loss_masks(batch: dict[str, Any], specs: tuple[TaskSpec, ...], esmm: bool = False) -> dict[str, jax.Array]:
  """{task: [B] 0/1 mask of the rows its loss is defined on}: click on every valid row, the others on observed ones
  (an ESMM like head on every valid row, see `loss_terms`)."""
  valid, observed = batch['valid'], batch['observed']
  masks = {s.name: valid if s.all_rows else valid * observed for s in specs}
  if esmm:
    masks[_esmm_pair(specs)[1]] = valid
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
      terms[s.name] = optax.sigmoid_binary_cross_entropy(out, labels[s.label])
    elif s.kind == 'regression':
      terms[s.name] = jnp.square(out - labels[s.label])
    else:
      terms[s.name] = optax.softmax_cross_entropy_with_integer_labels(out, labels[s.label])
  if esmm:
    # ESMM: the like head is P(like | click); it is trained through P(click & like) = P(click) P(like | click) on
    # every row, which removes the sample-selection bias of training it on observed pairs only.
    click, like = _esmm_pair(specs)
    p = jax.nn.sigmoid(outputs[click]) * jax.nn.sigmoid(outputs[like])
    target = labels['click'] * labels['like']
    terms[like] = -(target * jnp.log(p + 1e-7) + (1 - target) * jnp.log(1 - p + 1e-7))
  return terms


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
  `uncertainty_regularizer`, which depends on the parameters alone."""
  weights = jnp.asarray([s.weight for s in specs], jnp.float32)
  stacked = jnp.stack([per_task[s.name] for s in specs])
  if log_vars is None:
    return jnp.sum(weights * stacked)
  return jnp.sum(weights * (jnp.exp(-log_vars) * stacked))


def uncertainty_weights(specs: tuple[TaskSpec, ...]) -> jax.Array:
  """d(uncertainty regularizer)/d(log_vars): the static task weights (Kendall et al. 2018's sum_t w_t s_t)."""
  return jnp.asarray([s.weight for s in specs], jnp.float32)


def _esmm_pair(specs: tuple[TaskSpec, ...]) -> tuple[str, str]:
  click = next(s.name for s in specs if s.label == 'click')
  like = next(s.name for s in specs if s.label == 'like')
  return click, like


def predictions(outputs: dict[str, jax.Array], specs: tuple[TaskSpec, ...]) -> dict[str, jax.Array]:
  """Probabilities for binary heads, class probabilities for multiclass, values for regression."""
  preds = {}
  for s in specs:
    out = outputs[s.name]
    preds[s.name] = (jax.nn.sigmoid(out) if s.kind == 'binary' else jax.nn.softmax(out, -1)
                     if s.kind == 'multiclass' else out)
  return preds


def task_value(pred: jax.Array, spec: TaskSpec) -> jax.Array:
  """One number per row from a task's prediction (`predictions`): the probability of a binary head, the predicted
  rating of a regression head, the expected rating sum_c c * p_c of a multiclass head."""
  if spec.kind == 'multiclass':
    lo = spec.value_range[0]
    return (pred * (jnp.arange(pred.shape[-1], dtype=pred.dtype) + lo)).sum(-1)
  return pred


def fusion_term(value: jax.Array, spec: TaskSpec) -> jax.Array:
  """s_t: a task value (`task_value`) on the [0, 1] scale of the fused score: p, or (rating - lo) / (hi - lo)."""
  if spec.kind == 'binary':
    return value
  lo, hi = spec.value_range
  return (value - lo) / (hi - lo)


def task_metrics(spec: TaskSpec, pred: np.ndarray, labels: dict[str, np.ndarray],
                 observed: np.ndarray) -> dict[str, float]:
  """Host-side metrics of one task over the rows it is defined on (valid rows only are passed in)."""
  n = spec.name
  rows = np.ones_like(observed, bool) if spec.all_rows else observed > 0
  if spec.kind == 'binary':
    y, p = labels[spec.label][rows], pred[rows]
    out = {f'{n}_auc': metrics_lib.auc(y, p), f'{n}_logloss': metrics_lib.logloss(y, p)}
    if spec.label != 'click':
      out[f'{n}_accuracy'] = metrics_lib.accuracy(y, p)
    return out
  if spec.kind == 'regression':
    y, p = labels[spec.label][rows], np.clip(pred[rows], *spec.value_range)
    return {f'{n}_rmse': metrics_lib.rmse(y, p), f'{n}_mae': metrics_lib.mae(y, p)}
  probs, y = pred[rows], labels['rating_class'][rows]
  first_like_class = int(np.ceil(spec.threshold - spec.value_range[0]))
  p_like = probs[:, first_like_class:].sum(-1)
  y_like = (y >= first_like_class).astype(np.float32)
  return {f'{n}_class_accuracy': float(np.mean(probs.argmax(-1) == y)),
          f'{n}_auc': metrics_lib.auc(y_like, p_like), f'{n}_logloss': metrics_lib.logloss(y_like, p_like),
          f'{n}_accuracy': metrics_lib.accuracy(y_like, p_like)}

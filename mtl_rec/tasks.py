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

  @property
  def all_rows(self) -> bool:
    """click is defined on every row (observed and sampled); the others only on observed pairs."""
    return self.label == 'click'


def task_specs(config: Any) -> tuple[TaskSpec, ...]:
  return tuple(TaskSpec(name, t.kind, t.label, float(t.weight), float(t.fusion_weight))
               for name, t in config.tasks.items())


def loss_masks(batch: dict[str, Any], specs: tuple[TaskSpec, ...], esmm: bool = False) -> dict[str, jax.Array]:
  """{task: [B] 0/1 mask of the rows its loss is defined on}: click on every valid row, the others on observed ones
  (an ESMM like head on every valid row, see `loss_terms`)."""
  valid, observed = batch['valid'], batch['observed']
  masks = {s.name: valid if s.all_rows else valid * observed for s in specs}
  if esmm:
    masks[_esmm_pair(specs)[1]] = valid
  return masks


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


def total_loss(per_task: dict[str, jax.Array], specs: tuple[TaskSpec, ...], log_vars: jax.Array | None = None,
               regularizer: bool | jax.Array = True) -> jax.Array:
  """The weighted sum of per-task losses. Linear in them, so a sum of per-group partial losses gives the whole
  batch's; uncertainty weighting's `+ s` regularizer then belongs to one group only (`regularizer` 1 there, 0
  elsewhere)."""
  weights = jnp.asarray([s.weight for s in specs], jnp.float32)
  stacked = jnp.stack([per_task[s.name] for s in specs])
  if log_vars is None:
    return jnp.sum(weights * stacked)
  # uncertainty weighting: each task's loss scaled by a learned precision exp(-s) plus s as regularizer
  return jnp.sum(weights * (jnp.exp(-log_vars) * stacked + log_vars * regularizer))


def losses(outputs: dict[str, jax.Array], batch: dict[str, Any], specs: tuple[TaskSpec, ...], esmm: bool = False,
           log_vars: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(total loss, {task: masked mean loss}). Rows a task is not defined on contribute nothing to its loss."""
  masks, terms = loss_masks(batch, specs, esmm), loss_terms(outputs, batch, specs, esmm)
  per_task = {s.name: jnp.sum(terms[s.name] * masks[s.name]) / jnp.maximum(jnp.sum(masks[s.name]), 1.0)
              for s in specs}
  return total_loss(per_task, specs, log_vars), per_task


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


RATING_MIN, RATING_MAX = 1.0, 5.0


def task_value(pred: jax.Array, spec: TaskSpec) -> jax.Array:
  """One number per row from a task's prediction (`predictions`): the probability of a binary head, the predicted
  rating of a regression head, the expected rating sum_c c * p_c of a multiclass head."""
  if spec.kind == 'multiclass':
    return (pred * jnp.arange(1, pred.shape[-1] + 1, dtype=pred.dtype)).sum(-1)
  return pred


def fusion_term(value: jax.Array, spec: TaskSpec) -> jax.Array:
  """s_t: a task value (`task_value`) on the [0, 1] scale of the fused score: p, or (rating - 1) / 4."""
  if spec.kind == 'binary':
    return value
  return (value - RATING_MIN) / (RATING_MAX - RATING_MIN)


def ranking_score(preds: dict[str, jax.Array], spec: TaskSpec, like_threshold: float) -> jax.Array:
  """One scalar per row to rank items by, from a task's prediction."""
  return task_value(preds[spec.name], spec)


def task_metrics(spec: TaskSpec, pred: np.ndarray, labels: dict[str, np.ndarray], observed: np.ndarray,
                 like_threshold: float) -> dict[str, float]:
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
    y, p = labels[spec.label][rows], np.clip(pred[rows], 1.0, 5.0)
    return {f'{n}_rmse': metrics_lib.rmse(y, p), f'{n}_mae': metrics_lib.mae(y, p)}
  probs, y = pred[rows], labels['rating_class'][rows]
  first_like_class = int(np.ceil(like_threshold)) - 1
  p_like = probs[:, first_like_class:].sum(-1)
  y_like = (y >= first_like_class).astype(np.float32)
  return {f'{n}_class_accuracy': float(np.mean(probs.argmax(-1) == y)),
          f'{n}_auc': metrics_lib.auc(y_like, p_like), f'{n}_logloss': metrics_lib.logloss(y_like, p_like),
          f'{n}_accuracy': metrics_lib.accuracy(y_like, p_like)}

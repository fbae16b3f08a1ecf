"""Fusion weights fitted on the validation split: fixed, learned (ListNet), stacking, and the served default.

The fused ranking score is score(u, i) = sum_t w_t * s_t(u, i), each task score s_t on [0, 1] (mtl_rec.scoring).
Methods (all fitted on the validation split only; the test split is never looked at):
  fixed     `config.tasks[t].fusion_weight`.
  learned   gradient descent (optax Adam) on a listwise softmax cross-entropy (ListNet, Cao et al. 2007): per
            validation user, a list of that user's held-out validation items (gain = eval.gain_column's value, e.g.
            the rating, else 1) and `num_negatives` sampled items the user never interacted with in train or
            validation (gain 0); the target distribution is proportional to the gains, the model distribution is
            softmax(fused score). It rewards ranking held-out items above the others and high gains above low ones
            — what graded NDCG measures.
  stacking  a logistic-regression meta-model over the same list entries: sigmoid(b + v . s) fitted pointwise to
            the soft label gain / (highest gain) (L2-regularized, optax). Its ranking is that of v . s, so it
            exports as fusion weights v like the other two.

The served default (`select_default`): among fixed, learned, stacking and every single head's one-hot weights, the
weights whose full-catalog Recall@K on validation is best, so the list a client gets by default ranks at least as
well on validation as any one head alone (used by the unified model's training, mtl_rec.loop). The ensemble
(mtl_rec.fusion) and the benchmark use the fits and `evaluate_fusion`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_rec import config as config_lib
from mtl_rec import evaluation
from mtl_rec import metrics as metrics_lib
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.experiment import Experiment
from mtl_rec.scoring import NetworkScorer

FUSION_METHODS = ('fixed', 'learned', 'stacking')


@dataclasses.dataclass
class FusionLists:
  """Per-user candidate lists: held-out items (their gain) then sampled unseen items (gain 0), padded."""

  scores: np.ndarray  # float32 [U, L, T] normalized task scores
  gains: np.ndarray  # float32 [U, L]
  mask: np.ndarray  # bool [U, L]; False on padding


def build_lists(scorer: NetworkScorer, exp: Experiment, heldout_rows: np.ndarray, history_rows: np.ndarray,
                num_negatives: int, seed: int) -> FusionLists:
  """Lists for every user with a held-out row; negatives avoid the user's history and held-out items."""
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  known = np.concatenate([history_rows, heldout_rows])
  sampler = NegativeSampler(exp.user_index[known], exp.item_index[known],
                            np.unique(exp.item_index[history_rows]), exp.num_items)
  users, inverse, counts = np.unique(h_users, return_inverse=True, return_counts=True)
  length = int(counts.max()) + num_negatives
  items = np.zeros((users.size, length), np.int64)
  gains = np.zeros((users.size, length), np.float32)
  mask = np.zeros((users.size, length), bool)
  order = np.argsort(inverse, kind='stable')
  slot = np.arange(order.size) - np.repeat(np.cumsum(counts) - counts, counts)
  items[inverse[order], slot] = h_items[order]
  gains[inverse[order], slot] = exp.gains(heldout_rows)[order]
  mask[inverse[order], slot] = True
  negs = sampler.sample(users, num_negatives, np.random.default_rng([seed, 5]))
  cols = counts[:, None] + np.arange(num_negatives)[None, :]
  items[np.arange(users.size)[:, None], cols] = negs
  mask[np.arange(users.size)[:, None], cols] = True
  context = np.repeat(heldout_rows[order][np.cumsum(counts) - counts], length)  # each user's first held-out row
  flat = scorer.terms_pairs(np.repeat(users, length), items.reshape(-1), context)
  return FusionLists(flat.reshape(users.size, length, -1).astype(np.float32), gains, mask)


def list_ndcg(lists: FusionLists, weights: np.ndarray, k: int) -> float:
  """Graded NDCG@k of the fused score inside the lists (the validation objective's own metric)."""
  f = np.where(lists.mask, lists.scores @ np.asarray(weights, np.float32), -np.inf)
  topk = np.argsort(-f, axis=1, kind='stable')[:, :k]
  rel_u, rel_pos = np.nonzero(lists.gains > 0)
  relevant = metrics_lib.csr_from_pairs(rel_u, rel_pos, lists.gains.shape[0], gains=lists.gains[rel_u, rel_pos])
  return metrics_lib.topk_ranking_metrics(topk, relevant, k)[f'ndcg@{k}_graded']


def listnet_loss(weights: jax.Array, scores: jax.Array, gains: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over users of the cross-entropy between gain-proportional targets and softmax(fused scores)."""
  f = jnp.where(mask, scores @ weights, -1e9)
  logp = jax.nn.log_softmax(f, axis=-1)
  target = gains / jnp.maximum(gains.sum(-1, keepdims=True), 1e-9)
  return -jnp.mean(jnp.sum(target * jnp.where(mask, logp, 0.0), axis=-1))


def _minimize(loss: Callable, init: jax.Array, steps: int, learning_rate: float) -> jax.Array:
  """Full-batch Adam; the problems are tiny (a few parameters) and convex or nearly so."""
  tx = optax.adam(learning_rate)

  def body(_, carry):
    x, opt = carry
    g = jax.grad(loss)(x)
    updates, opt = tx.update(g, opt, x)
    return optax.apply_updates(x, updates), opt
  x, _ = jax.lax.fori_loop(0, steps, body, (init, tx.init(init)))
  return x


def fit_learned_weights(lists: FusionLists, init: np.ndarray, steps: int = 500,
                        learning_rate: float = 0.05) -> np.ndarray:
  """Fusion weights minimizing `listnet_loss` on the lists, started from `init`; returned with sum |w| = 1.

  The scale of w is the softmax temperature, which the loss is free to pick; only the direction ranks, so the
  result is normalized (a positive rescaling changes no ranking).
  """
  scores, gains, mask = (jnp.asarray(a) for a in (lists.scores, lists.gains, lists.mask))
  w = jax.jit(lambda w0: _minimize(lambda w: listnet_loss(w, scores, gains, mask), w0, steps, learning_rate))(
      jnp.asarray(init, jnp.float32))
  w = np.asarray(w, np.float64)
  return (w / max(np.abs(w).sum(), 1e-12)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class StackingModel:
  """Logistic meta-model p = sigmoid(intercept + features . coef) over normalized task scores."""

  coef: np.ndarray  # [T]
  intercept: float

  def predict(self, features: np.ndarray) -> np.ndarray:
    """Probability-like relevance in (0, 1) for task-score features [..., T]."""
    z = np.asarray(features, np.float64) @ self.coef.astype(np.float64) + self.intercept
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

  @property
  def fusion_weights(self) -> np.ndarray:
    """The coefficients with sum |w| = 1: the sigmoid and intercept are monotone, so they rank identically."""
    return (self.coef / max(np.abs(self.coef).sum(), 1e-12)).astype(np.float32)


def fit_stacking(features: np.ndarray, targets: np.ndarray, l2: float = 1e-3, steps: int = 1000,
                 learning_rate: float = 0.05) -> StackingModel:
  """Fits the logistic meta-model to soft targets in [0, 1] (binary cross-entropy + l2 * |coef|^2).

  Features are standardized for the fit (the scores of different heads have very different spreads) and the
  coefficients mapped back, so `predict` takes raw normalized task scores.
  """
  x = np.asarray(features, np.float64)
  y = np.asarray(targets, np.float64)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f'features must be [N, T] and targets [N], got {x.shape} and {y.shape}')
  if x.shape[0] == 0 or np.any((y < 0) | (y > 1)):
    raise ValueError('stacking needs at least one row and targets in [0, 1]')
  mu, sd = x.mean(0), x.std(0)
  sd = np.where(sd > 1e-12, sd, 1.0)
  xs, yj = jnp.asarray((x - mu) / sd, jnp.float32), jnp.asarray(y, jnp.float32)

  def loss(theta):
    z = xs @ theta[:-1] + theta[-1]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, yj)) + l2 * jnp.sum(theta[:-1] ** 2)
  theta = np.asarray(jax.jit(lambda t0: _minimize(loss, t0, steps, learning_rate))(
      jnp.zeros(x.shape[1] + 1, jnp.float32)), np.float64)
  coef = theta[:-1] / sd
  return StackingModel(coef=coef.astype(np.float32), intercept=float(theta[-1] - (mu * coef).sum()))


def fit_fusion(lists: FusionLists, fixed: np.ndarray, max_gain: float) -> dict[str, Any]:
  """Weights of every method (FUSION_METHODS) and the stacking model, all from the validation lists; stacking's soft
  label is gain / `max_gain` (the highest gain)."""
  stack = fit_stacking(lists.scores[lists.mask], lists.gains[lists.mask] / max_gain)
  fixed = np.asarray(fixed, np.float32)
  return {'weights': {'fixed': fixed, 'learned': fit_learned_weights(lists, fixed),
                      'stacking': stack.fusion_weights},
          'stacking_model': stack}


# ---------------------------------------------------------------------------------------------------------------
# Evaluating fused rankings.


def fused_ranking_metrics(scorer: NetworkScorer, exp: Experiment, weights: dict[str, np.ndarray],
                          heldout_rows: np.ndarray, history_rows: np.ndarray) -> dict[str, dict[str, float]]:
  """{method: full-catalog ranking metrics of the fused score as the export serves it}, evaluation's protocol
  (graded NDCG included): with a retrieval stage (config.export.retrieve_n) the fused score re-ranks the retrieval
  task's top N. The catalog's task scores are computed once per batch of users for all methods."""
  stage = config_lib.retrieval_stage(exp.config, scorer.task_names)
  retrieve = None if stage is None else (scorer.task_names.index(stage[0]), stage[1])
  return evaluation.fused_catalog_ranking_metrics(exp, heldout_rows, history_rows, scorer.terms_catalog, weights,
                                                  retrieve=retrieve)


def fixed_weights(config: ml_collections.ConfigDict, task_names: Sequence[str]) -> np.ndarray:
  return np.asarray([config.tasks[t].fusion_weight for t in task_names], np.float32)


def evaluate_fusion(scorer: NetworkScorer, exp: Experiment, config: ml_collections.ConfigDict,
                    num_negatives: int = 200) -> dict[str, Any]:
  """Fits every fusion method on validation and evaluates the fused rankings on validation and test.

  Returns {'tasks', 'weights': {method: {task: w}}, 'stacking': {...}, 'valid_list_ndcg': {method: v},
  'valid': {method: metrics}, 'test': {method: metrics}}; metrics as `evaluation.catalog_ranking_metrics`.
  """
  split, k = exp.split, config.eval.k
  lists = build_lists(scorer, exp, split.valid, split.train, num_negatives, config.seed)
  fit = fit_fusion(lists, fixed_weights(config, scorer.task_names), float(exp.gains(split.train).max()))
  weights = fit['weights']
  stack = fit['stacking_model']
  return {
      'tasks': list(scorer.task_names),
      'weights': {m: dict(zip(scorer.task_names, map(float, w))) for m, w in weights.items()},
      'stacking': {'coef': dict(zip(scorer.task_names, map(float, stack.coef))), 'intercept': stack.intercept},
      'valid_list_ndcg': {m: list_ndcg(lists, w, k) for m, w in weights.items()},
      'valid': fused_ranking_metrics(scorer, exp, weights, split.valid, exp.history_rows('valid')),
      'test': fused_ranking_metrics(scorer, exp, weights, split.test, exp.history_rows('test')),
  }


def select_default(scorer: NetworkScorer, exp: Experiment, config: ml_collections.ConfigDict,
                   num_negatives: int = 200) -> dict[str, Any]:
  """The served default fusion weights, chosen on validation only.

  Candidates: fixed (the config's fusion_weight), learned, stacking, and each task alone ('head:<task>', one-hot).
  The one with the best full-catalog validation Recall@K (evaluation's protocol) wins; ties go to the earlier one,
  fixed first. Returns {'rule', 'method', 'weights': {task: w}, 'valid': {candidate: Recall@K}, 'test': the
  winner's test ranking metrics}.
  """
  split, k = exp.split, config.eval.k
  names = scorer.task_names
  fixed = fixed_weights(config, names)
  candidates = {'fixed': fixed}
  if split.valid.size:
    lists = build_lists(scorer, exp, split.valid, split.train, num_negatives, config.seed)
    fit = fit_fusion(lists, fixed, float(exp.gains(split.train).max()))
    candidates.update({m: w for m, w in fit['weights'].items() if m != 'fixed'})
    candidates.update({f'head:{t}': np.eye(len(names), dtype=np.float32)[j] for j, t in enumerate(names)})
  metric = f'recall@{k}'
  # one catalog pass for every candidate, batch by batch (eval.ranking_rows_per_batch): nothing kept across batches
  valid = {m: r[metric] for m, r in fused_ranking_metrics(scorer, exp, candidates, split.valid,
                                                          exp.history_rows('valid')).items()} \
      if split.valid.size else {m: 0.0 for m in candidates}
  best = max(candidates, key=lambda m: valid[m])  # max keeps the first of equals
  stage = config_lib.retrieval_stage(config, names)
  served = '' if stage is None else (f'; lists as served: the fused score re-ranks the {stage[0]} task\'s top '
                                     f'{stage[1]} (export.retrieve_n)')
  return {'rule': f'best validation {metric} of fixed, learned, stacking and each head alone{served}',
          'method': best, 'weights': dict(zip(names, map(float, candidates[best]))), 'valid': valid,
          'test': fused_ranking_metrics(scorer, exp, {best: candidates[best]}, split.test,
                                        exp.history_rows('test'))[best]}

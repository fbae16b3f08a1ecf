"""The ensemble-fusion baseline: one single-task model per task, their scores fused into one ranking score.

The classic alternative to the unified network: for every task of `config.tasks` a separate model with the same
features and the same backbone/tower sizes but its own embeddings, trained by `loop.train_and_evaluate` on the
same split and seed (`member_config` says exactly what changes). Both systems rank items by one fused score

  score(u, i) = sum_t w_t * s_t(u, i),   s_t = p_t for binary heads,
                                         (value - lo) / (hi - lo) for regression and multiclass heads (the
                                         predicted or expected value on the task's scale, e.g. 1-5 stars),

so every task score lives in [0, 1] and the weights are comparable. The unified model fuses its own heads, the
ensemble its members' heads: a `scoring.NetworkScorer` of one network or of one per task hides the difference, as
mtl_rec.export does for serving.

Fusion weights (all fitted on the validation split only; the test split is never looked at):
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
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_rec import config as config_lib
from mtl_rec import evaluation
from mtl_rec import files
from mtl_rec import loop
from mtl_rec import metrics as metrics_lib
from mtl_rec import runs as runs_lib
from mtl_rec import scoring
from mtl_rec import trainer as trainer_lib
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.experiment import Experiment
from mtl_rec.scoring import Network, NetworkScorer

log = logging.getLogger(__name__)

FUSION_METHODS = ('fixed', 'learned', 'stacking')


# ---------------------------------------------------------------------------------------------------------------
# Members: one single-task run per task.


def early_stopping_metric(name: str, t: ml_collections.ConfigDict) -> str:
  """The validation metric a single-task member early-stops on: its AUC (binary, thresholded multiclass), class
  accuracy (multiclass) or RMSE (regression)."""
  if t.kind == 'regression':
    return f'{name}_rmse'
  return f'{name}_class_accuracy' if t.kind == 'multiclass' and t.threshold is None else f'{name}_auc'


def member_config(config: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
  """The config of the ensemble member for `task`: the same experiment reduced to that one task.

  Same data, split, seed, features, model sizes and optimizer. What changes, and why:
    * `tasks` holds only `task`, with loss weight 1; `eval.ranking_task` and `train.early_stopping_metric` name it.
    * ESMM (which couples two tasks) and uncertainty weighting (one task has nothing to balance) are off,
      and so is the end-of-training export (the ensemble exports as one artifact, see benchmark.export_system).
    * A member whose task is defined on observed rows only (like, rating) trains on observed rows: no sampled
      negatives, and a batch of batch_size / (1 + num_negatives) rows, i.e. the observed rows of a unified batch.
      It then takes as many steps per epoch as the unified model and sees the same labels per step, without
      spending compute on rows its loss masks out.
  """
  if task not in config.tasks:
    raise ValueError(f"no task '{task}' in config.tasks ({', '.join(config.tasks)})")
  c = copy.deepcopy(config)
  t = copy.deepcopy(config.tasks[task])
  t.weight = 1.0
  with c.unlocked():
    c.tasks = ml_collections.ConfigDict({task: t})
  c.name = f'{config.name}_{task}'
  c.eval.ranking_task = task
  c.train.early_stopping_metric = early_stopping_metric(task, t)
  c.model.esmm = False
  c.model.loss_weighting = 'static'
  if 'export' in c:  # a member alone serves nothing: the ensemble is exported as one artifact of all members
    c.export.enabled = False
  if not t.rows == 'all' and config.sampling.num_negatives > 0:
    c.sampling.num_negatives = 0
    multiple = trainer_lib.batch_multiple(config)
    rows = config.train.batch_size // (1 + config.sampling.num_negatives)
    c.train.batch_size = max(multiple, rows - rows % multiple)
  config_lib.validate(c)
  return c


def member_workdir(workdir: str, task: str) -> str:
  return os.path.join(workdir, f'member_{task}')


# ---------------------------------------------------------------------------------------------------------------
# Validation lists and the fusion fits.


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


class _CachedCatalogScores:
  """Task scores per catalog batch, computed once and fused with any number of weight vectors."""

  def __init__(self, scorer: NetworkScorer):
    self.scorer = scorer
    self._cache: dict[bytes, jax.Array] = {}

  def score_users(self, weights: np.ndarray) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
    w = jnp.asarray(weights, jnp.float32)

    def score(users: np.ndarray, rows: np.ndarray) -> jax.Array:
      key = users.tobytes() + rows.tobytes()
      if key not in self._cache:
        self._cache[key] = self.scorer.terms_catalog(users, rows)
      return self._cache[key] @ w
    return score


def fused_ranking_metrics(scorer: NetworkScorer, exp: Experiment, weights: dict[str, np.ndarray],
                          heldout_rows: np.ndarray, history_rows: np.ndarray) -> dict[str, dict[str, float]]:
  """{method: full-catalog ranking metrics of the fused score}, evaluation's protocol (graded NDCG included)."""
  cache = _CachedCatalogScores(scorer)
  return {m: evaluation.catalog_ranking_metrics(exp, heldout_rows, history_rows, cache.score_users(w))
          for m, w in weights.items()}


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


# ---------------------------------------------------------------------------------------------------------------
# The ensemble end to end.


def train_members(config: ml_collections.ConfigDict, workdir: str,
                  train_fn: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None
                  ) -> dict[str, dict[str, Any]]:
  """Trains one member per task (or resumes/skips finished ones) and returns {task: its metrics.json}.

  `train_fn(config, workdir) -> metrics.json's content` defaults to `loop.train_and_evaluate`; the benchmark passes
  one that runs it in a subprocess to measure peak memory.
  """
  train_fn = train_fn or (lambda c, wd: loop.train_and_evaluate(c, wd).metrics)
  results = {}
  for task, _ in config_lib.ordered(config.tasks):
    wd = member_workdir(workdir, task)
    done = os.path.join(wd, 'metrics.json')
    if os.path.exists(done):  # finished earlier: training again would only resume to the same result
      results[task] = files.read_json(done)
      continue
    log.info('ensemble member %s -> %s', task, wd)
    results[task] = train_fn(member_config(config, task), wd)
  return results


def load_members(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[Network], Experiment]:
  """The trained members (best checkpoints), each named by its task, and one experiment that evaluates them all
  (their data, features and evaluation sets agree)."""
  members, exp = [], None
  for task, _ in config_lib.ordered(config.tasks):
    run = runs_lib.load(member_workdir(workdir, task), exp=exp)
    if exp is not None and run.exp is not exp:
      raise ValueError(f'member {task} was trained on other data, features or another seed; retrain {workdir}')
    members.append(dataclasses.replace(run.network, name=task))
    exp = run.exp
  return members, exp


def member_test_metrics(config: ml_collections.ConfigDict, results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """The ensemble's per-task test metrics: each member's own task metrics, ranking metrics from the member of
  `config.eval.ranking_task` (the same keys as a unified run's metrics.json)."""
  out = {}
  for task, r in results.items():
    out.update({k: v for k, v in r['test'].items() if k.startswith(f'{task}_')})
  ranking = results[config_lib.ranking_task(config)]['test']
  out.update({k: v for k, v in ranking.items() if '@' in k})
  return out


@dataclasses.dataclass
class EnsembleRun:
  """A trained and evaluated ensemble: `summary` is ensemble.json's content; `scorer` serves its fused scores."""

  summary: dict[str, Any]
  scorer: NetworkScorer
  exp: Experiment
  member_results: dict[str, dict[str, Any]]  # {task: the member's metrics.json}


def train_ensemble(config: ml_collections.ConfigDict, workdir: str,
                   train_fn: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None,
                   num_negatives: int = 200) -> EnsembleRun:
  """Trains the members, fits the fusion weights on validation, evaluates; writes `workdir/ensemble.json`.

  ensemble.json: {'test': per-task test metrics (member_test_metrics), 'members': {task: workdir, params,
  wall_time_sec, best_step}, 'params': total, 'fusion': evaluate_fusion's result}.
  """
  config_lib.validate(config)
  results = train_members(config, workdir, train_fn)
  members, exp = load_members(config, workdir)
  scorer = NetworkScorer(members, exp.encoder, config.eval.batch_size)
  summary = {
      'test': member_test_metrics(config, results),
      'members': {t: {'workdir': member_workdir(workdir, t), 'params': scoring.count_params(m.params),
                      'wall_time_sec': results[t].get('wall_time_sec'), 'best_step': results[t].get('best_step')}
                  for t, m in zip(config.tasks, members)},
      'params': scorer.num_params,
      'fusion': evaluate_fusion(scorer, exp, config, num_negatives),
  }
  files.write_json(os.path.join(workdir, 'ensemble.json'), summary)
  return EnsembleRun(summary, scorer, exp, results)


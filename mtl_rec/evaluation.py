"""Evaluation of any Scorer: pointwise task metrics, full-catalog and sampled ranking, and the baselines' floors."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from mtl_rec import baselines as baselines_lib
from mtl_rec import metrics as metrics_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.experiment import Experiment
from mtl_rec.input_pipeline import EvalSet
from mtl_rec.scoring import NetworkScorer, PopularityScorer, Scorer

REQUIRED_METRICS = ('rating_rmse', 'rating_mae', 'like_auc', 'like_logloss', 'like_accuracy', 'click_auc',
                    'click_logloss', 'recall@10', 'ndcg@10', 'hr@10_sampled', 'ndcg@10_sampled')


def pointwise_metrics(scorer: NetworkScorer, exp: Experiment, eval_set: EvalSet) -> dict[str, float]:
  """AUC/LogLoss/accuracy, RMSE/MAE of every task over an eval set's rows (held-out pairs + sampled negatives)."""
  ex = eval_set.examples
  preds = scorer.predict_pairs(ex.user, ex.item)
  labels = exp.labels(ex.rating, ex.observed)
  out = {}
  for s in scorer.specs:
    out.update(tasks_lib.task_metrics(s, preds[s.name], labels, ex.observed))
  return out


def catalog_ranking_metrics(exp: Experiment, heldout_rows: np.ndarray, history_rows: np.ndarray,
                            score_users: Callable[[np.ndarray], Any]) -> dict[str, float]:
  """Full-catalog Recall/NDCG@K (RecBole protocol, graded NDCG too) of any scorer.

  `score_users(user positions [U]) -> scores [U, num_items]` (numpy or device array). For each user with a
  held-out rating every catalog item the user has not rated in `history_rows` is ranked; the held-out items are
  the relevant ones, with the held-out rating as gain for `ndcg@K_graded`.
  """
  ec, k = exp.config.eval, exp.config.eval.k
  num_items = exp.num_items
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  eval_users = np.unique(h_users)
  row_of = np.full(exp.num_users, -1, np.int64)
  row_of[eval_users] = np.arange(eval_users.size)
  relevant = metrics_lib.csr_from_pairs(row_of[h_users], h_items, eval_users.size,
                                        gains=exp.data.rating[heldout_rows])
  seen = metrics_lib.csr_from_pairs(exp.user_index[history_rows], exp.item_index[history_rows], exp.num_users)
  users_per_batch = max(1, min(eval_users.size, ec.ranking_rows_per_batch // num_items))
  topk = np.zeros((eval_users.size, k), np.int64)
  for start in range(0, eval_users.size, users_per_batch):
    users = eval_users[start:start + users_per_batch]
    pad = users_per_batch - users.size
    users_p = np.concatenate([users, np.repeat(users[-1:], pad)])
    scores = score_users(users_p)
    exclude = np.zeros((users_p.size, num_items), bool)
    for r, u in enumerate(users_p):
      exclude[r, seen[1][seen[0][u]:seen[0][u + 1]]] = True
    _, idx = metrics_lib.masked_topk(scores, exclude, k)
    topk[start:start + users.size] = np.asarray(idx)[:users.size]
  return metrics_lib.topk_ranking_metrics(topk, relevant, k)


def sampled_ranking_metrics(exp: Experiment, heldout_rows: np.ndarray,
                            score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, float]:
  """The NCF protocol: HR/NDCG@K of each held-out positive against `eval.sampled_negatives` items the user never
  rated (a fixed seed: every scorer sees the same candidates)."""
  ec, k = exp.config.eval, exp.config.eval.k
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  rng = np.random.default_rng([exp.config.seed, 4])
  negs = exp.eval_sampler.sample(h_users, ec.sampled_negatives, rng)
  cand_users = np.repeat(h_users, 1 + ec.sampled_negatives)
  cand_items = np.concatenate([h_items[:, None], negs], axis=1).reshape(-1)
  s = np.asarray(score_pairs(cand_users, cand_items)).reshape(h_users.size, 1 + ec.sampled_negatives)
  return metrics_lib.sampled_hr_ndcg(s[:, 0], s[:, 1:], k)


def ranking_metrics(scorer: Scorer, weights: np.ndarray, exp: Experiment, heldout_rows: np.ndarray,
                    history_rows: np.ndarray) -> dict[str, float]:
  """Full-catalog Recall/NDCG@K (RecBole protocol) and sampled HR/NDCG@K (NCF protocol) of the ranking score
  `weights` . s (one task's score for one-hot weights)."""
  out = catalog_ranking_metrics(exp, heldout_rows, history_rows, lambda u: scorer.score_catalog(u, weights))
  out.update(sampled_ranking_metrics(exp, heldout_rows, lambda u, i: scorer.score_pairs(u, i, weights)))
  return out


def full_metrics(scorer: NetworkScorer, exp: Experiment, which: str) -> dict[str, float]:
  """Every metric of metrics.json for 'valid' or 'test'; ranking by config.eval.ranking_task."""
  eval_set = exp.valid if which == 'valid' else exp.test
  out = pointwise_metrics(scorer, exp, eval_set)
  out.update(ranking_metrics(scorer, scorer.weights(exp.config.eval.ranking_task), exp, exp.heldout_rows(which),
                             exp.history_rows(which)))
  return out


def baseline_metrics(exp: Experiment) -> dict[str, dict[str, float]]:
  """Floors on the test split: popularity ranking and the bias-only rating model (mu + b_u + b_i)."""
  s = exp.split
  train_u, train_i = exp.user_index[s.train], exp.item_index[s.train]
  pop = PopularityScorer(baselines_lib.popularity_scores(train_i, exp.num_items))
  one = np.ones(1, np.float32)
  pop_metrics = ranking_metrics(pop, one, exp, s.test, exp.history_rows('test'))
  ex = exp.test.examples
  pop_metrics['click_auc'] = metrics_lib.auc(ex.observed, pop.score_pairs(ex.user, ex.item, one))
  lo, hi = exp.labels.rating_range
  bias = baselines_lib.fit_bias_model(train_u, train_i, exp.data.rating[s.train], exp.num_users, exp.num_items,
                                      rating_min=lo, rating_max=hi)
  obs = s.test
  pred = bias.predict(exp.user_index[obs], exp.item_index[obs])
  y = exp.data.rating[obs]
  like = (y >= exp.labels.like_threshold).astype(np.float32)
  bias_metrics = {'rating_rmse': metrics_lib.rmse(y, pred), 'rating_mae': metrics_lib.mae(y, pred),
                  'like_auc': metrics_lib.auc(like, pred)}
  return {'popularity': pop_metrics, 'bias_only': bias_metrics}


def format_table(metrics: dict[str, Any]) -> str:
  """A plain-text table of the test metrics beside the baselines."""
  test, base = metrics['test'], metrics.get('baselines', {})
  keys = list(REQUIRED_METRICS) + sorted(k for k in test if k not in REQUIRED_METRICS)
  lines = [f'{"metric":<22}{"model":>10}{"popularity":>12}{"bias-only":>11}']
  for k in keys:
    if k not in test:
      continue
    cells = [f'{test[k]:>10.4f}']
    for b in ('popularity', 'bias_only'):
      v = base.get(b, {}).get(k)
      cells.append(f'{v:>{12 if b == "popularity" else 11}.4f}' if v is not None else
                   ' ' * (12 if b == 'popularity' else 11))
    lines.append(f'{k:<22}' + ''.join(cells))
  return '\n'.join(lines)

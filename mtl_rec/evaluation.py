"""Evaluation of any Scorer: pointwise task metrics, full-catalog and sampled ranking, and the baselines' floors."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from mtl_rec import baselines as baselines_lib
from mtl_rec import config as config_lib
from mtl_rec import metrics as metrics_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.data.sampling import NegativeSampler
from mtl_rec.experiment import Experiment
from mtl_rec.input_pipeline import EvalSet
from mtl_rec.scoring import ItemItemScorer, NetworkScorer, PopularityScorer, Scorer

RANKING_METRICS = ('recall@{k}', 'ndcg@{k}', 'hr@{k}_sampled', 'ndcg@{k}_sampled')


def headline_metrics(specs: Sequence[tasks_lib.TaskSpec], k: int) -> list[str]:
  """The metrics every run reports, in the order tables list them: each task's, then the ranking ones."""
  out = []
  for s in specs:
    suffixes = {'binary': ('auc', 'logloss') + (() if s.implicit else ('accuracy',)), 'regression': ('rmse', 'mae'),
                'multiclass': ('class_accuracy',) + (('auc', 'logloss', 'accuracy') if s.threshold is not None else
                                                     ('class_logloss',)), 'retrieval': ('auc',)}[s.kind]
    out += [f'{s.name}_{x}' for x in suffixes]
  return out + [m.format(k=k) for m in RANKING_METRICS]


def pointwise_metrics(scorer: NetworkScorer, exp: Experiment, eval_set: EvalSet) -> dict[str, float]:
  """Every task's metrics over an eval set's rows (held-out log rows, plus sampled negatives for tasks on all rows)."""
  ex = eval_set.examples
  preds = scorer.predict_pairs(ex.user, ex.item, ex.row)
  labels, defined = exp.labels(ex)
  out = {}
  for s in scorer.specs:
    out.update(tasks_lib.task_metrics(s, preds[s.name], labels[s.name], defined[s.name]))
  return out


def _first_rows(users: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(distinct users, the first of each one's rows): the context a user's catalog is ranked in."""
  eval_users, first = np.unique(users, return_index=True)
  return eval_users, rows[first]


def catalog_ranking_metrics(exp: Experiment, heldout_rows: np.ndarray, history_rows: np.ndarray,
                            score_users: Callable[[np.ndarray, np.ndarray], Any],
                            candidates: np.ndarray | None = None) -> dict[str, float]:
  """Full-catalog Recall/NDCG@K (RecBole protocol, graded NDCG too) of any scorer.

  `score_users(user positions [U], log rows [U]) -> scores [U, num_items]` (numpy or device array); the row is the
  user's first held-out row, whose context the catalog is ranked in. For each user with a held-out row every
  catalog item the user has not interacted with in `history_rows` is ranked; the held-out items are the relevant
  ones, with eval.gain_column's value as gain for `ndcg@K_graded`. `candidates` (bool [num_items]) restricts the
  ranking to some items (e.g. the cold ones).
  """
  return fused_catalog_ranking_metrics(exp, heldout_rows, history_rows, lambda u, r: score_users(u, r)[..., None],
                                       {'': np.ones(1, np.float32)}, candidates)['']


def fused_catalog_ranking_metrics(exp: Experiment, heldout_rows: np.ndarray, history_rows: np.ndarray,
                                  terms_users: Callable[[np.ndarray, np.ndarray], Any],
                                  weights: dict[str, np.ndarray],
                                  candidates: np.ndarray | None = None,
                                  retrieve: tuple[int, int] | None = None) -> dict[str, dict[str, float]]:
  """{name: catalog_ranking_metrics of the score terms . weights[name]} for every weight vector at once:
  `terms_users(users, rows) -> [U, num_items, T]` is called once per batch of users, whatever the number of weight
  vectors (what choosing the served fusion among many candidates costs: one catalog pass, not one each).

  `retrieve` = (term column j, N): retrieve-then-rerank as the export serves it (config.export.retrieve_n): each
  user's list ranks only the N items of largest term j (a retrieval task's), the others excluded."""
  ec, k = exp.config.eval, exp.config.eval.k
  num_items = exp.num_items
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  eval_users, context_rows = _first_rows(h_users, heldout_rows)
  row_of = np.full(exp.num_users, -1, np.int64)
  row_of[eval_users] = np.arange(eval_users.size)
  relevant = metrics_lib.csr_from_pairs(row_of[h_users], h_items, eval_users.size, gains=exp.gains(heldout_rows))
  seen = metrics_lib.csr_from_pairs(exp.user_index[history_rows], exp.item_index[history_rows], exp.num_users)
  users_per_batch = max(1, min(eval_users.size, ec.ranking_rows_per_batch // num_items))
  topk = {name: np.zeros((eval_users.size, k), np.int64) for name in weights}
  # Items are ranked in a seeded random column order, so that exact ties fall at random: top-k would otherwise
  # prefer the lowest item index, and index order can carry information (MovieLens numbers its popular old movies
  # first) — e.g. among cold items, which a model without content scores all alike. Distinct scores keep their order.
  perm = np.random.default_rng([exp.config.seed, 12]).permutation(num_items)
  for start in range(0, eval_users.size, users_per_batch):
    users = eval_users[start:start + users_per_batch]
    rows = context_rows[start:start + users_per_batch]
    pad = users_per_batch - users.size
    users_p = np.concatenate([users, np.repeat(users[-1:], pad)])
    rows_p = np.concatenate([rows, np.repeat(rows[-1:], pad)])
    terms = jnp.asarray(terms_users(users_p, rows_p))[:, perm]
    exclude = np.zeros((users_p.size, num_items), bool)
    if candidates is not None:
      exclude[:, ~candidates] = True
    for r, u in enumerate(users_p):
      exclude[r, seen[1][seen[0][u]:seen[0][u + 1]]] = True
    exclude = jnp.asarray(exclude[:, perm])
    if retrieve is not None and retrieve[1] < num_items:
      _, retrieved = metrics_lib.masked_topk(terms[..., retrieve[0]], exclude, retrieve[1])
      exclude = exclude | ~jnp.zeros_like(exclude).at[jnp.arange(users_p.size)[:, None], retrieved].set(True)
    for name, w in weights.items():
      _, idx = metrics_lib.masked_topk(terms @ jnp.asarray(w, jnp.float32), exclude, k)
      topk[name][start:start + users.size] = perm[np.asarray(idx)[:users.size]]
  return {name: metrics_lib.topk_ranking_metrics(t, relevant, k) for name, t in topk.items()}


def sampled_ranking_metrics(exp: Experiment, heldout_rows: np.ndarray,
                            score_pairs: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
                            ) -> dict[str, float]:
  """The NCF protocol: HR/NDCG@K of each held-out row's item against `eval.sampled_negatives` items the user never
  interacted with (a fixed seed: every scorer sees the same candidates), in that row's context."""
  ec, k = exp.config.eval, exp.config.eval.k
  h_users, h_items = exp.user_index[heldout_rows], exp.item_index[heldout_rows]
  rng = np.random.default_rng([exp.config.seed, 4])
  negs = exp.eval_sampler.sample(h_users, ec.sampled_negatives, rng)
  cand_users = np.repeat(h_users, 1 + ec.sampled_negatives)
  cand_items = np.concatenate([h_items[:, None], negs], axis=1).reshape(-1)
  cand_rows = np.repeat(heldout_rows, 1 + ec.sampled_negatives)
  s = np.asarray(score_pairs(cand_users, cand_items, cand_rows)).reshape(h_users.size, 1 + ec.sampled_negatives)
  return metrics_lib.sampled_hr_ndcg(s[:, 0], s[:, 1:], k)


def ranking_metrics(scorer: Scorer, weights: np.ndarray, exp: Experiment, heldout_rows: np.ndarray,
                    history_rows: np.ndarray) -> dict[str, float]:
  """Full-catalog Recall/NDCG@K (RecBole protocol) and sampled HR/NDCG@K (NCF protocol) of the ranking score
  `weights` . s (one task's score for one-hot weights)."""
  out = catalog_ranking_metrics(exp, heldout_rows, history_rows, lambda u, r: scorer.score_catalog(u, weights, r))
  out.update(sampled_ranking_metrics(exp, heldout_rows, lambda u, i, r: scorer.score_pairs(u, i, weights, r)))
  return out


def full_metrics(scorer: NetworkScorer, exp: Experiment, which: str) -> dict[str, float]:
  """Every metric of metrics.json for 'valid' or 'test'; ranking by config.eval.ranking_task."""
  eval_set = exp.valid if which == 'valid' else exp.test
  out = pointwise_metrics(scorer, exp, eval_set)
  out.update(ranking_metrics(scorer, scorer.weights(config_lib.ranking_task(exp.config)), exp,
                             exp.heldout_rows(which), exp.history_rows(which)))
  return out


def cold_start_metrics(scorer: Scorer, exp: Experiment, which: str) -> dict[str, dict[str, float]]:
  """Metrics of the held-out rows of the cold items (users: data.cold_users) and of the others, apart:
  {'cold_items': ..., 'warm_items': ...}. Each part's tasks are measured on its rows with negatives sampled among
  its own items (cold items against cold items), and its catalog ranking (Recall/NDCG@K) ranks its items only. A
  NetworkScorer reports every task's metrics, any other scorer (popularity) the AUC of the binary tasks."""
  out = {}
  heldout = exp.heldout_rows(which)
  ds = exp.data
  for entity, ids in exp.split.cold.items():
    table = ds.items[ds.item_column] if entity == 'items' else ds.users[ds.user_column]
    index = exp.item_index if entity == 'items' else exp.user_index
    is_cold = np.isin(table, ids)
    train_items = np.zeros(exp.num_items, bool)
    train_items[exp.item_index[exp.split.train]] = True
    for part, cold in (('cold', True), ('warm', False)):
      rows = heldout[is_cold[index[heldout]] == cold]
      if not rows.size:
        continue
      items = (is_cold if cold else ~is_cold) if entity == 'items' else train_items
      sampler = NegativeSampler(exp.user_index, exp.item_index, np.flatnonzero(items), exp.num_items)
      negatives = exp.config.eval.click_negatives if any(s.all_rows for s in exp.specs) else 0
      eval_set = EvalSet.build(exp.positives(rows), sampler, negatives, exp.config.seed, 9 if cold else 10)
      if isinstance(scorer, NetworkScorer):
        metrics = pointwise_metrics(scorer, exp, eval_set)
        weights = scorer.weights(config_lib.ranking_task(exp.config))
      else:
        metrics = _binary_aucs(scorer, exp, eval_set)
        weights = np.ones(len(scorer.task_names), np.float32)
      metrics.update(catalog_ranking_metrics(exp, rows, exp.history_rows(which),
                                             lambda u, r, w=weights: scorer.score_catalog(u, w, r), items))
      out[f'{part}_{entity}'] = metrics
  return out


def _binary_aucs(scorer: Scorer, exp: Experiment, eval_set: EvalSet) -> dict[str, float]:
  """{task_auc} of a one-score scorer (popularity) for every binary task, on the rows each is defined on."""
  ex = eval_set.examples
  labels, defined = exp.labels(ex)
  scores = scorer.score_pairs(ex.user, ex.item, np.ones(len(scorer.task_names), np.float32), ex.row)
  out = {}
  for spec in exp.specs:
    rows = defined[spec.name] > 0
    if spec.kind in ('binary', 'retrieval') and 0 < labels[spec.name][rows].sum() < rows.sum():
      out[f'{spec.name}_auc'] = metrics_lib.auc(labels[spec.name][rows], scores[rows])
  return out


def popularity(exp: Experiment) -> PopularityScorer:
  """The popularity floor: every item's number of training rows."""
  return PopularityScorer(baselines_lib.popularity_scores(exp.item_index[exp.split.train], exp.num_items))


def bias_model(exp: Experiment, spec: tasks_lib.TaskSpec) -> baselines_lib.BiasModel:
  """mu + b_u + b_i of a regression task's label, fitted on the training rows with the shrinkage (user and item
  regularization from baselines.BIAS_REGS) that fits the validation rows best."""
  col, s = exp.labels.columns[spec.name], exp.split
  train, valid = s.train[col.present[s.train]], s.valid[col.present[s.valid]]
  lo, hi = spec.value_range
  fit = lambda ru, ri: baselines_lib.fit_bias_model(exp.user_index[train], exp.item_index[train], col.values[train],
                                                    exp.num_users, exp.num_items, ru, ri, rating_min=lo, rating_max=hi)
  if not valid.size:
    return fit(10.0, 25.0)
  rmse = lambda m: metrics_lib.rmse(col.values[valid], m.predict(exp.user_index[valid], exp.item_index[valid]))
  return min((fit(ru, ri) for ru in baselines_lib.BIAS_REGS for ri in baselines_lib.BIAS_REGS), key=rmse)


def item_item(exp: Experiment) -> Scorer | None:
  """EASE on the training interactions, its l2 (baselines.EASE_L2) the best validation Recall@K; None where the
  catalog (or the users x items matrix) is larger than baselines.EASE_MAX_ITEMS (EASE_MAX_CELLS)."""
  if exp.num_items > baselines_lib.EASE_MAX_ITEMS or exp.num_users * exp.num_items > baselines_lib.EASE_MAX_CELLS:
    return None
  s, one = exp.split, np.ones(1, np.float32)
  x = baselines_lib.interactions(exp.user_index[s.train], exp.item_index[s.train], exp.num_users, exp.num_items)
  g = baselines_lib.gram(x)
  scorers = [ItemItemScorer(x, baselines_lib.fit_ease(g, l2)) for l2 in baselines_lib.EASE_L2]
  if not s.valid.size:
    return scorers[2]
  recall = f'recall@{exp.config.eval.k}'
  valid = [catalog_ranking_metrics(exp, s.valid, exp.history_rows('valid'),
                                   lambda u, r, e=e: e.score_catalog(u, one, r))[recall] for e in scorers]
  return scorers[int(np.argmax(valid))]  # the first of equals: the smallest l2


def baseline_metrics(exp: Experiment) -> dict[str, dict[str, float]]:
  """Floors on the test split: popularity and EASE (ranking, and AUC of the tasks on all rows) and, where there is a
  regression task, the bias-only model mu + b_u + b_i of its label (with the AUC of binary tasks that threshold
  the same column). Their regularization is tuned on the validation split, as a model's early stopping is."""
  s = exp.split
  one = np.ones(1, np.float32)
  out = {}
  for name, scorer in (('popularity', popularity(exp)), ('ease', item_item(exp))):
    if scorer is not None:
      out[name] = ranking_metrics(scorer, one, exp, s.test, exp.history_rows('test'))
      out[name].update(_binary_aucs(scorer, exp, exp.test))  # ranking by its score, every binary task
  regression = next((spec for spec in exp.specs if spec.kind == 'regression'), None)
  if regression is not None:
    col = exp.labels.columns[regression.name]
    bias = bias_model(exp, regression)
    test = s.test[col.present[s.test]]
    pred = bias.predict(exp.user_index[test], exp.item_index[test])
    y = col.values[test]
    bias_metrics = {f'{regression.name}_rmse': metrics_lib.rmse(y, pred),
                    f'{regression.name}_mae': metrics_lib.mae(y, pred)}
    for spec in exp.specs:
      if spec.kind == 'binary' and spec.label == regression.label and spec.threshold is not None:
        bias_metrics[f'{spec.name}_auc'] = metrics_lib.auc((y >= spec.threshold).astype(np.float32), pred)
    out['bias_only'] = bias_metrics
  return out


BASELINE_LABELS = {'popularity': 'popularity', 'ease': 'EASE', 'bias_only': 'bias-only'}


def format_table(metrics: dict[str, Any], order: Sequence[str] = ()) -> str:
  """A plain-text table of the test metrics beside the baselines (`order` first, then the rest sorted)."""
  test, base = metrics['test'], metrics.get('baselines', {})
  keys = [k for k in order if k in test] + sorted(k for k in test if k not in order)
  columns = [(b, label) for b, label in BASELINE_LABELS.items() if b in base]
  lines = [f'{"metric":<22}{"model":>10}' + ''.join(f'{label:>12}' for _, label in columns)]
  for k in keys:
    v = [base[b].get(k) for b, _ in columns]
    lines.append(f'{k:<22}{test[k]:>10.4f}' + ''.join(f'{x:>12.4f}' if x is not None else ' ' * 12 for x in v))
  return '\n'.join(lines)

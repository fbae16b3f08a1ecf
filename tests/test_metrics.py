"""Tests for mtl_rec.metrics and mtl_rec.baselines against sklearn and straightforward loop references."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from mtl_rec import baselines
from mtl_rec import metrics

# ----------------------------------------------------------------------------------------------------------------
# Pointwise metrics vs sklearn.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 5000
  labels = rng.integers(0, 2, n)
  # Rounded scores create many ties, which must get average ranks.
  scores = np.round(rng.normal(size=n) + 0.5 * labels, 1)
  assert metrics.auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.auc(labels.astype(bool), scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_values():
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
  assert metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


@pytest.mark.parametrize('seed', [0, 1])
def test_pointwise_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = 3000
  labels = rng.integers(0, 2, n)
  probs = rng.uniform(0.01, 0.99, n)
  assert metrics.logloss(labels, probs) == pytest.approx(skm.log_loss(labels, probs), rel=1e-9)
  assert metrics.accuracy(labels, probs) == pytest.approx(skm.accuracy_score(labels, probs > 0.5))
  assert metrics.accuracy(labels, probs, threshold=0.3) == pytest.approx(skm.accuracy_score(labels, probs > 0.3))
  y = rng.integers(1, 6, n).astype(np.float32)
  yhat = rng.uniform(1, 5, n)
  assert metrics.rmse(y, yhat) == pytest.approx(math.sqrt(skm.mean_squared_error(y, yhat)), rel=1e-9)
  assert metrics.mae(y, yhat) == pytest.approx(skm.mean_absolute_error(y, yhat), rel=1e-9)


def test_logloss_clips_extreme_probabilities():
  value = metrics.logloss([1, 0], [0.0, 1.0], eps=1e-7)
  assert np.isfinite(value)
  assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


@pytest.mark.parametrize('call', [
    lambda: metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]),  # one class only
    lambda: metrics.auc([0, 1], [0.1, 0.2, 0.3]),  # shape mismatch
    lambda: metrics.auc([0, 1], [0.1, np.nan]),  # NaN
    lambda: metrics.auc([0, 2], [0.1, 0.2]),  # non-binary labels
    lambda: metrics.auc([], []),  # empty
    lambda: metrics.logloss([0, 1], [0.5, 1.5]),  # probs outside [0, 1]
    lambda: metrics.logloss([0, 1], [0.5]),
    lambda: metrics.accuracy([0, 1], [np.nan, 0.5]),
    lambda: metrics.rmse([1.0, 2.0], [1.0]),
    lambda: metrics.mae([1.0, np.inf], [1.0, 2.0]),
    lambda: metrics.rmse(np.ones((2, 2)), np.ones((2, 2))),
])
def test_pointwise_errors(call):
  with pytest.raises(ValueError):
    call()


def test_one_class_message_is_clear():
  with pytest.raises(ValueError, match='only one class'):
    metrics.auc([0, 0], [0.1, 0.2])


# ----------------------------------------------------------------------------------------------------------------
# Full-catalog ranking vs a per-user loop reference.
# ----------------------------------------------------------------------------------------------------------------


def _reference_ranking(topk, relevant, gains, k):
  """Straightforward per-user implementation of RecBole's definitions (plus graded NDCG)."""
  sums = {'recall': 0.0, 'ndcg': 0.0, 'precision': 0.0, 'hit': 0.0, 'graded': 0.0}
  n = 0
  for u, rel in enumerate(relevant):
    rel = list(rel)
    if not rel:
      continue
    n += 1
    gain_of = dict(zip(rel, gains[u])) if gains is not None else None
    top = [int(x) for x in topk[u][:k]]
    hits = [x in rel for x in top]
    sums['recall'] += sum(hits) / len(rel)
    sums['precision'] += sum(hits) / k
    sums['hit'] += float(any(hits))
    dcg = sum(1 / math.log2(r + 2) for r, h in enumerate(hits) if h)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
    sums['ndcg'] += dcg / idcg
    if gain_of is not None:
      gdcg = sum(gain_of[x] / math.log2(r + 2) for r, x in enumerate(top) if x in gain_of)
      ideal = sorted(gain_of.values(), reverse=True)[:k]
      gidcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
      sums['graded'] += gdcg / gidcg if gidcg > 0 else 0.0
  out = {f'recall@{k}': sums['recall'] / n, f'ndcg@{k}': sums['ndcg'] / n, f'precision@{k}': sums['precision'] / n,
         f'hit@{k}': sums['hit'] / n}
  if gains is not None:
    out[f'ndcg@{k}_graded'] = sums['graded'] / n
  return out


def _random_ranking_problem(rng, num_users=300, num_items=60, kmax=20):
  topk = np.stack([rng.permutation(num_items)[:kmax] for _ in range(num_users)])
  relevant, gains = [], []
  for _ in range(num_users):
    size = rng.integers(0, 15)  # includes users with nothing relevant, who must be skipped
    pool = rng.permutation(num_items)[:size]
    relevant.append(pool)
    gains.append(rng.integers(1, 6, size).astype(np.float64))
  return topk, relevant, gains


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_topk_ranking_matches_reference(seed):
  rng = np.random.default_rng(seed)
  topk, relevant, gains = _random_ranking_problem(rng)
  user_rows = np.concatenate([np.full(len(r), u) for u, r in enumerate(relevant)]).astype(np.int64)
  item_rows = np.concatenate(relevant).astype(np.int64)
  csr = metrics.csr_from_pairs(user_rows, item_rows, len(relevant), gains=np.concatenate(gains))
  got = metrics.topk_ranking_metrics(topk, csr, [5, 10, 20])
  got_list = metrics.topk_ranking_metrics(topk, relevant, 10)
  for k in (5, 10, 20):
    want = _reference_ranking(topk, relevant, gains, k)
    for name, value in want.items():
      assert got[name] == pytest.approx(value, abs=1e-12), name
  want10 = _reference_ranking(topk, relevant, None, 10)
  assert set(got_list) == set(want10)
  for name, value in want10.items():
    assert got_list[name] == pytest.approx(value, abs=1e-12), name


def test_topk_ranking_hand_example():
  # User 0: relevant {1, 3}, list [3, 0, 1] -> hits at ranks 0 and 2.
  # User 1: relevant {2}, list [0, 1, 4] -> no hit.  User 2: nothing relevant -> skipped.
  topk = np.array([[3, 0, 1], [0, 1, 4], [5, 6, 7]])
  csr = metrics.csr_from_pairs(np.array([0, 0, 1]), np.array([1, 3, 2]), 3, gains=np.array([5.0, 2.0, 4.0]))
  got = metrics.topk_ranking_metrics(topk, csr, 3)
  dcg0 = 1 / math.log2(2) + 1 / math.log2(4)
  idcg0 = 1 / math.log2(2) + 1 / math.log2(3)
  assert got['recall@3'] == pytest.approx((1.0 + 0.0) / 2)
  assert got['precision@3'] == pytest.approx((2 / 3 + 0.0) / 2)
  assert got['hit@3'] == pytest.approx(0.5)
  assert got['ndcg@3'] == pytest.approx((dcg0 / idcg0 + 0.0) / 2)
  # Graded: user 0's list earns gain 2 (item 3) at rank 0 and gain 5 (item 1) at rank 2; ideal is [5, 2].
  graded0 = (2 / math.log2(2) + 5 / math.log2(4)) / (5 / math.log2(2) + 2 / math.log2(3))
  assert got['ndcg@3_graded'] == pytest.approx(graded0 / 2)
  # k=1 only looks at the first column.
  got1 = metrics.topk_ranking_metrics(topk, csr, 1)
  assert got1['recall@1'] == pytest.approx(0.25)
  assert got1['ndcg@1'] == pytest.approx(0.5)


def test_topk_ranking_padding_is_never_a_hit():
  topk = np.array([[2, -1, -1]])
  got = metrics.topk_ranking_metrics(topk, [np.array([2, 7])], 3)
  assert got['recall@3'] == pytest.approx(0.5)
  assert got['precision@3'] == pytest.approx(1 / 3)


@pytest.mark.parametrize('call', [
    lambda: metrics.topk_ranking_metrics(np.array([[1, 2]]), [np.array([1])], 3),  # k > K'
    lambda: metrics.topk_ranking_metrics(np.array([[1, 2]]), [np.array([1]), np.array([2])], 2),  # misaligned
    lambda: metrics.topk_ranking_metrics(np.array([[1, 1]]), [np.array([1])], 2),  # repeated ranked item
    lambda: metrics.topk_ranking_metrics(np.array([[1, 2]]), [np.array([1, 1])], 2),  # repeated relevant
    lambda: metrics.topk_ranking_metrics(np.array([1, 2]), [np.array([1])], 2),  # 1-D topk
    lambda: metrics.topk_ranking_metrics(np.array([[1.0, 2.0]]), [np.array([1])], 2),  # float topk
    lambda: metrics.topk_ranking_metrics(np.array([[1, 2]]), [np.array([1])], 0),
    lambda: metrics.topk_ranking_metrics(np.array([[1, 2]]), (np.array([0, 1]), np.array([1]), np.array([-1.0])),
                                         2),  # negative gain
    lambda: metrics.csr_from_pairs(np.array([0, 3]), np.array([1, 2]), 3),  # user out of range
])
def test_ranking_errors(call):
  with pytest.raises(ValueError):
    call()


def test_topk_ranking_is_fast_at_movielens_1m_scale():
  rng = np.random.default_rng(0)
  num_users, num_items, k = 6040, 3706, 20
  topk = np.argsort(rng.random((num_users, num_items)), axis=1)[:, :k]
  n_test = 200_000
  users = rng.integers(0, num_users, n_test)
  items = rng.integers(0, num_items, n_test)
  keys = np.unique(users * num_items + items)
  csr = metrics.csr_from_pairs(keys // num_items, keys % num_items, num_users,
                               gains=rng.integers(1, 6, keys.size).astype(float))
  start = time.perf_counter()
  got = metrics.topk_ranking_metrics(topk, csr, [10, 20])
  assert time.perf_counter() - start < 2.0
  # A random ranking's expected recall is K / num_items.
  assert got['recall@20'] == pytest.approx(k / num_items, rel=0.1)


def test_masked_topk_never_returns_excluded_items():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(8, 50)).astype(np.float32)
  exclude = rng.random((8, 50)) < 0.5
  exclude[:, 0] = True
  values, indices = metrics.masked_topk(jnp.asarray(scores), jnp.asarray(exclude), 5)
  values, indices = np.asarray(values), np.asarray(indices)
  assert indices.shape == (8, 5)
  assert not np.any(np.take_along_axis(exclude, indices, axis=1))
  masked = np.where(exclude, -np.inf, scores)
  want = np.argsort(-masked, axis=1, kind='stable')[:, :5]
  np.testing.assert_array_equal(indices, want)
  np.testing.assert_allclose(values, np.take_along_axis(scores, want, axis=1))
  # A row with fewer candidates than k ends in -inf values, which the caller maps to padding.
  few = np.ones((1, 50), bool)
  few[0, [3, 7]] = False
  values, indices = metrics.masked_topk(scores[:1], few, 4)
  values, indices = np.asarray(values), np.asarray(indices)
  assert set(indices[0, :2].tolist()) == {3, 7}
  assert np.all(np.isneginf(values[0, 2:]))
  padded = np.where(np.isneginf(values), -1, indices)
  assert metrics.topk_ranking_metrics(padded, [np.array([3, 9])], 4)['recall@4'] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# Sampled HR / NDCG.
# ----------------------------------------------------------------------------------------------------------------


def _reference_sampled(pos, neg, k):
  hr = ndcg = 0.0
  for p, row in zip(pos, neg):
    rank = sum(1 for x in row if x >= p)
    if rank < k:
      hr += 1
      ndcg += 1 / math.log2(rank + 2)
  return {f'hr@{k}_sampled': hr / len(pos), f'ndcg@{k}_sampled': ndcg / len(pos)}


@pytest.mark.parametrize('k', [1, 5, 10])
def test_sampled_hr_ndcg_matches_loop(k):
  rng = np.random.default_rng(k)
  pos = np.round(rng.normal(1.0, 1.0, 400), 1)  # rounding creates ties with negatives
  neg = np.round(rng.normal(0.0, 1.0, (400, 99)), 1)
  got = metrics.sampled_hr_ndcg(pos, neg, k)
  want = _reference_sampled(pos, neg, k)
  for name, value in want.items():
    assert got[name] == pytest.approx(value, abs=1e-12)


def test_sampled_ties_are_pessimistic():
  got = metrics.sampled_hr_ndcg(np.zeros(10), np.zeros((10, 99)), k=10)
  assert got == {'hr@10_sampled': 0.0, 'ndcg@10_sampled': 0.0}
  # A perfect model: positive strictly above all negatives -> rank 0.
  got = metrics.sampled_hr_ndcg(np.ones(3), np.zeros((3, 99)), k=10)
  assert got == {'hr@10_sampled': 1.0, 'ndcg@10_sampled': 1.0}
  # One tie plus one strictly higher -> rank 2.
  got = metrics.sampled_hr_ndcg(np.array([1.0]), np.array([[1.0, 2.0, 0.0]]), k=3)
  assert got['ndcg@3_sampled'] == pytest.approx(1 / math.log2(4))
  with pytest.raises(ValueError):
    metrics.sampled_hr_ndcg(np.zeros(3), np.zeros((4, 5)))
  with pytest.raises(ValueError):
    metrics.sampled_hr_ndcg(np.zeros(2), np.array([[0.0], [np.nan]]))


# ----------------------------------------------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------------------------------------------


def test_popularity_scores():
  scores = baselines.popularity_scores(np.array([1, 2, 2, 4, 4, 4]), 6)
  assert scores.dtype == np.float32
  np.testing.assert_array_equal(scores, [0, 1, 2, 0, 3, 0])
  with pytest.raises(ValueError):
    baselines.popularity_scores(np.array([6]), 6)


def test_bias_model_recovers_planted_biases():
  rng = np.random.default_rng(0)
  num_users, num_items, n = 401, 201, 80_000
  b_user = np.r_[0.0, rng.normal(0, 0.4, num_users - 1)]  # row 0 is OOV: never rated
  b_item = np.r_[0.0, rng.normal(0, 0.6, num_items - 1)]
  b_user[1:] -= b_user[1:].mean()
  b_item[1:] -= b_item[1:].mean()
  users = rng.integers(1, num_users, n)
  items = rng.integers(1, num_items, n)
  ratings = 3.5 + b_user[users] + b_item[items] + rng.normal(0, 0.3, n)
  model = baselines.fit_bias_model(users[:70_000], items[:70_000], ratings[:70_000], num_users, num_items,
                                   reg_user=2.0, reg_item=2.0)
  assert model.mu == pytest.approx(3.5, abs=0.05)
  assert np.corrcoef(model.b_user[1:], b_user[1:])[0, 1] > 0.95
  assert np.corrcoef(model.b_item[1:], b_item[1:])[0, 1] > 0.98
  assert model.b_user[0] == 0.0 and model.b_item[0] == 0.0
  test_u, test_i, test_r = users[70_000:], items[70_000:], ratings[70_000:]
  pred = model.predict(test_u, test_i)
  assert pred.dtype == np.float32 and pred.min() >= 1.0 and pred.max() <= 5.0
  assert metrics.rmse(test_r, pred) < 0.35
  assert metrics.rmse(test_r, pred) < 0.7 * metrics.rmse(test_r, np.full_like(test_r, model.mu))
  # OOV rows predict from the remaining terms only.
  assert model.predict(np.array([0]), np.array([0]))[0] == pytest.approx(np.clip(model.mu, 1, 5), abs=1e-6)


def test_bias_model_defaults_beat_global_mean_and_clip():
  rng = np.random.default_rng(3)
  num_users, num_items, n = 300, 150, 30_000
  b_user = rng.normal(0, 0.5, num_users)
  b_item = rng.normal(0, 0.5, num_items)
  users = rng.integers(1, num_users, n)
  items = rng.integers(1, num_items, n)
  ratings = np.clip(np.round(3.6 + b_user[users] + b_item[items] + rng.normal(0, 0.8, n)), 1, 5)
  model = baselines.fit_bias_model(users[:25_000], items[:25_000], ratings[:25_000], num_users, num_items)
  pred = model.predict(users[25_000:], items[25_000:])
  assert metrics.rmse(ratings[25_000:], pred) < metrics.rmse(ratings[25_000:], np.full(5000, model.mu))
  extreme = baselines.BiasModel(mu=4.5, b_user=np.array([0.0, 1.0], np.float32),
                                b_item=np.array([0.0, -5.0], np.float32))
  np.testing.assert_array_equal(extreme.predict(np.array([1, 0]), np.array([0, 1])), [5.0, 1.0])
  with pytest.raises(ValueError):
    baselines.fit_bias_model(np.array([0]), np.array([0]), np.array([np.nan]), 1, 1)
  with pytest.raises(ValueError):
    baselines.fit_bias_model(np.array([0, 1]), np.array([0]), np.array([3.0]), 2, 1)
  with pytest.raises(ValueError):
    model.predict(np.array([num_users]), np.array([0]))


def test_ease_matches_its_closed_form_and_ranks_co_occurring_items():
  """EASE on a hand-made matrix: B = -P / diag(P) with P = (X^T X + l2 I)^-1 and a zero diagonal, the solution of
  min ||X - XB||^2 + l2 ||B||^2 under diag(B) = 0 (its gradient vanishes off the diagonal); items bought together
  score each other."""
  users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 0])  # items 0 and 1 go together, 2 and 3 go together
  items = np.array([0, 1, 0, 1, 2, 3, 2, 3, 1, 0])  # (0, 0) twice: counts once
  x = baselines.interactions(users, items, 4, 4)
  assert x.sum() == 9 and x[0].tolist() == [1, 1, 0, 0]
  b = baselines.fit_ease(baselines.gram(x), 2.0).astype(np.float64)
  assert np.all(np.diag(b) == 0)
  g = x.T.astype(np.float64) @ x
  residual_grad = -2 * g @ (np.eye(4) - b) + 2 * 2.0 * b  # d/dB of the objective
  off = ~np.eye(4, dtype=bool)
  np.testing.assert_allclose(residual_grad[off], 0, atol=1e-5)
  assert b[0, 1] > b[0, 2] and b[2, 3] > b[2, 0]
  scores = x[2] @ b  # the user of items 2 and 3: item 1 (once with 3) over item 0 (never)
  assert scores[1] > scores[0]
  with pytest.raises(ValueError, match='l2 > 0'):
    baselines.fit_ease(baselines.gram(x), 0.0)


def test_the_bias_floor_is_tuned_on_validation(tiny_config):
  """baseline_metrics' bias-only model takes the shrinkage that fits the validation rows best: no default of the
  grid fits them better, and EASE joins the floors, its top items among the unseen."""
  from mtl_rec import evaluation, experiment  # pylint: disable=g-import-not-at-top
  exp = experiment.build(tiny_config())
  spec = next(s for s in exp.specs if s.kind == 'regression')
  col, valid = exp.labels.columns[spec.name], exp.split.valid
  valid = valid[col.present[valid]]
  rmse = lambda m: metrics.rmse(col.values[valid], m.predict(exp.user_index[valid], exp.item_index[valid]))
  tuned = rmse(evaluation.bias_model(exp, spec))
  train = exp.split.train[col.present[exp.split.train]]
  for ru, ri in ((10.0, 25.0), (1.0, 1.0), (25.0, 25.0)):
    fixed = baselines.fit_bias_model(exp.user_index[train], exp.item_index[train], col.values[train], exp.num_users,
                                     exp.num_items, ru, ri, rating_min=1.0, rating_max=5.0)
    assert tuned <= rmse(fixed) + 1e-12, (ru, ri)
  floors = evaluation.baseline_metrics(exp)
  assert set(floors) == {'popularity', 'ease', 'bias_only'}
  assert floors['ease']['recall@10'] > floors['popularity']['recall@10']

"""The ensemble-fusion baseline: member configs, the fusion fits on planted data, and a tiny ensemble end to end."""

import numpy as np
import pytest

from configs import synthetic
from mtl_rec import evaluation, experiment, fusion, fusion_weights, tasks, trainer
from mtl_rec.scoring import Network, NetworkScorer


def planted_lists(num_users=300, num_pos=5, num_neg=40, seed=0):
  """Lists where task 0's score tracks the graded relevance and tasks 1, 2 are noise: member 0 is planted better."""
  rng = np.random.default_rng(seed)
  length = num_pos + num_neg
  gains = np.zeros((num_users, length), np.float32)
  gains[:, :num_pos] = rng.integers(1, 6, size=(num_users, num_pos))
  good = 1.0 / (1.0 + np.exp(-(gains - 1.5 + rng.normal(0, 0.8, gains.shape))))
  scores = np.stack([good, rng.uniform(size=gains.shape), rng.uniform(size=gains.shape)], -1).astype(np.float32)
  return fusion_weights.FusionLists(scores, gains, np.ones_like(gains, bool))


def test_member_config_reduces_to_one_task():
  c = synthetic.get_config()
  c.model.esmm = True
  c.tasks.like.weight = 3.0
  expected = {'click': 'click_auc', 'like': 'like_auc', 'rating': 'rating_rmse'}
  for task, metric in expected.items():
    m = fusion.member_config(c, task)
    assert list(m.tasks) == [task] and m.tasks[task].weight == 1.0
    assert m.eval.ranking_task == task and m.train.early_stopping_metric == metric
    assert not m.model.esmm and m.seed == c.seed and m.data.to_dict() == c.data.to_dict()
    assert m.model.hidden_dims == c.model.hidden_dims and m.features.to_dict() == c.features.to_dict()
  click = fusion.member_config(c, 'click')
  assert click.sampling.num_negatives == c.sampling.num_negatives
  assert click.train.batch_size == c.train.batch_size
  rating = fusion.member_config(c, 'rating')
  # Observed pairs only, as many of them per step as in a unified batch (512 / 5 -> 96, a multiple of 8 devices).
  assert rating.sampling.num_negatives == 0
  assert rating.train.batch_size == 96
  assert c.tasks.like.weight == 3.0 and len(c.tasks) == 3  # the source config is untouched
  with pytest.raises(ValueError, match='no task'):
    fusion.member_config(c, 'watch_time')


def test_fusion_terms_share_the_unit_interval():
  specs = {'click': tasks.TaskSpec('click', 'binary', 'observed', 1.0, 0.4, rows='all'),
           'rating': tasks.TaskSpec('rating', 'regression', 'rating', 1.0, 0.3, value_range=(1.0, 5.0))}
  term = lambda pred, spec: float(np.asarray(tasks.fusion_term(tasks.task_value(pred, spec), spec)).reshape(-1)[0])
  assert term(np.float32(0.3), specs['click']) == pytest.approx(0.3)
  assert term(np.float32(5.0), specs['rating']) == pytest.approx(1.0)
  assert term(np.float32(1.0), specs['rating']) == pytest.approx(0.0)
  multiclass = tasks.TaskSpec('like', 'multiclass', 'rating', 1.0, 0.3, value_range=(1.0, 5.0), threshold=4.0,
                              values=(1, 2, 3, 4, 5))
  probs = np.zeros((1, 5), np.float32)
  probs[0, 4] = 1.0
  assert term(probs, multiclass) == pytest.approx(1.0)
  # Another rating scale (0-10 stars) maps onto [0, 1] just the same: the scale comes from the data.
  ten = tasks.TaskSpec('rating', 'regression', 'rating', 1.0, 0.3, value_range=(0.0, 10.0))
  assert term(np.float32(7.5), ten) == pytest.approx(0.75)


def test_learned_weights_beat_uniform_on_planted_validation_lists():
  lists = planted_lists()
  uniform = np.full(3, 1 / 3, np.float32)
  learned = fusion_weights.fit_learned_weights(lists, uniform)
  assert np.abs(learned).sum() == pytest.approx(1.0, abs=1e-5)
  assert np.argmax(learned) == 0 and learned[0] > 0.8, learned
  ndcg_learned, ndcg_uniform = fusion_weights.list_ndcg(lists, learned, 10), fusion_weights.list_ndcg(lists, uniform, 10)
  assert ndcg_learned > ndcg_uniform + 0.05, (ndcg_learned, ndcg_uniform)
  loss = lambda w: float(fusion_weights.listnet_loss(w * 20, lists.scores, lists.gains, lists.mask))
  assert loss(learned) < loss(uniform)
  # The same holds on fresh lists from the same process: the weights generalize, they do not memorize.
  fresh = planted_lists(seed=1)
  assert fusion_weights.list_ndcg(fresh, learned, 10) > fusion_weights.list_ndcg(fresh, uniform, 10)


def test_list_ndcg_is_one_for_the_ideal_order_and_ignores_padding():
  gains = np.array([[3, 5, 0, 0], [1, 0, 0, 0]], np.float32)
  scores = gains[..., None].copy()
  mask = np.array([[True, True, True, False], [True, True, True, True]])
  scores[0, 3, 0] = 99.0  # padding with a huge score must not enter the ranking
  lists = fusion_weights.FusionLists(scores, gains, mask)
  assert fusion_weights.list_ndcg(lists, np.ones(1, np.float32), 2) == pytest.approx(1.0)
  assert fusion_weights.list_ndcg(lists, -np.ones(1, np.float32), 2) < 0.5


def test_stacking_fits_and_predicts():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(4000, 3)).astype(np.float32)
  x[:, 2] *= 0.01  # a nearly constant feature: standardization must not blow it up
  target = 1.0 / (1.0 + np.exp(-(6.0 * x[:, 0] - 1.0 * x[:, 1] - 3.0)))
  model = fusion_weights.fit_stacking(x, target, l2=0.0, steps=3000, learning_rate=0.05)
  pred = model.predict(x)
  assert pred.shape == (4000,) and np.all((pred > 0) & (pred < 1))
  assert np.abs(pred - target).mean() < 0.02
  assert model.coef[0] == pytest.approx(6.0, rel=0.15) and model.coef[1] == pytest.approx(-1.0, abs=0.4)
  w = model.fusion_weights
  assert np.abs(w).sum() == pytest.approx(1.0, abs=1e-5) and np.argmax(w) == 0
  # Ranking by the fusion weights is ranking by the meta-model's output.
  order = np.argsort(x @ w)
  assert np.all(np.diff(pred[order]) >= -1e-6)
  with pytest.raises(ValueError, match='targets'):
    fusion_weights.fit_stacking(x, target * 2)


def test_stacking_on_planted_lists_weights_the_good_member():
  lists = planted_lists()
  fit = fusion_weights.fit_fusion(lists, np.array([0.4, 0.3, 0.3], np.float32), max_gain=5.0)
  assert set(fit['weights']) == set(fusion_weights.FUSION_METHODS)
  assert np.argmax(fit['weights']['stacking']) == 0
  assert fusion_weights.list_ndcg(lists, fit['weights']['stacking'], 10) > fusion_weights.list_ndcg(lists, fit['weights']['fixed'], 10)


@pytest.fixture(scope='module')
def untrained(tiny_config):
  """One freshly initialized unified network, scored two ways: as one network answering every task, and as an
  "ensemble" of three networks that each answer one task with that same network. The scoring plumbing needs no
  training (test_benchmark trains a real ensemble end to end), and the two must agree exactly."""
  c = tiny_config()
  exp = experiment.build(c)
  t = trainer.make_trainer(c, exp.encoder.specs, exp.specs, total_steps=10)
  params = t.init_state['params']
  unified = NetworkScorer([Network(t.graphdef, params, exp.specs)], exp.encoder, c.eval.batch_size)
  split = NetworkScorer([Network(t.graphdef, params, (s,)) for s in exp.specs], exp.encoder, c.eval.batch_size)
  return c, exp, t, unified, split


def test_scorer_merges_one_network_per_task(untrained):
  c, _, _, unified, split = untrained
  assert unified.task_names == split.task_names == tuple(c.tasks)
  assert split.num_params == 3 * unified.num_params  # each network counts its own (here: the same) parameters
  with pytest.raises(ValueError, match='overlapping'):
    NetworkScorer(split.networks[:1] * 2, split.encoder, 64)


def test_catalog_and_pair_scores_agree(untrained):
  _, exp, _, unified, split = untrained
  users = np.array([1, 5, 7])
  cat = np.asarray(split.terms_catalog(users))
  assert cat.shape == (3, exp.num_items, 3)
  np.testing.assert_allclose(np.asarray(unified.terms_catalog(users)), cat, rtol=1e-5, atol=1e-6)
  items = np.array([0, 3, exp.num_items - 1])
  pairs = split.terms_pairs(np.repeat(users, 3), np.tile(items, 3)).reshape(3, 3, 3)
  np.testing.assert_allclose(cat[:, items], pairs, rtol=1e-4, atol=1e-5)
  assert np.all((cat[..., :2] >= 0) & (cat[..., :2] <= 1))
  w = np.array([0.5, 0.2, 0.3], np.float32)
  np.testing.assert_allclose(split.score_pairs(np.repeat(users, 3), np.tile(items, 3), w).reshape(3, 3),
                             cat[:, items] @ w, rtol=1e-4, atol=1e-5)


def test_fused_ranking_uses_the_evaluation_protocol(untrained):
  _, exp, _, unified, split = untrained
  history = exp.history_rows('test')
  fused = fusion_weights.fused_ranking_metrics(split, exp, {'click_only': np.array([1.0, 0.0, 0.0], np.float32)},
                                       exp.split.test, history)['click_only']
  direct = evaluation.ranking_metrics(unified, unified.weights('click'), exp, exp.split.test, history)
  for k in ('recall@10', 'ndcg@10', 'ndcg@10_graded'):
    assert fused[k] == pytest.approx(direct[k], abs=1e-6), k


def test_many_weight_vectors_rank_in_one_catalog_pass_as_each_alone(untrained):
  _, exp, _, unified, _ = untrained
  history = exp.history_rows('valid')
  weights = {'click': np.array([1.0, 0.0, 0.0], np.float32), 'mix': np.array([0.5, 0.2, 0.3], np.float32),
             'rating': np.array([0.0, 0.0, 1.0], np.float32)}
  calls = []

  def terms(users, rows):
    calls.append(users.size)
    return unified.terms_catalog(users, rows)
  together = evaluation.fused_catalog_ranking_metrics(exp, exp.split.valid, history, terms, weights)
  batches = len(calls)
  assert batches >= 1 and set(together) == set(weights)
  for name, w in weights.items():
    alone = evaluation.catalog_ranking_metrics(exp, exp.split.valid, history,
                                               lambda u, r, w=w: unified.score_catalog(u, w, r))
    assert together[name] == alone, name
  calls.clear()
  evaluation.fused_catalog_ranking_metrics(exp, exp.split.valid, history, terms, {'click': weights['click']})
  assert len(calls) == batches  # three weight vectors cost the catalog passes of one


def test_evaluate_fusion_reports_every_method(untrained):
  c, exp, _, _, split = untrained
  f = fusion_weights.evaluate_fusion(split, exp, c, num_negatives=30)
  assert f['tasks'] == ['click', 'like', 'rating']
  assert f['weights']['fixed'] == pytest.approx({'click': 0.4, 'like': 0.3, 'rating': 0.3})
  for m in fusion_weights.FUSION_METHODS:
    assert set(f['weights'][m]) == {'click', 'like', 'rating'}
    assert sum(abs(v) for v in f['weights'][m].values()) == pytest.approx(1.0, abs=1e-5)
    for which in ('valid', 'test'):
      assert 0.0 <= f[which][m]['ndcg@10_graded'] <= 1.0 and 'recall@10' in f[which][m]
  assert set(f['stacking']) == {'coef', 'intercept'}

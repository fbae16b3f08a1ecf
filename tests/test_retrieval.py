"""The retrieval task (kind='retrieval'): two towers on the shared embeddings trained with a logQ-corrected in-batch
softmax that masks accidental hits; checked against a hand computation, then trained, evaluated and exported."""

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mtl_rec import config as config_lib
from mtl_rec import tasks as tasks_lib

T = 0.5
RETRIEVAL_DIM = 12  # the retrieval run's towers' output width (task(..., dim=)), unlike its embedding width


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_in_batch_softmax_against_a_hand_computed_example():
  rng = np.random.default_rng(0)
  u, v = _unit(rng.normal(size=(5, 3))), _unit(rng.normal(size=(5, 3)))
  positive = np.array([1, 1, 1, 0, 1], np.float32)  # row 3 is a sampled negative
  item = np.array([5, 7, 5, 9, 2])  # rows 0 and 2 hold the same item: each is the other's accidental hit
  logq = np.log(np.array([0.4, 0.1, 0.4, 0.3, 0.2]))
  got = np.asarray(tasks_lib.in_batch_softmax(jnp.asarray(np.stack([u, v], 1), jnp.float32), jnp.asarray(positive),
                                              jnp.asarray(item), jnp.asarray(logq, jnp.float32), T))
  # by hand: row i's candidates are the positive rows j whose item differs from row i's, and its own column
  candidates = {0: [0, 1, 4], 1: [0, 1, 2, 4], 2: [1, 2, 4], 4: [0, 1, 2, 4]}
  for i, cols in candidates.items():
    logit = {j: float(u[i] @ v[j]) / T - logq[j] for j in cols}
    want = math.log(sum(math.exp(x) for x in logit.values())) - logit[i]
    assert got[i] == pytest.approx(want, rel=1e-5), i
  assert got[3] == 0.0
  # the correction: without it a frequent item (q = 0.4) weighs more as a negative, so row 1's loss grows
  plain = np.asarray(tasks_lib.in_batch_softmax(jnp.asarray(np.stack([u, v], 1), jnp.float32), jnp.asarray(positive),
                                                jnp.asarray(item), jnp.zeros(5), T))
  logit = {j: float(u[1] @ v[j]) / T for j in candidates[1]}
  assert plain[1] == pytest.approx(math.log(sum(math.exp(x) for x in logit.values())) - logit[1], rel=1e-5)


def test_mixed_negatives_add_the_sampled_rows_items_as_candidates():
  """negatives='mixed' (Yang et al. 2020): the sampled-negative row's item is a column of every positive row's
  softmax too (an accidental hit still left out), with the log q the batch gives."""
  rng = np.random.default_rng(1)
  u, v = _unit(rng.normal(size=(5, 3))), _unit(rng.normal(size=(5, 3)))
  positive = np.array([1, 1, 0, 1, 0], np.float32)  # rows 2 and 4 are sampled negatives
  valid = np.ones(5, np.float32)
  item = np.array([5, 7, 9, 2, 7])  # row 4's sampled item is row 1's positive: an accidental hit for row 1
  logq = np.log(np.array([0.3, 0.1, 0.05, 0.2, 0.1]))
  got = np.asarray(tasks_lib.in_batch_softmax(jnp.asarray(np.stack([u, v], 1), jnp.float32), jnp.asarray(positive),
                                              jnp.asarray(item), jnp.asarray(logq, jnp.float32), T,
                                              jnp.asarray(valid)))
  candidates = {0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3], 3: [0, 1, 2, 3, 4]}
  for i, cols in candidates.items():
    logit = {j: float(u[i] @ v[j]) / T - logq[j] for j in cols}
    want = math.log(sum(math.exp(x) for x in logit.values())) - logit[i]
    assert got[i] == pytest.approx(want, rel=1e-5), i
  assert got[2] == got[4] == 0.0  # negatives have no loss of their own


def test_mixed_log_q_is_the_mixture_of_both_candidate_distributions(tiny_config):
  """With negatives='mixed' each item's log q is that of the candidates' mixture: one observed row (the data's
  item shares) to sampling.num_negatives sampled rows (the negative sampler's distribution)."""
  from mtl_rec import experiment  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.sampling.distribution = 'popularity'
  with c.unlocked():
    c.tasks.retrieval = config_lib.task('retrieval', 'observed', negatives='mixed')
  exp = experiment.build(c)
  counts = np.bincount(exp.item_index[exp.split.train], minlength=exp.num_items).astype(np.float64)
  q = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
  q_neg = counts ** c.sampling.popularity_power / (counts ** c.sampling.popularity_power).sum()
  k = c.sampling.num_negatives
  np.testing.assert_allclose(exp.labels.item_logq, np.log((q + k * q_neg) / (1 + k)), rtol=1e-5)
  np.testing.assert_allclose(np.exp(exp.labels.item_logq).sum(), 1.0, rtol=1e-5)  # a distribution


def test_a_retrieval_task_must_learn_from_observed_pairs(tiny_config):
  c = tiny_config()
  with c.unlocked():
    c.tasks.retrieval = config_lib.task('retrieval', 'rating')
  with pytest.raises(ValueError, match="label='observed'"):
    config_lib.validate(c)
  c.tasks.retrieval = config_lib.task('retrieval', 'observed', temperature=0.0)
  with pytest.raises(ValueError, match='temperature'):
    config_lib.validate(c)
  c.tasks.retrieval = config_lib.task('retrieval', 'observed', negatives='uniform')
  with pytest.raises(ValueError, match="tasks.retrieval.negatives='uniform'.*in_batch, mixed"):
    config_lib.validate(c)
  c.tasks.retrieval = config_lib.task('retrieval', 'observed', dim=-1)
  with pytest.raises(ValueError, match=r'tasks.retrieval.dim=-1 is invalid: must be >= 0'):
    config_lib.validate(c)
  for tower in [(0,), (16, -2), (8.5,), (True,)]:
    c.tasks.retrieval = config_lib.task('retrieval', 'observed', tower=tower)
    with pytest.raises(ValueError, match=r'tasks.retrieval.tower=.* is invalid: give positive integer widths'):
      config_lib.validate(c)
  c.tasks.retrieval = config_lib.task('retrieval', 'observed', negatives='mixed')
  c.tasks.second = config_lib.task('retrieval', 'observed')
  with pytest.raises(ValueError, match="tasks.second.negatives.*'mixed' like the first"):
    config_lib.validate(c)


def test_the_towers_take_the_tasks_widths_else_the_backbones(tiny_config):
  """task(..., tower=) sets the retrieval towers' hidden widths (() = a linear map of the embeddings); unset, they
  are model.hidden_dims. The towers still end in the task's output width."""
  from mtl_rec import experiment as experiment_lib, model as model_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  with c.unlocked():
    c.tasks.wide = config_lib.task('retrieval', 'observed', dim=RETRIEVAL_DIM)
    c.tasks.narrow = config_lib.task('retrieval', 'observed', tower=(24,))
    c.tasks.linear = config_lib.task('retrieval', 'observed', tower=())
  exp = experiment_lib.build(c)
  towers = model_lib.build(c, exp.encoder.specs, exp.specs).towers
  widths = lambda mlp: [layer.kernel.shape[1] for layer in mlp.layers]
  assert widths(towers['wide'].user) == widths(towers['wide'].item) == list(c.model.hidden_dims)
  assert widths(towers['narrow'].user) == widths(towers['narrow'].item) == [24]
  assert widths(towers['linear'].user) == widths(towers['linear'].item) == []
  assert towers['wide'].user_out.kernel.shape[1] == RETRIEVAL_DIM
  assert towers['linear'].user_out.kernel.shape[1] == towers['narrow'].item_out.kernel.shape[1] == c.model.embed_dim
  assert towers['narrow'].user_out.kernel.shape[0] == 24


@pytest.fixture(scope='module')
def retrieval_run(tmp_path_factory):
  """(TrainResult, export version dir) of a tiny run with a retrieval task that ranks the catalog; `recommend`
  retrieves 40 of the 150 items in blocks of 32 (the running top-k path) and re-ranks them. Its towers end in
  RETRIEVAL_DIM-wide vectors, not the embedding width."""
  from conftest import make_tiny_config, train_and_export  # pylint: disable=g-import-not-at-top
  c = make_tiny_config(train__epochs=3)
  with c.unlocked():
    c.tasks.retrieval = config_lib.task('retrieval', 'observed', weight=1.0, dim=RETRIEVAL_DIM)
  assert RETRIEVAL_DIM != c.model.embed_dim
  c.eval.ranking_task = 'retrieval'  # the catalog ranked by the towers' cosine
  c.export.max_k, c.export.retrieve_n, c.export.chunk_items = 20, 40, 32
  workdir = str(tmp_path_factory.mktemp('retrieval_run'))
  return train_and_export(c, workdir)


@pytest.mark.slow
def test_a_retrieval_task_trains_ranks_and_exports(retrieval_run):
  result, version = retrieval_run
  m = result.metrics
  assert m['test']['retrieval_auc'] > 0.6  # the towers tell held-out pairs from sampled ones
  assert m['baselines']['popularity']['retrieval_auc'] > 0.5
  assert 0 < m['test']['recall@10'] <= 1
  workdir = os.path.dirname(os.path.dirname(version))  # W/export/<version>
  history = [json.loads(line) for line in open(os.path.join(workdir, 'history.jsonl'))]
  losses = [h['loss_retrieval'] for h in history]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  manifest = json.load(open(os.path.join(version, 'manifest.json')))
  kinds = {t['name']: t for t in manifest['tasks']}
  assert kinds['retrieval']['output'] == 'score' and kinds['retrieval']['fusion_term'] == '(score + 1) / 2'
  stage = manifest['functions']['recommend']['retrieval']
  assert stage['task'] == 'retrieval' and stage['candidates'] == 40
  assert stage['item_vectors']['shape'] == [150, RETRIEVAL_DIM]

  # served: the retrieval column is the in-process towers' cosine, and ranking by it alone is recommend's order
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.loader import ExportedModel  # pylint: disable=g-import-not-at-top
  run = result.run
  model = ExportedModel(version, max_batch_rows=64, max_recommend_users=2)
  users, items = np.arange(20), np.arange(20)
  outputs, _ = nnx.merge(run.network.graphdef, run.network.params)(run.exp.encoder.gather(users, items))
  assert outputs['retrieval'].shape == (20, 2, RETRIEVAL_DIM)  # each row's query and item vector
  cosine = np.sum(np.asarray(outputs['retrieval'])[:, 0] * np.asarray(outputs['retrieval'])[:, 1], -1)
  only = np.asarray([1.0 if n == 'retrieval' else 0.0 for n in manifest['fusion']['order']], np.float32)
  out = model.score_rows({k: model.user_table[k][users] for k in model.user_inputs}, items, np.tile(only, (20, 1)))
  np.testing.assert_allclose(out['retrieval'], cosine, atol=1e-5)
  np.testing.assert_allclose(out['score'], (cosine + 1) / 2, atol=1e-5)
  # the precomputed item vectors are the item tower's, so the retrieval stage's dot product is that cosine too
  u_vec = np.asarray(outputs['retrieval'])[:, 0]
  np.testing.assert_allclose(np.sum(u_vec * np.asarray(model.item_vectors)[items], -1), cosine, atol=1e-5)
  feats = {k: model.user_table[k][users[:2]] for k in model.user_inputs}
  top, _ = model.recommend(feats, np.zeros((2, model.num_items), bool), np.tile(only, (2, 1)))
  u0 = {k: np.full(model.num_items, v[0]) for k, v in feats.items()}
  brute = model.score_rows(u0, np.arange(model.num_items), np.tile(only, (model.num_items, 1)))['score']
  np.testing.assert_array_equal(top[0], np.argsort(-brute, kind='stable')[:top.shape[1]])


def _export_copy(result, root, **export):
  """The run's network exported again with `config.export` fields changed: (ExportedModel, manifest)."""
  from mtl_rec import export as export_lib  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.loader import ExportedModel  # pylint: disable=g-import-not-at-top
  config = result.run.config.copy_and_resolve_references()
  config.export.update(export)
  version = export_lib.write_export(root, [result.run.network], export_lib.tables_from_experiment(result.run.exp),
                                    config, fusion_weights=export_lib.default_fusion_weights(result.metrics))
  return ExportedModel(version, max_batch_rows=256, max_recommend_users=4), json.load(
      open(os.path.join(version, 'manifest.json')))


@pytest.mark.slow
def test_retrieve_then_rerank_is_the_fused_ranking_of_the_retrieved_items(retrieval_run, tmp_path):
  """N = the whole catalog: the same lists as the fused heads scoring every item (retrieval changes nothing);
  N < catalog: the fused order of exactly the N items of largest retrieval score, excluded items never returned."""
  result, version = retrieval_run
  from mtl_rec.serving.loader import ExportedModel  # pylint: disable=g-import-not-at-top
  served = ExportedModel(version, max_batch_rows=256, max_recommend_users=4)  # N = 40
  full, m_full = _export_copy(result, str(tmp_path), retrieve_n=150)  # N = the catalog, still two stages
  brute, m_brute = _export_copy(result, str(tmp_path), retrieve_n=0)
  assert m_full['functions']['recommend']['retrieval']['candidates'] == 150
  assert 'retrieval' not in m_brute['functions']['recommend'] and brute.item_vectors is None
  users = np.arange(4) * 7
  feats = {k: served.user_table[k][users] for k in served.user_inputs}
  exclude = np.zeros((4, served.num_items), bool)
  for j, u in enumerate(users):
    exclude[j, served.seen_items(u)] = True
  exclude[3, :140] = True  # a user with 10 items left: fewer than k
  fusion = np.asarray([0.4, 0.3, 0.2, 0.1], np.float32)[:len(served.task_names)]  # every head counts
  assert len(served.task_names) == 4
  weights = np.tile(fusion, (4, 1))
  items_full, scores_full = full.recommend(feats, exclude, weights)
  items_brute, scores_brute = brute.recommend(feats, exclude, weights)
  np.testing.assert_allclose(scores_full, scores_brute, rtol=1e-6)
  finite = np.isfinite(scores_brute)
  assert finite.sum(1).tolist() == [20, 20, 20, 10]
  np.testing.assert_array_equal(items_full[finite], items_brute[finite])

  items, scores = served.recommend(feats, exclude, weights)
  only = np.asarray([1.0 if n == 'retrieval' else 0.0 for n in served.task_names], np.float32)
  for j in range(4):
    allowed = np.flatnonzero(~exclude[j])
    per_item = {k: np.full(allowed.size, v[j]) for k, v in feats.items()}
    cosine = served.score_rows(per_item, allowed, np.tile(only, (allowed.size, 1)))['score']
    candidates = allowed[np.argsort(-cosine, kind='stable')[:40]]
    fused = served.score_rows({k: v[:candidates.size] for k, v in per_item.items()}, candidates,
                              np.tile(fusion, (candidates.size, 1)))['score']
    expect = candidates[np.argsort(-fused, kind='stable')[:20]]
    n = min(20, candidates.size)
    np.testing.assert_array_equal(items[j, :n], expect[:n])
    np.testing.assert_allclose(scores[j, :n], np.sort(fused)[::-1][:n], rtol=1e-5)
    assert not exclude[j, items[j, :n]].any() and np.isneginf(scores[j, n:]).all()
  # with N < catalog some users' lists differ from the brute-force ones (else the test would not tell them apart)
  assert (items[finite] != items_brute[finite]).any()


def test_both_readers_give_batches_their_items_log_frequency(tiny_config, tmp_path):
  """The in-batch softmax's log q(item): the item's share of the training rows, the same from the log in memory and
  from the streamed survey; each batch row carries its item's key and log q."""
  from mtl_rec import experiment  # pylint: disable=g-import-not-at-top
  from mtl_rec.data import synthetic, write  # pylint: disable=g-import-not-at-top
  from mtl_rec.data.types import to_dataset  # pylint: disable=g-import-not-at-top
  write.write_dataset(to_dataset(synthetic.generate(num_users=60, num_items=40, interactions_per_user=10,
                                                    latent_dim=4, seed=0)), str(tmp_path), 'parquet',
                      row_group_size=100)
  c = tiny_config(train__batch_size=100)
  with c.unlocked():
    c.tasks.retrieval = config_lib.task('retrieval', 'observed')
  c.data.source = 'files'
  c.data.log.paths = (str(tmp_path / 'log.parquet'),)
  c.data.user_table.paths = (str(tmp_path / 'users.parquet'),)
  c.data.item_table.paths = (str(tmp_path / 'items.parquet'),)
  memory = experiment.build(c)
  counts = np.bincount(memory.item_index[memory.split.train], minlength=memory.num_items)
  want = np.log(np.maximum(counts, 1) / np.maximum(counts, 1).sum())
  np.testing.assert_allclose(memory.labels.item_logq, want, rtol=1e-6)
  c.data.reader = 'stream'
  streamed = experiment.build(c, workdir=str(tmp_path / 'run'))
  np.testing.assert_allclose(streamed.labels.item_logq, want, rtol=1e-6)
  for exp in (memory, streamed):
    batch = next(iter(exp.stream.epoch(0)))
    np.testing.assert_array_equal(batch['logq'], want[batch['item_key']].astype(np.float32))
    assert batch['item_key'].shape == batch['valid'].shape
  # mixed negatives: the same mixture from both readers (the streamed sampler draws from the surveyed counts)
  c.tasks.retrieval.negatives = 'mixed'
  c.sampling.distribution = 'popularity'
  c.data.reader = 'memory'
  mixed = experiment.build(c).labels.item_logq
  assert not np.allclose(mixed, want)
  c.data.reader = 'stream'
  np.testing.assert_allclose(experiment.build(c, workdir=str(tmp_path / 'run2')).labels.item_logq, mixed, rtol=1e-6)


@pytest.mark.slow
def test_ranking_by_the_retrieval_head_alone_uses_its_vectors_and_equals_the_network(retrieval_run):
  """One-hot retrieval weights score pairs and the catalog from the towers' vectors (what evaluation ranks by);
  the result equals the whole network's retrieval column, pair by pair and over the catalog."""
  from mtl_rec import scoring  # pylint: disable=g-import-not-at-top
  result, _ = retrieval_run
  run = result.run
  scorer = scoring.NetworkScorer([run.network], run.exp.encoder, 64)
  only = scorer.weights('retrieval')
  rng = np.random.default_rng(0)
  users, items = rng.integers(0, run.exp.num_users, 300), rng.integers(0, run.exp.num_items, 300)
  rows = rng.choice(run.exp.split.test, 300)
  fast = scorer.score_pairs(users, items, only, rows)
  slow = scoring.Scorer.score_pairs(scorer, users, items, only, rows)  # the network, pair by pair
  np.testing.assert_allclose(fast, slow, atol=2e-6)
  assert fast.std() > 0.01  # scores that differ, so equality says something
  fast = np.asarray(scorer.score_catalog(users[:5], only, rows[:5]))
  slow = np.asarray(scoring.Scorer.score_catalog(scorer, users[:5], only, rows[:5]))
  assert fast.shape == (5, run.exp.num_items)
  np.testing.assert_allclose(fast, slow, atol=2e-6)
  # other weights still go through the network
  mixed = np.full(len(scorer.task_names), 0.25, np.float32)
  np.testing.assert_allclose(scorer.score_pairs(users, items, mixed, rows),
                             scoring.Scorer.score_pairs(scorer, users, items, mixed, rows), atol=1e-6)


def test_the_towers_run_on_the_observed_rows_alone_with_a_fallback_to_all_rows():
  """Towers.on_rows: the towers of the selected rows, zeros elsewhere, whether they fit the bound (the MLPs then run
  on `bound` rows, not all) or not (then on all rows): the same vectors either way."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_rec import model as model_lib  # pylint: disable=g-import-not-at-top
  towers = model_lib.Towers(12, 8, (16,), 4, 0.0, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  user, item = jnp.asarray(rng.normal(size=(10, 12)), jnp.float32), jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
  rows = jnp.asarray([0, 1, 0, 0, 1, 1, 0, 0, 0, 1], jnp.float32)
  full = np.asarray(towers(user, item))
  want = full * np.asarray(rows)[:, None, None]
  for bound in (4, 6, 3, 10):  # 4 rows selected: they fit 4 and 6; 3 falls back to all rows; 10 = every row
    got = jax.jit(lambda u, i, r, b=bound: towers.on_rows(u, i, r, b))(user, item, rows)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  assert np.abs(want[np.asarray(rows) > 0]).min() > 0  # the selected rows are not the zeros of the others


def test_the_loss_and_gradient_do_not_change_when_the_towers_skip_the_negative_rows(tiny_config):
  """The training loss (trainer.loss_fn) with the towers on a bounded share of the rows (the default: twice the
  observed rows' expected share), on every row, or on a share too small for the batch (the fallback): one loss and
  one gradient, to rounding. With mixed negatives every row is a softmax column: no row is skipped."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_rec import experiment as experiment_lib, model as model_lib  # pylint: disable=g-import-not-at-top
  from mtl_rec import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  with c.unlocked():
    c.tasks.retrieval = config_lib.task('retrieval', 'observed')
  exp = experiment_lib.build(c)
  graphdef, state = nnx.split(model_lib.build(c, exp.encoder.specs, exp.specs))
  params = nnx.to_pure_dict(state)
  batch = jax.tree.map(jnp.asarray, next(exp.stream.epoch(0)))
  norms = tasks_lib.normalizers(batch, exp.specs)
  observed = float(jnp.sum(batch['labels']['retrieval'] * batch['valid']))
  n = batch['valid'].shape[0]
  assert 0 < observed < n / 2  # sampled negatives: most rows are not read by the in-batch softmax
  share = tasks_lib.tower_share(c.sampling.num_negatives)
  assert tasks_lib.tower_rows(batch, exp.specs, share)['retrieval'][1] == math.ceil(n * share) < n

  def loss_and_grad(tower_share):
    fn = lambda p: trainer_lib.loss_fn(p, batch, jax.random.key(0), norms, graphdef=graphdef, specs=exp.specs,
                                       esmm=False, embedding_l2=1e-4, tower_share=tower_share)
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  (loss, sums), grads = loss_and_grad(1.0)
  for tower_share in (share, (observed - 1) / n):  # the default bound, and one the batch overflows
    (loss_s, sums_s), grads_s = loss_and_grad(tower_share)
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(sums_s['retrieval']), float(sums['retrieval']), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6),
                 grads_s, grads)
  mixed = [dataclasses.replace(s, negatives='mixed') if s.kind == 'retrieval' else s for s in exp.specs]
  assert tasks_lib.tower_rows(batch, tuple(mixed), share) == {}

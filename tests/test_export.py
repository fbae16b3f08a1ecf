"""Export: the artifacts match the in-process model, recommend is an exact top-k, serving needs no model code, and
serving encodes raw feature values exactly as training did."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from jax import export as jax_export

from conftest import REPO
from mtl_rec import config as config_lib
from mtl_rec import encoding
from mtl_rec import evaluation
from mtl_rec import files
from mtl_rec import export as export_lib
from mtl_rec import model as model_lib
from mtl_rec import runs as runs_lib
from mtl_rec import tasks as tasks_lib
from mtl_rec.scoring import Network, NetworkScorer
from mtl_rec.serving.loader import ExportedModel, resolve_version_dir

pytestmark = pytest.mark.slow
FILES = ('score', 'recommend', 'weights.npz', 'users.npz', 'catalog.npz', 'seen.npz', 'manifest.json')


@pytest.fixture(scope='module')
def workdir(exported_run):
  return exported_run[0]


@pytest.fixture(scope='module')
def run(workdir):
  return runs_lib.load(workdir, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def version_dir(workdir):
  return os.path.join(workdir, 'export', '1')


@pytest.fixture(scope='module')
def manifest(version_dir):
  with open(os.path.join(version_dir, 'manifest.json')) as f:
    return json.load(f)


def _artifact(version_dir, name):
  with open(os.path.join(version_dir, name), 'rb') as f:
    return jax_export.deserialize(bytearray(f.read()))


def _params(version_dir, manifest):
  with np.load(os.path.join(version_dir, 'weights.npz'), allow_pickle=False) as w:
    return tuple(w[e['key']] for e in manifest['weights']['order'])


def _in_process(run, users, items, weights):
  """Task predictions and fused score (with {task: weight}) of the restored model, computed the way training
  evaluates it."""
  batch = run.exp.encoder.gather(users, items)
  preds = NetworkScorer([run.network], run.exp.encoder, run.config.eval.batch_size).predict_pairs(users, items)
  fused = sum(weights[s.name] * (preds[s.name] if s.kind == 'binary' else (preds[s.name] - 1) / 4)
              for s in run.network.specs)
  return preds, fused, batch


def test_training_writes_a_complete_export(workdir, manifest, version_dir, run):
  assert sorted(os.listdir(os.path.join(workdir, 'export'))) == ['1']
  for f in FILES:
    assert os.path.getsize(os.path.join(version_dir, f)) > 0, f
  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  c = run.config
  assert manifest['name'] == c.name and manifest['version'] == 1
  assert manifest['jax_version'] == jax.__version__ and manifest['platforms'] == ['cpu']
  assert manifest['metrics'] == pytest.approx(metrics['test'], nan_ok=True)
  assert [t['name'] for t in manifest['tasks']] == ['click', 'like', 'rating']
  assert {t['name']: t['kind'] for t in manifest['tasks']} == {'click': 'binary', 'like': 'binary',
                                                               'rating': 'regression'}
  assert manifest['fusion']['default_weights'] == metrics['default_fusion']['weights']  # chosen on validation
  # the model-selection rule: the best checkpoint's validation value is what metrics.json reports for it
  assert metrics['model_selection']['metric'] == 'rating_rmse' and metrics['model_selection']['mode'] == 'min'
  assert metrics['model_selection']['best_value'] == pytest.approx(metrics['valid']['rating_rmse'], abs=1e-6)
  assert manifest['config']['data']['synthetic']['num_users'] == 200
  assert manifest['vocabularies']['oov_row'] == 0
  assert manifest['catalog']['count'] == 120 and manifest['users']['count'] == 200
  assert manifest['functions']['recommend']['max_k'] == 20
  # The parameters are inputs, not constants: the artifacts stay small whatever the tables.
  assert os.path.getsize(os.path.join(version_dir, 'score')) < 200_000


def test_the_served_default_ranks_at_least_as_well_on_validation_as_any_head(workdir, manifest, run):
  """export.default_fusion='validation': the manifest's default weights are the candidate (fixed, learned,
  stacking, each head alone) with the best validation Recall@10, recomputed here from the restored model."""
  chosen = files.read_json(os.path.join(workdir, 'metrics.json'))['default_fusion']
  valid = chosen['valid']
  assert set(valid) == {'fixed', 'learned', 'stacking', 'head:click', 'head:like', 'head:rating'}
  assert valid[chosen['method']] == max(valid.values())
  scorer = NetworkScorer([run.network], run.exp.encoder, run.config.eval.batch_size)
  recall = lambda w: evaluation.catalog_ranking_metrics(
      run.exp, run.exp.split.valid, run.exp.history_rows('valid'),
      lambda u, r: scorer.score_catalog(u, np.asarray(w, np.float32), r))['recall@10']
  names = list(scorer.task_names)
  served = recall([manifest['fusion']['default_weights'][t] for t in names])
  assert served == pytest.approx(valid[chosen['method']], abs=1e-9)
  for j, t in enumerate(names):
    assert served >= recall(np.eye(len(names))[j]) - 1e-9, t
  c = run.config.copy_and_resolve_references()
  c.export.default_fusion = 'nearest'
  with pytest.raises(ValueError, match='export.default_fusion'):
    config_lib.validate(c)


def test_weights_load_with_numpy_alone(version_dir, manifest, run):
  with np.load(os.path.join(version_dir, 'weights.npz'), allow_pickle=False) as w:
    assert sorted(w.files) == sorted(e['key'] for e in manifest['weights']['order'])
    for e in manifest['weights']['order']:
      assert list(w[e['key']].shape) == e['shape'] and str(w[e['key']].dtype) == e['dtype']
  flat = jax.tree.leaves(jax.device_get(run.network.params))
  assert sum(x.size for x in flat) == manifest['members'][0]['num_params']


@pytest.mark.parametrize('n', [37, 256])
def test_score_matches_the_in_process_model(run, version_dir, manifest, n):
  rng = np.random.default_rng(n)
  users = rng.integers(0, run.exp.num_users, n)
  items = rng.integers(0, run.exp.num_items, n)
  preds, fused, batch = _in_process(run, users, items, manifest['fusion']['default_weights'])
  score = _artifact(version_dir, 'score')
  weights = np.tile(np.asarray([manifest['fusion']['default_weights'][t] for t in manifest['fusion']['order']],
                               np.float32), (n, 1))
  out = jax.jit(score.call)(_params(version_dir, manifest), batch['user'], batch['item'], batch['context'], weights)
  for t in ('click', 'like', 'rating'):
    np.testing.assert_allclose(np.asarray(out[t]), preds[t], atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out['score']), fused, atol=1e-5, rtol=0)


def test_recommend_is_the_exact_top_k_of_score(version_dir, manifest):
  model = ExportedModel(version_dir, max_batch_rows=1024, max_recommend_users=8)
  users = np.asarray([0, 3, 17, 50, 199])
  feats = {k: model.user_table[k][users] for k in model.user_inputs}
  exclude = np.zeros((users.size, model.num_items), bool)
  for r, u in enumerate(users):
    exclude[r, model.seen_items(u)] = True
  weights = np.tile(model.default_weights, (users.size, 1))
  weights[1] = [1.0, 0.0, 0.0]  # one row with overridden weights
  top_items, top_scores = model.recommend(feats, exclude, weights)
  k = manifest['functions']['recommend']['max_k']
  assert top_items.shape == (users.size, k)
  for r, u in enumerate(users):  # brute force: every catalog item through `score`
    all_items = np.arange(model.num_items)
    s = model.score_rows({n: np.repeat(feats[n][r:r + 1], model.num_items, axis=0) for n in feats}, all_items,
                         np.tile(weights[r], (model.num_items, 1)))['score']
    s = np.where(exclude[r], -np.inf, s)
    order = np.argsort(-s, kind='stable')[:k]
    np.testing.assert_allclose(top_scores[r], s[order], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(top_items[r], order)
    assert not np.isin(top_items[r], model.seen_items(u)).any()


def test_artifacts_hold_no_custom_calls(version_dir):
  for name in ('score', 'recommend'):
    mlir = _artifact(version_dir, name).mlir_module()
    assert set(re.findall(r'custom_call @(\w+)', mlir)) <= {'shape_assertion'}, name  # jax's own shape checks


def test_serving_loads_the_export_with_model_and_training_code_blocked(version_dir, run, manifest, import_blocker):
  users, items = np.asarray([1, 2, 3]), np.asarray([5, 6, 7])
  script = import_blocker + textwrap.dedent(f'''
      import json
      import numpy as np
      from mtl_rec.serving.loader import ExportedModel
      m = ExportedModel({version_dir!r}, max_batch_rows=16, max_recommend_users=1)
      users, items = np.asarray({users.tolist()}), np.asarray({items.tolist()})
      out = m.score_rows({{k: m.user_table[k][users] for k in m.user_inputs}}, items,
                         np.tile(m.default_weights, (3, 1)))
      blocked = [n for n in sys.modules if any(n == b or n.startswith(b + '.') for b in BLOCKED)]
      print(json.dumps({{'out': {{k: v.tolist() for k, v in out.items()}}, 'blocked_loaded': blocked}}))
  ''')
  r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got['blocked_loaded'] == []
  preds, fused, _ = _in_process(run, users, items, manifest['fusion']['default_weights'])
  for t in ('click', 'like', 'rating'):
    np.testing.assert_allclose(got['out'][t], preds[t], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got['out']['score'], fused, atol=1e-5, rtol=0)


def test_cli_exports_any_checkpoint_as_the_next_version(workdir, tmp_path):
  root = tmp_path / 'exports'
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints', 'latest')) if d.isdigit())
  export_lib.main(['--workdir', workdir, '--export_dir', str(root), '--step', str(steps[0])])
  assert sorted(os.listdir(root)) == ['1']  # nothing temporary left behind
  with open(root / '1' / 'manifest.json') as f:
    m = json.load(f)
  assert m['version'] == 1 and m['source']['step'] == steps[0]
  assert 'click_auc' in m['metrics']  # measured for that checkpoint
  assert export_lib.next_version(str(root)) == 2
  (root / '7').mkdir()  # a version being written by someone else (no manifest yet) is not served
  assert resolve_version_dir(str(root)) == str(root / '1')
  with pytest.raises(ValueError, match='immutable'):
    export_lib.export_run(workdir, export_root=str(root), version=1)
  with pytest.raises(SystemExit, match='not a run directory'):
    export_lib.main(['--workdir', str(tmp_path / 'nothing')])


def test_members_export_behind_the_same_interface(run, tmp_path, version_dir):
  """An ensemble (here: the unified network split into two members answering different tasks) exports the same
  functions; its scores equal the single-member export's."""
  n, specs = run.network, run.network.specs
  members = [Network(n.graphdef, n.params, specs[:1], name='click_model'),
             Network(n.graphdef, n.params, specs[1:], name='like_rating_model')]
  tables = export_lib.tables_from_experiment(run.exp)
  path = export_lib.write_export(str(tmp_path), members, tables, run.config, metrics={'note': 1.0},
                                 fusion_weights={'click': 1.0, 'like': 0.5, 'rating': 0.25}, name='ensemble')
  ens = ExportedModel(path, max_batch_rows=64)
  uni = ExportedModel(version_dir, max_batch_rows=64)
  assert ens.name == 'ensemble' and [m['name'] for m in ens.manifest['members']] == ['click_model',
                                                                                     'like_rating_model']
  users, items = np.arange(40) % run.exp.num_users, np.arange(40) % run.exp.num_items
  w = np.tile([1.0, 0.5, 0.25], (40, 1))
  a = ens.score_rows({k: ens.user_table[k][users] for k in ens.user_inputs}, items, w)
  b = uni.score_rows({k: uni.user_table[k][users] for k in uni.user_inputs}, items, w)
  for k in ('click', 'like', 'rating', 'score'):
    np.testing.assert_allclose(a[k], b[k], atol=1e-6)
  with pytest.raises(ValueError, match='overlapping tasks'):
    export_lib.write_export(str(tmp_path), members + members[:1], tables, run.config)
  with pytest.raises(ValueError, match='no network predicts'):
    export_lib.write_export(str(tmp_path), members, tables, run.config, fusion_weights={'ctr': 1.0})


def test_multiclass_rating_head_exports_its_expected_rating(run, tmp_path):
  """A like head predicting the rating's class exports the expected rating sum_c v_c * p_c, fused as
  (E[rating] - 1) / 4."""
  c = run.config.copy_and_resolve_references()
  c.tasks.like.kind = 'multiclass'
  c.tasks.like.classes = (1.0, 2.0, 3.0, 4.0, 5.0)  # the ratings, in class order; like: class value >= 4
  specs = tasks_lib.task_specs(c, tasks_lib.label_columns(c, run.exp.data), run.exp.split.train)
  assert specs[1].units == 5
  # Random weights of the right shapes (the head kind is the point; a real init costs seconds of compiles).
  graphdef, state = nnx.split(nnx.eval_shape(lambda: model_lib.build(c, run.exp.encoder.specs, specs)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype), nnx.to_pure_dict(state))
  path = export_lib.write_export(str(tmp_path), [Network(graphdef, params, specs)],
                                 export_lib.tables_from_experiment(run.exp), c)
  model = ExportedModel(path, max_batch_rows=64)
  like = {t['name']: t for t in model.manifest['tasks']}['like']
  assert like['output'] == 'value' and like['classes'] == [1.0, 2.0, 3.0, 4.0, 5.0] and like['scale'] == [1.0, 5.0]
  users, items = np.arange(30), np.arange(30)
  batch = run.exp.encoder.gather(users, items)
  outputs, _ = nnx.merge(graphdef, params)(batch)  # eager
  expected_like = (np.asarray(jax.nn.softmax(outputs['like'], -1)) * np.arange(1, 6)).sum(-1)
  out = model.score_rows({k: model.user_table[k][users] for k in model.user_inputs}, items,
                         np.tile([0.0, 1.0, 0.0], (30, 1)))
  np.testing.assert_allclose(out['like'], expected_like, atol=1e-5)
  np.testing.assert_allclose(out['score'], (expected_like - 1) / 4, atol=1e-5)


def test_export_config_is_validated(tiny_config):
  from mtl_rec import config as config_lib  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.export.max_k = 0
  with pytest.raises(ValueError, match='export.max_k'):
    config_lib.validate(c)
  c = tiny_config()
  c.export.platforms = ('gpu',)
  with pytest.raises(ValueError, match='export.platforms'):
    config_lib.validate(c)


def test_serving_encodes_raw_values_exactly_as_training(run, version_dir):
  """The rule is data: the server reads every input's encoding rule and vocabulary from the manifest; encoding the
  users' raw side values that way gives the rows training computed, value for value."""
  model = ExportedModel(version_dir, max_batch_rows=16)
  users = run.exp.data.users
  raw = {'gender': users['gender'], 'age': users['age'], 'occupation': users['occupation'], 'zip': users['zip_code']}
  assert set(model.user_fields) == set(raw) | {'user_history', 'user_liked'}  # a history is a request field too
  for field, values in raw.items():
    name, rule = model.user_fields[field]
    served = encoding.encode(rule, list(values.tolist()), model.vocabs)
    np.testing.assert_array_equal(served, run.exp.encoder.user_table[name], err_msg=field)
  # One value at a time, as requests give them, with unknown values on the OOV row.
  pos = 5
  given = {f: (v[pos].item() if hasattr(v[pos], 'item') else v[pos]) for f, v in raw.items()}
  feats = model.user_features(-1, given)
  for field in given:
    name = model.user_fields[field][0]
    assert feats[name] == run.exp.encoder.user_table[name][pos], field
  unknown = model.user_features(-1, {'gender': 'not-a-gender', 'age': None, 'zip': 'zz999', 'occupation': None})
  assert [unknown[n] for n in ('gender', 'age', 'zip', 'occupation')] == [0, 0, 0, 0]
  assert sorted(model.user_unknown_fields({'gender': 'not-a-gender', 'zip': 'zz999', 'age': 30})) == ['gender', 'zip']
  assert model.user_features(-1, {'age': 10**6})['age'] == len(model.rules['age']['boundaries']) + 1  # top bucket
  # A history given as raw item ids (most recent first) encodes to the item rows training pooled for that user.
  raw_of_row = dict(zip(model.item_table['item_id'].tolist(), model.items.ids.tolist()))
  trained = run.exp.encoder.user_table['user_history'][pos]
  given = [raw_of_row[r] for r in trained if r >= 0]
  assert given
  np.testing.assert_array_equal(model.user_features(-1, {'user_history': given})['user_history'], trained)
  liked = run.exp.encoder.user_table['user_liked'][pos]  # a history with a condition: the list as the client has it
  assert 0 < (liked >= 0).sum() < (trained >= 0).sum()
  np.testing.assert_array_equal(
      model.user_features(-1, {'user_liked': [raw_of_row[r] for r in liked if r >= 0]})['user_liked'], liked)

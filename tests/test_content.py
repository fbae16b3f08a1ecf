"""Content features and cold start: text and vector feature kinds, the cold split, cold items served from content.

The tokenizer and the vector checks are plain functions; the rest trains configs/shop_vectors.py (the synthetic
shop whose items are known by a vector) at a small size, with a text feature on the titles, and serves its export.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import shop_vectors
from conftest import REPO, http, start_server, stop_server, train_and_export
from mtl_rec import config as config_lib
from mtl_rec import encoding
from mtl_rec import features as features_lib
from mtl_rec.config import feature
from mtl_rec.data import splits, synthetic
from mtl_rec.errors import DataError

# Strings a tokenizer gets wrong in many small ways: case, accents (composed and decomposed), full-width and
# ligature forms (NFKC), ß (case folding), digits, punctuation-only, whitespace-only, empty, emoji, CJK, apostrophes.
TRICKY = ['Toy Story (1995)', 'TOY story', 'Café', 'Cafe\u0301', 'ＡＢＣ ｄｅｆ', 'Straße STRASSE', 'ﬁsh & chips',
          '...!?', '   ', '', 'naïve—résumé', "don't stop", '東京 物語', 'a🙂b', 'x_y 42', 'Ωmega ΣΊΣΥΦΟΣ']


def test_tokens_of_tricky_strings():
  assert encoding.tokens('Toy Story (1995)') == ['toy', 'story', '1995']
  assert encoding.tokens('Café') == encoding.tokens('Cafe\u0301') == ['café']  # NFKC composes the accent
  assert encoding.tokens('ＡＢＣ ｄｅｆ') == ['abc', 'def']  # full-width letters
  assert encoding.tokens('Straße STRASSE') == ['strasse', 'strasse']  # case folding, not lowercasing
  assert encoding.tokens('ﬁsh & chips') == ['fish', 'chips']
  assert encoding.tokens('...!?') == encoding.tokens('   ') == encoding.tokens('') == []
  assert encoding.tokens("don't stop", bigrams=True) == ['don', 't', 'stop', 'don t', 't stop']
  assert encoding.tokens('ab', char_ngrams=3) == ['ab', '#<ab', '#ab>']
  assert encoding.tokens('a', char_ngrams=4) == ['a', '#<a>']  # a word shorter than n: the padded word itself
  assert encoding.tokens('x' * 1000 + ' y') == ['x' * encoding.MAX_TOKEN_CHARS, 'y']  # bounded work per string


def test_a_fitted_text_vocabulary_keeps_tokens_of_several_training_rows():
  """min_count counts the training rows whose text holds a token: 'story' (two titles) is kept, a word of one
  title is dropped, and a title seen only outside training counts for nothing."""
  ds = _tricky_dataset(4)  # 'Toy Story (1995)', 'TOY story', 'Café', 'Cafe\u0301'
  enc = features_lib.fit(ds, np.arange(3), _text_config(min_count=2), np.zeros(4, np.int64), np.arange(4))
  assert enc.vocabs['title'].keys.tolist() == ['story', 'toy']  # 'café' is in one training row only
  rows = enc.item_table['title']
  assert rows[0].tolist()[:3] == [1, 0, -1] and rows[1].tolist()[:3] == [1, 0, -1]  # toy, story; 1995 dropped
  assert (rows[2:] == -1).all() and enc.spec('title').vocab_size == 2


def test_text_rows_are_distinct_hashed_tokens_padded():
  rule = {'kind': 'text', 'buckets': 1000, 'bigrams': False, 'char_ngrams': 0, 'max_tokens': 3}
  rows = encoding.encode(rule, ['b a b', '', None, 'a b c d e'], {})
  assert rows.shape == (4, 3) and rows.dtype == np.int32
  a, b = encoding.encode(rule, ['a', 'b'], {})[:, 0]
  assert rows[0].tolist() == [b, a, -1]  # distinct tokens, in order of appearance
  assert rows[1].tolist() == rows[2].tolist() == [-1, -1, -1]  # empty and missing: no tokens
  assert rows[3, :2].tolist() == [a, b] and -1 not in rows[3]  # the first max_tokens only
  assert encoding.missing(rule).tolist() == [-1, -1, -1]


def _tricky_dataset(n=len(TRICKY)):
  """A Dataset whose items' titles are the tricky strings (every item has one log row)."""
  from mtl_rec.data.types import Dataset  # pylint: disable=g-import-not-at-top
  ids = np.asarray([f'i{j}' for j in range(n)])
  return Dataset(name='t', source='t', log={'user': np.asarray(['u0'] * n), 'item': ids},
                 users={'user': np.asarray(['u0'])}, items={'item': ids, 'title': np.asarray(TRICKY[:n])},
                 user_column='user', item_column='item')


def _text_config(**text):
  c = config_lib.base_config()
  c.features = {'item': feature('item', 'item'), 'title': feature('item', kind='text', **text)}
  return c


@pytest.mark.slow
@pytest.mark.parametrize('text', [{}, {'vocabulary': 'hash', 'hash_buckets': 997},
                                  {'bigrams': True, 'char_ngrams': 3, 'max_tokens': 24}])
def test_serving_tokenizes_exactly_as_training(text, import_blocker):
  """The rule and vocabulary go through JSON to a process where only numpy and mtl_rec.encoding can be imported
  (serving's); its token ids for the tricky strings equal the ids training's feature encoder computed."""
  ds = _tricky_dataset()
  n = len(TRICKY)
  enc = features_lib.fit(ds, np.arange(n), _text_config(**text), np.zeros(n, np.int64), np.arange(n))
  rule = json.dumps(enc.spec('title').encoding)
  keys = json.dumps(enc.vocabs['title'].keys.tolist() if 'title' in enc.vocabs else [])
  code = import_blocker + (f'import json, numpy as np\nfrom mtl_rec import encoding\n'
                           f'vocabs = {{"title": encoding.Vocab(np.asarray(json.loads({keys!r}), dtype=np.str_))}}\n'
                           f'rows = encoding.encode(json.loads({rule!r}), json.loads({json.dumps(TRICKY)!r}), vocabs)\n'
                           f'print(json.dumps(rows.tolist()))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=True)
  served = np.asarray(json.loads(out.stdout))
  np.testing.assert_array_equal(served, enc.item_table['title'])
  assert (served >= 0).sum() > n  # not all padding: the strings have tokens
  assert (served[TRICKY.index('Café')] == served[TRICKY.index('Cafe\u0301')]).all()
  assert (served[TRICKY.index('')] == -1).all() and (served[TRICKY.index('...!?')] == -1).all()


def test_vector_rows_are_checked():
  rule = {'kind': 'vector', 'dim': 3, 'delimiter': '|'}
  out = encoding.encode(rule, [[1, 2, 3], '4|5|6', None, [], float('nan'), ''], {})
  assert out.dtype == np.float32 and out.tolist() == [[1, 2, 3], [4, 5, 6]] + [[0, 0, 0]] * 4  # missing: zeros
  for bad, phrase in [([[1, 2, 3], [1, 2]], 'row 2 has 2 numbers, the feature declares dim=3'),
                      ([[1, float('inf'), 3]], 'row 1 holds a non-finite number'),
                      (['1|x|3'], 'row 1 holds a value that is not a number')]:
    with pytest.raises(ValueError, match=phrase):
      encoding.encode(rule, bad, {})


def test_a_wrong_length_vector_in_the_data_is_a_clear_error():
  ds = synthetic.shop(num_users=20, num_items=10, interactions_per_user=3, item_vector_dim=4)
  c = config_lib.base_config()
  c.features = {'item': feature('item', 'item'), 'embedding': feature('item', kind='vector', dim=5)}
  n = ds.num_rows
  index = lambda column, table: np.searchsorted(table, column)
  with pytest.raises(DataError, match=r"the items table: column 'embedding' of feature 'embedding': row 1 has 4 "
                                      r'numbers, the feature declares dim=5.*features.embedding.dim'):
    features_lib.fit(ds, np.arange(n), c, index(ds.log['user'], ds.users['user']),
                     index(ds.log['item'], ds.items['item']))


def test_cold_items_appear_only_in_validation_and_test():
  ds = synthetic.shop(num_users=200, num_items=60, interactions_per_user=8)
  dc = config_lib.base_config().data
  dc.split = 'random'
  plain = splits.make_split(ds, dc, seed=3)
  assert plain.cold == {}
  dc.cold_items = 0.2
  split = splits.make_split(ds, dc, seed=3)
  cold = split.cold['items']
  assert cold.size == 12 and set(cold) <= set(ds.items['item'])
  item = ds.log['item']
  assert not np.isin(item[split.train], cold).any()
  assert np.isin(item[split.valid], cold).any() and np.isin(item[split.test], cold).any()
  np.testing.assert_array_equal(split.test, plain.test)  # the test rows do not move
  # Nothing is lost: every row is in exactly one part; the cold items' training rows went to validation.
  everything = np.concatenate([split.train, split.valid, split.test])
  assert np.array_equal(np.sort(everything), np.arange(ds.num_rows))
  assert np.array_equal(split.train, plain.train[~np.isin(item[plain.train], cold)])
  np.testing.assert_array_equal(splits.make_split(ds, dc, seed=3).cold['items'], cold)  # seeded
  assert not np.array_equal(splits.make_split(ds, dc, seed=4).cold['items'], cold)
  dc.cold_items, dc.cold_users = 0.0, 0.1
  users = splits.make_split(ds, dc, seed=3)
  assert set(users.cold) == {'users'} and not np.isin(ds.log['user'][users.train], users.cold['users']).any()


# ---------------------------------------------------------------------------------------------------------------
# A trained, exported run with content features (slow).


def content_config(**synthetic_sizes):
  """configs/shop_vectors.py, small, with a text feature on the titles and 20% of the items cold."""
  c = shop_vectors.get_config()
  c.data.synthetic.update({'num_users': 300, 'num_items': 80, 'interactions_per_user': 10, **synthetic_sizes})
  c.data.cold_items = 0.2
  c.features.title = feature('item', kind='text', vocabulary='hash', hash_buckets=64, char_ngrams=3)
  c.train.progress_bar = False
  c.mesh.shape = (1, 1)
  c.train.epochs = 3
  return c


@pytest.fixture(scope='module')
def content_run(tmp_path_factory):
  """(TrainResult, export version dir) of content_config()."""
  return train_and_export(content_config(), str(tmp_path_factory.mktemp('content_run')))


@pytest.mark.slow
def test_cold_start_metrics_are_reported_apart(content_run):
  m = content_run[0].metrics
  assert set(m['test_cold_start']) == {'cold_items', 'warm_items'}
  assert set(m['baselines_cold_start']['popularity']) == {'cold_items', 'warm_items'}
  for part in ('cold_items', 'warm_items'):
    assert {'click_auc', 'add_to_cart_auc', 'watch_fraction_rmse', 'recall@10'} <= set(m['test_cold_start'][part])
    assert 0 <= m['test_cold_start'][part]['recall@10'] <= 1
  # Popularity knows nothing of items that had no training rows: every cold item scores 0, an AUC of exactly 0.5.
  assert m['baselines_cold_start']['popularity']['cold_items']['click_auc'] == 0.5


@pytest.mark.slow
def test_cold_items_are_served_from_their_content(content_run, tmp_path, import_blocker):
  """An item the export does not know, given with its content features, scores exactly like the same features
  scored in process; the response says it was cold and scored from the request's features."""
  from mtl_rec.scoring import NetworkScorer  # pylint: disable=g-import-not-at-top
  result, path = content_run
  run = result.run
  ds = run.exp.data
  cold = run.exp.split.cold['items']
  pos = int(np.flatnonzero(ds.items['item'] == cold[0])[0])  # a cold item: its id is out of vocabulary
  user = 4
  scorer = NetworkScorer([run.network], run.exp.encoder, 64)
  with open(os.path.join(path, 'manifest.json')) as f:
    defaults = json.load(f)['fusion']['default_weights']  # what /v1/score fuses with when a request gives none
  weights = np.asarray([defaults[t] for t in scorer.task_names], np.float32)
  expected = scorer.score_pairs(np.asarray([user]), np.asarray([pos]), weights)[0]
  content = {'title': str(ds.items['title'][pos]), 'embedding': [float(v) for v in ds.items['embedding'][pos]]}
  user_id = str(ds.users['user'][user])
  warm_id = str(next(i for i in ds.items['item'] if i not in cold))
  log_path = tmp_path / 'server.log'
  url, proc = start_server(path, log_path, import_blocker)
  try:
    body = {'user': {'user_id': user_id}, 'items': [{'item_id': 'new-1', **content}, str(cold[0]), warm_id,
                                                    {'item_id': warm_id}]}
    status, out, _ = http(url, '/v1/score', body)
    assert status == 200, out
    new, catalog_cold, warm, warm_object = out['items']
    # an object without content fields is the catalog's item, scored from the catalog's features
    assert 'features' not in warm_object and warm_object['score'] == pytest.approx(warm['score'], abs=1e-6)
    assert new['item_id'] == 'new-1' and new['cold_start'] is True and new['features'] == 'request'
    assert catalog_cold['cold_start'] is True and 'features' not in catalog_cold
    assert warm['cold_start'] is False
    np.testing.assert_allclose([new['score'], catalog_cold['score']], [expected, expected], atol=1e-5)
    # Content matters: another vector gives another score.
    other = dict(content, embedding=[v + 1.0 for v in content['embedding']])
    _, out2, _ = http(url, '/v1/score', {'user': {'user_id': user_id}, 'items': [{'item_id': 'new-1', **other}]})
    assert abs(out2['items'][0]['score'] - expected) > 1e-4
    # recommend ranks described new items with the catalog.
    status, rec, _ = http(url, '/v1/recommend', {'user_id': user_id, 'k': 80, 'exclude_seen': False,
                                                 'items': [{'item_id': 'new-1', **content}]})
    assert status == 200, rec
    entry = next(e for e in rec['items'] if e['item_id'] == 'new-1')
    assert entry['cold_start'] is True and abs(entry['score'] - expected) < 1e-5
    scores = [e['score'] for e in rec['items']]
    assert scores == sorted(scores, reverse=True)
    # Bad content: a 4xx naming the field, and the server keeps serving.
    dim = shop_vectors.VECTOR_DIM
    for item, phrase in [({'item_id': 'n', 'embedding': [0.5] * (dim - 1)}, f'have {dim}'),
                         ({'item_id': 'n', 'embedding': [0.5] * (dim - 1) + ['x']}, 'items[0].embedding'),
                         ({'item_id': 'n', 'embedding': 'fast'}, 'items[0].embedding'),
                         ({'item_id': 'n', 'title': 7}, 'items[0].title'),
                         ({'item_id': 'n', 'colour': 'red'}, "unknown field 'colour'"),
                         ({'title': 'no id'}, 'items[0].item_id is missing')]:
      status, out, _ = http(url, '/v1/score', {'user': {'user_id': user_id}, 'items': [item]})
      assert status == 400 and phrase in out['error'], (item, out)
    status, out, _ = http(url, '/v1/score', b'{"user": {"user_id": "u1"}, "items": [{"item_id": "n", '
                          b'"embedding": [NaN' + b', 0' * (dim - 1) + b']}]}')
    assert status == 400 and 'finite' in out['error'], out
    status, out, _ = http(url, '/v1/recommend', {'user_id': user_id, 'items': [warm_id]})
    assert status == 400 and 'item objects' in out['error'], out
    status, out, _ = http(url, '/v1/recommend', {'user_id': user_id, 'items': [{'item_id': warm_id, **content}]})
    assert status == 400 and 'is in the catalog' in out['error'], out  # it would be listed twice
    huge = b'{"user": {"user_id": "u1"}, "items": [{"item_id": "n", "embedding": [1' + b'0' * 400 + b', 0]}]}'
    status, out, _ = http(url, '/v1/score', huge)  # float() of it overflows: a 400, not a 500
    assert status == 400 and 'items[0].embedding' in out['error'], out
    assert http(url, '/v2/health/ready')[0] == 200
  finally:
    stop_server(proc, log_path)


@pytest.mark.slow
def test_a_vector_feature_recovers_cold_items(tmp_path):
  """configs/shop_vectors.py: the items' planted factors, popularity and quality are only in the vector. With it the
  model ranks cold items' clicks well above chance; with the id alone every cold item is the same OOV row."""
  from mtl_rec import loop  # pylint: disable=g-import-not-at-top
  aucs = {}
  for name in ('vector', 'id only'):
    c = content_config(num_users=500, num_items=150, interactions_per_user=15)
    with c.unlocked():
      del c.features['title']
      if name == 'id only':
        del c.features['embedding']
    c.export.enabled = False
    m = loop.train_and_evaluate(c, str(tmp_path / name.replace(' ', '_'))).metrics
    aucs[name] = m['test_cold_start']['cold_items']['click_auc']
  assert aucs['vector'] > 0.65 and aucs['vector'] > aucs['id only'] + 0.1, aucs


def test_cold_start_benchmark_variants_and_report():
  from configs import movielens_100k  # pylint: disable=g-import-not-at-top
  from mtl_rec import cold_start_benchmark as csb  # pylint: disable=g-import-not-at-top
  assert csb.variants(movielens_100k.get_config()) == {
      'ids only': ['genres', 'year', 'title'], 'ids + genres, year': ['title'], 'ids + title': ['genres', 'year'],
      'ids + genres, year, title': []}
  assert csb.variants(shop_vectors.get_config()) == {'ids only': ['embedding'], 'ids + embedding': []}
  c = csb.run_config(movielens_100k.get_config(), ['title'], seed=2, cold_items=0.1)
  assert 'title' not in c.features and c.seed == 2 and c.data.cold_items == 0.1 and not c.export.enabled
  bare = movielens_100k.get_config()
  with bare.unlocked():
    for name in ('genres', 'year', 'title'):
      del bare.features[name]
  with pytest.raises(ValueError, match='no item feature besides the id'):
    csb.variants(bare)
  run = lambda auc, pop: {'test_cold_start': {'cold_items': {'click_auc': auc}, 'warm_items': {'click_auc': 0.9}},
                          'baselines_cold_start': {'popularity': {'cold_items': {'click_auc': pop},
                                                                  'warm_items': {'click_auc': 0.8}}}}
  report = csb.build_report({'ids only': [run(0.5, 0.5), run(0.5, 0.5)], 'all': [run(0.6, 0.5), run(0.7, 0.5)]})
  cell = report['variants']['all']['cold_items']['click_auc']
  assert cell['mean'] == pytest.approx(0.65) and cell['std'] == pytest.approx(np.std([0.6, 0.7], ddof=1))
  assert report['popularity']['warm_items']['click_auc']['mean'] == pytest.approx(0.8) and report['seeds'] == 2
  text = csb.render_markdown(report, csb.run_config(movielens_100k.get_config(), [], 0, 0.1))
  assert '## cold items' in text and '| `click_auc` | 0.5000 ± 0.0000 | 0.6500 ± 0.0707 | 0.5000 ± 0.0000 |' in text


@pytest.mark.parametrize('fmt', ['parquet', 'csv'])
def test_vectors_read_back_from_parquet_and_csv_exactly(tmp_path, fmt):
  """A list<double> Parquet column and a '|'-joined CSV column give the same float32 rows as the generator's."""
  from configs import shop  # pylint: disable=g-import-not-at-top
  from mtl_rec import experiment  # pylint: disable=g-import-not-at-top
  from mtl_rec.data import write  # pylint: disable=g-import-not-at-top
  ds = synthetic.shop(num_users=60, num_items=20, interactions_per_user=5, item_vector_dim=4)
  write.write_dataset(ds, str(tmp_path), fmt)
  c = shop.get_config(str(tmp_path))
  c.data.log.paths = (str(tmp_path / f'log*.{fmt}'),)
  c.data.user_table.paths = (str(tmp_path / f'users.{fmt}'),)
  c.data.item_table.paths = (str(tmp_path / f'items.{fmt}'),)
  c.features.embedding = feature('item', kind='vector', dim=4)
  exp = experiment.build(c)
  order = [list(ds.items['item']).index(i) for i in exp.data.items['item']]
  want = np.asarray([ds.items['embedding'][j] for j in order], np.float32)
  np.testing.assert_array_equal(exp.encoder.item_table['embedding'], want)

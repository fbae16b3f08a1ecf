"""serve.py end to end: plain HTTP, tritonclient.http, 30+ kinds of bad input, batching and metrics.

One server per module, started the way users start it (serve.py in a subprocess), with mtl_rec's model and
training modules blocked from import: serving must run from the export alone.
"""

import concurrent.futures
import gzip
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, http, start_server, stop_server
from mtl_rec.serving.loader import ExportedModel

pytestmark = pytest.mark.slow

MAX_BODY = 65536
MAX_ITEMS = 200


@pytest.fixture(scope='module')
def export_dir(exported_run):
  return os.path.join(exported_run[0], 'export')


@pytest.fixture(scope='module')
def model(export_dir):
  return ExportedModel(os.path.join(export_dir, '1'), max_batch_rows=256, max_recommend_users=4)


@pytest.fixture(scope='module')
def server(export_dir, tmp_path_factory, import_blocker):
  """(base url, process) of serve.py on a free port."""
  log_path = tmp_path_factory.mktemp('server') / 'stderr.log'
  url, proc = start_server(export_dir, log_path, import_blocker, '--max_batch_rows=256', '--max_recommend_users=4',
                           '--max_wait_ms=5', f'--max_body_bytes={MAX_BODY}', f'--max_items={MAX_ITEMS}')
  yield url, proc
  stop_server(proc, log_path)


def known_user(model, pos=3):
  return str(model.users.ids[pos])


def item_ids(model, n, start=0):
  return [str(x) for x in model.items.ids[start:start + n]]


def test_score_over_plain_http_matches_the_export(server, model):
  url, _ = server
  user, items = known_user(model), item_ids(model, 50) + ['no-such-item']
  status, out, _ = http(url, '/v1/score', {'user': {'user_id': user}, 'items': items})
  assert status == 200, out
  assert out['model'] == model.name and out['version'] == 1
  assert out['user'] == {'user_id': user, 'known': True, 'cold_start': False, 'features': 'table'}
  assert [e['item_id'] for e in out['items']] == items
  assert [e['cold_start'] for e in out['items']] == [False] * 50 + [True]
  pos = model.users.position(user)
  ref = model.score_rows({k: np.repeat(model.user_table[k][pos:pos + 1], 51, axis=0) for k in model.user_inputs},
                         model.items.lookup(items), np.tile(model.default_weights, (51, 1)))
  for t in ('click', 'like', 'rating', 'score'):
    np.testing.assert_allclose([e[t] for e in out['items']], ref[t], atol=1e-5)
  # the export's default weights: chosen on validation at the end of training (metrics.json default_fusion)
  assert out['weights'] == pytest.approx(dict(zip(model.task_names, model.default_weights.tolist())), rel=1e-6)


def test_weights_override_and_integer_ids(server, model):
  url, _ = server
  ids = [int(x) for x in model.items.ids[:5]]
  status, out, _ = http(url, '/v1/score', {'user': {'user_id': int(known_user(model))}, 'items': ids,
                                           'weights': {'click': 1.0, 'like': 0, 'rating': 0}})
  assert status == 200, out
  assert [e['item_id'] for e in out['items']] == ids
  np.testing.assert_allclose([e['score'] for e in out['items']], [e['click'] for e in out['items']], atol=1e-6)


def test_recommend_for_a_history_the_request_gives_leaves_its_items_out(server, model):
  """A user unknown to the export who brings a history (raw item ids, most recent first): it moves the ranking, and
  exclude_seen leaves its items out as it does a known user's training items."""
  url, _ = server
  _, plain, _ = http(url, '/v1/recommend', {'user': {'user_id': 'new-user'}, 'k': 20})
  liked = [str(e['item_id']) for e in plain['items'][:5]]  # what a user with nothing known gets first
  status, out, _ = http(url, '/v1/recommend', {'user': {'user_id': 'new-user', 'user_history': liked}, 'k': 10})
  assert status == 200, out
  assert out['user']['features'] == 'request' and out['unknown_values'] == []
  got = [str(e['item_id']) for e in out['items']]
  assert len(got) == 10 and not set(got) & set(liked)
  _, kept, _ = http(url, '/v1/recommend', {'user': {'user_id': 'new-user', 'user_history': liked}, 'k': 20,
                                           'exclude_seen': False})
  assert [e['score'] for e in kept['items']] != [e['score'] for e in plain['items']]  # the history counts
  kept_ids = [str(e['item_id']) for e in kept['items']]
  assert set(kept_ids[:10]) & set(liked)  # without exclude_seen some of them rank in the top 10
  assert got == [i for i in kept_ids if i not in liked][:10]  # exclude_seen takes out exactly those


def test_cold_start_user_uses_oov_rows_or_given_features(server, model):
  url, _ = server
  items = item_ids(model, 10)
  _, plain, _ = http(url, '/v1/score', {'user': {'user_id': 'new-user'}, 'items': items})
  assert plain['user'] == {'user_id': 'new-user', 'known': False, 'cold_start': True, 'features': 'oov'}
  status, rich, _ = http(url, '/v1/score', {'user': {'user_id': 'new-user', 'gender': 'F', 'age': 31,
                                                     'occupation': 'engineer', 'zip': '94110'}, 'items': items})
  assert status == 200, rich
  assert rich['user']['features'] == 'request' and rich['user']['cold_start']
  assert [e['score'] for e in rich['items']] != [e['score'] for e in plain['items']]
  unknown = {k: np.repeat(model.user_table[k][-1:], 10, axis=0) for k in model.user_inputs}  # the table's last row
  assert all(np.all(v == (-1 if v.ndim == 2 else 0)) for v in unknown.values())  # OOV rows, an empty history
  ref = model.score_rows(unknown, model.items.lookup(items), np.tile(model.default_weights, (10, 1)))
  np.testing.assert_allclose([e['score'] for e in plain['items']], ref['score'], atol=1e-5)


def test_recommend_excludes_seen_items_and_agrees_with_score(server, model):
  url, _ = server
  user = known_user(model, 7)
  status, out, _ = http(url, '/v1/recommend', {'user_id': user, 'k': 10})
  assert status == 200, out
  got = [e['item_id'] for e in out['items']]
  assert len(got) == 10 and out['exclude_seen'] is True
  seen = {str(model.items.ids[i]) for i in model.seen_items(model.users.position(user))}
  assert seen and not seen & {str(i) for i in got}
  scores = [e['score'] for e in out['items']]
  assert scores == sorted(scores, reverse=True)
  _, scored, _ = http(url, '/v1/score', {'user': {'user_id': user}, 'items': got})
  np.testing.assert_allclose([e['score'] for e in scored['items']], scores, atol=1e-5)
  _, everything, _ = http(url, '/v1/recommend', {'user_id': user, 'k': 20, 'exclude_seen': False})
  assert everything['items'][0]['score'] >= scores[0] - 1e-6
  assert out['items'][0]['title']


def test_tritonclient_round_trip(server, model):
  import tritonclient.http as triton  # pylint: disable=g-import-not-at-top
  url, _ = server
  client = triton.InferenceServerClient(url.replace('http://', ''))
  assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model.name)
  meta = client.get_model_metadata(model.name)
  assert meta['name'] == model.name and {i['name'] for i in meta['inputs']} == {'user_id', 'item_id'}
  assert {o['name'] for o in meta['outputs']} >= {'click', 'like', 'rating', 'score'}
  user, items = known_user(model), item_ids(model, 20)
  _, ref, _ = http(url, '/v1/score', {'user': {'user_id': user}, 'items': items})

  # BYTES ids as binary tensors (tritonclient's default), all outputs binary.
  u = triton.InferInput('user_id', [1], 'BYTES')
  u.set_data_from_numpy(np.asarray([user.encode()], dtype=object))
  i = triton.InferInput('item_id', [20], 'BYTES')
  i.set_data_from_numpy(np.asarray([x.encode() for x in items], dtype=object))
  res = client.infer(model.name, [u, i], request_id='r1')
  assert res.get_response()['id'] == 'r1'
  for t in ('click', 'like', 'rating', 'score'):
    np.testing.assert_allclose(res.as_numpy(t), [e[t] for e in ref['items']], atol=1e-5)
  assert not res.as_numpy('item_cold_start').any()

  # INT64 ids as JSON, one user per row, selected outputs as JSON, gzip-compressed request.
  u = triton.InferInput('user_id', [20, 1], 'INT64')
  u.set_data_from_numpy(np.full((20, 1), int(user), np.int64), binary_data=False)
  i = triton.InferInput('item_id', [20, 1], 'INT64')
  i.set_data_from_numpy(np.asarray([[int(x)] for x in items], np.int64), binary_data=False)
  res = client.infer(model.name, [u, i], outputs=[triton.InferRequestedOutput('score', binary_data=False)],
                     request_compression_algorithm='gzip')
  assert res.as_numpy('score').shape == (20, 1)
  np.testing.assert_allclose(res.as_numpy('score')[:, 0], [e['score'] for e in ref['items']], atol=1e-5)
  assert res.as_numpy('click') is None
  with pytest.raises(Exception, match='unknown model'):
    client.infer('no_such_model', [u, i])


def _infer(inputs, **extra):
  return {'inputs': inputs, **extra}


def _t(name, data, datatype='BYTES', shape=None):
  return {'name': name, 'datatype': datatype, 'shape': shape or [len(data)], 'data': data}


GOOD_USER = _t('user_id', ['1'])
GOOD_ITEMS = _t('item_id', ['1', '2'])

# (name, method, path, body (bytes or JSON-able), headers, expected status, a phrase the error must contain)
BAD_REQUESTS = [
    ('invalid json', 'POST', '/v1/score', b'{"user": ', None, 400, 'invalid JSON'),
    ('empty body', 'POST', '/v1/score', b'', None, 400, 'empty body'),
    ('nan literal', 'POST', '/v1/score', b'{"user": {"user_id": "1"}, "items": ["1"], "weights": {"click": NaN}}',
     None, 400, 'invalid JSON'),
    ('overflowing number', 'POST', '/v1/score',
     b'{"user": {"user_id": "1"}, "items": ["1"], "weights": {"click": 1e999}}', None, 400, 'overflows'),
    ('infinity literal', 'POST', '/v1/score',
     b'{"user": {"user_id": "1"}, "items": ["1"], "weights": {"click": -Infinity}}', None, 400, 'invalid JSON'),
    ('not utf-8', 'POST', '/v1/score', b'{"user": "\xff\xfe"}', None, 400, 'the body is not valid UTF-8'),
    ('a surrogate encoded in utf-8 in an id', 'POST', '/v1/score',
     b'{"user": {"user_id": "u\xed\xa0\x80"}, "items": ["1"]}', None, 400, 'the body is not valid UTF-8'),
    ('a surrogate encoded in utf-8, recommend', 'POST', '/v1/recommend', b'{"user_id": "\xed\xb0\x80", "k": 2}',
     None, 400, 'not valid UTF-8'),
    ('a utf-16 body', 'POST', '/v1/score', '{"user": {"user_id": "1"}, "items": ["1"]}'.encode('utf-16'), None,
     400, 'not valid UTF-8'),
    ('lone surrogate escape in an id', 'POST', '/v1/score', b'{"user": {"user_id": "\\ud800"}, "items": ["1"]}',
     None, 400, 'surrogate'),
    ('lone surrogate in a v2 BYTES id', 'POST', '/v2/models/{model}/infer',
     _infer([_t('user_id', ['\udc00', '1']), GOOD_ITEMS]), None, 400, 'surrogate'),
    ('gzip header, body not gzip', 'POST', '/v1/score', b'{"user": {"user_id": "1"}, "items": ["1"]}',
     {'Content-Encoding': 'gzip'}, 400, 'Content-Encoding'),
    ('deep nesting', 'POST', '/v1/score', b'{"user": ' + b'[' * 30000 + b']' * 30000 + b'}', None, 400,
     'nested too deeply'),
    ('body is an array', 'POST', '/v1/score', [1, 2], None, 400, 'JSON object'),
    ('body is a string', 'POST', '/v1/score', 'hello', None, 400, 'JSON object'),
    ('missing user', 'POST', '/v1/score', {'items': ['1']}, None, 400, 'user is missing'),
    ('user not an object', 'POST', '/v1/score', {'user': '1', 'items': ['1']}, None, 400, 'user must be an object'),
    ('missing user_id', 'POST', '/v1/score', {'user': {}, 'items': ['1']}, None, 400, 'user.user_id is missing'),
    ('user_id is a float', 'POST', '/v1/score', {'user': {'user_id': 1.5}, 'items': ['1']}, None, 400,
     'string or an integer'),
    ('user_id is a bool', 'POST', '/v1/score', {'user': {'user_id': True}, 'items': ['1']}, None, 400,
     'string or an integer'),
    ('user_id empty', 'POST', '/v1/score', {'user': {'user_id': ''}, 'items': ['1']}, None, 400, 'empty string'),
    ('user_id too long', 'POST', '/v1/score', {'user': {'user_id': 'x' * 300}, 'items': ['1']}, None, 400,
     'characters long'),
    ('unknown user field', 'POST', '/v1/score', {'user': {'user_id': '1', 'shoe_size': 9}, 'items': ['1']}, None,
     400, "unknown field 'shoe_size'"),
    ('age is a string', 'POST', '/v1/score', {'user': {'user_id': '1', 'age': 'old'}, 'items': ['1']}, None, 400,
     'user.age'),
    ('age is a list', 'POST', '/v1/score', {'user': {'user_id': '1', 'age': [30]}, 'items': ['1']}, None, 400,
     'user.age'),
    ('age is a boolean', 'POST', '/v1/score', {'user': {'user_id': '1', 'age': True}, 'items': ['1']}, None, 400,
     'user.age'),
    ('gender is a number', 'POST', '/v1/score', {'user': {'user_id': '1', 'gender': 3}, 'items': ['1']}, None,
     400, 'user.gender'),
    ('missing items', 'POST', '/v1/score', {'user': {'user_id': '1'}}, None, 400, 'items is missing'),
    ('items not a list', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': '1'}, None, 400,
     'items must be an array'),
    ('items empty', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': []}, None, 400, 'items is empty'),
    ('item is null', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1', None]}, None, 400, 'items[1]'),
    ('item is an object', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': [{'id': 1}]}, None, 400,
     'items[0]'),
    ('too many items', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1'] * (MAX_ITEMS + 1)}, None,
     400, f'at most {MAX_ITEMS}'),
    ('unknown top-level field', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1'], 'itemz': []}, None,
     400, "unknown field 'itemz'"),
    ('weights not an object', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1'], 'weights': [1]},
     None, 400, 'weights must be an object'),
    ('unknown weight', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1'], 'weights': {'ctr': 1}},
     None, 400, "unknown task 'ctr'"),
    ('weight is a string', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1'],
                                                 'weights': {'click': 'high'}}, None, 400, 'finite number'),
    ('weight huge', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1'], 'weights': {'click': 1e300}},
     None, 400, 'out of range'),
    ('oversize body', 'POST', '/v1/score', b'{"pad": "' + b'x' * (MAX_BODY + 10) + b'"}', None, 413, 'limit'),
    ('k zero', 'POST', '/v1/recommend', {'user_id': '1', 'k': 0}, None, 400, 'k=0 is out of range'),
    ('k negative', 'POST', '/v1/recommend', {'user_id': '1', 'k': -3}, None, 400, 'out of range'),
    ('k larger than the catalog', 'POST', '/v1/recommend', {'user_id': '1', 'k': 10_000}, None, 400,
     'the catalog has 120 items'),
    ('k above max_k', 'POST', '/v1/recommend', {'user_id': '1', 'k': 50}, None, 400, 'at most 20'),
    ('k is a string', 'POST', '/v1/recommend', {'user_id': '1', 'k': '10'}, None, 400, 'k must be an integer'),
    ('k is a float', 'POST', '/v1/recommend', {'user_id': '1', 'k': 2.5}, None, 400, 'k must be an integer'),
    ('exclude_seen not bool', 'POST', '/v1/recommend', {'user_id': '1', 'exclude_seen': 'yes'}, None, 400,
     'exclude_seen'),
    ('recommend without user', 'POST', '/v1/recommend', {'k': 3}, None, 400, 'exactly one of user_id or user'),
    ('recommend unknown field', 'POST', '/v1/recommend', {'user_id': '1', 'n': 3}, None, 400, "unknown field 'n'"),
    ('wrong method', 'GET', '/v1/score', None, None, 405, 'not allowed'),
    ('unknown path', 'GET', '/v1/nothing', None, None, 404, 'no endpoint'),
    ('v2 unknown model', 'POST', '/v2/models/nope/infer', _infer([GOOD_USER, GOOD_ITEMS]), None, 404,
     'unknown model'),
    ('v2 unknown version', 'GET', '/v2/models/{model}/versions/9', None, None, 404, 'no version'),
    ('v2 inputs missing', 'POST', '/v2/models/{model}/infer', {'id': 'x'}, None, 400, 'inputs must be'),
    ('v2 inputs not a list', 'POST', '/v2/models/{model}/infer', {'inputs': {}}, None, 400, 'inputs must be'),
    ('v2 unknown input', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, _t('movie', ['1'])]), None, 400,
     "unknown input 'movie'"),
    ('v2 missing item_id', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER]), None, 400,
     "'item_id' is missing"),
    ('v2 duplicate input', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, GOOD_USER, GOOD_ITEMS]), None,
     400, 'given twice'),
    ('v2 wrong datatype', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, _t('item_id', [1.0], 'FP32')]),
     None, 400, 'datatype'),
    ('v2 shape mismatch', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, _t('item_id', ['1'], shape=[3])]),
     None, 400, 'shape [3] needs 3'),
    ('v2 shape [N, M]', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, _t('item_id', ['1'] * 6, shape=[2, 3])]),
     None, 400, 'shape must be [N] or [N, 1]'),
    ('v2 data nested against its shape', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, _t('item_id', [['1', '2']], shape=[2, 1])]), None, 400, 'nested otherwise than its shape'),
    ('v2 negative shape', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, _t('item_id', ['1'], shape=[-1])]),
     None, 400, 'shape must be'),
    ('v2 empty tensor', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, _t('item_id', [], shape=[0])]),
     None, 400, 'empty'),
    ('v2 user/item length mismatch', 'POST', '/v2/models/{model}/infer',
     _infer([_t('user_id', ['1', '2', '3']), GOOD_ITEMS]), None, 400, 'one user_id per item_id'),
    ('v2 INT64 data not ints', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, _t('item_id', ['1', '2'], 'INT64')]), None, 400, 'INT64 data must be integers'),
    ('v2 BYTES data not strings', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, _t('item_id', [1, 2], 'BYTES')]), None, 400, 'BYTES data must be strings'),
    ('v2 unknown output', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, GOOD_ITEMS],
                                                                     outputs=[{'name': 'ctr'}]), None, 400,
     "unknown output 'ctr'"),
    ('v2 id not a string', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, GOOD_ITEMS], id=5), None, 400,
     'id must be a string'),
    ('v2 bad weight parameter', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, GOOD_ITEMS], parameters={'fusion_weight_ctr': 1}), None, 400, "unknown task 'ctr'"),
    ('duplicate key', 'POST', '/v1/score', b'{"user": {"user_id": "1"}, "items": ["1"], "user": {"user_id": "2"}}',
     None, 400, "invalid JSON: the key 'user' appears twice in one object"),
    ('v2 misspelt weight parameter', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, GOOD_ITEMS], parameters={'fusion_weights_click': 2}), None, 400,
     "unknown parameter 'fusion_weights_click': a task's fusion weight is fusion_weight_<task>"),
    ('v2 bad header length', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, GOOD_ITEMS]),
     {'Inference-Header-Content-Length': 'ten'}, 400, 'must be an integer'),
    ('v2 header length beyond body', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, GOOD_ITEMS]),
     {'Inference-Header-Content-Length': '999999'}, 400, 'outside the body'),
    ('v2 binary size beyond body', 'POST', '/v2/models/{model}/infer', 'BINARY_OVERRUN', None, 400,
     'runs past the end'),
    # an integer id beyond 64 bits: no table holds it, and the answer could not echo it as a JSON integer
    ('user_id beyond 64 bits', 'POST', '/v1/score', {'user': {'user_id': 2**70}, 'items': ['1']}, None, 400,
     'user.user_id is an integer beyond 64 bits'),
    ('item id beyond 64 bits', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': ['1', 2**64]}, None, 400,
     'items[1] is an integer beyond 64 bits'),
    ('integer item ids, one beyond 64 bits', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': [1, 2**64]},
     None, 400, 'items[1] is an integer beyond 64 bits'),
    ('integer item ids, one below -2**63', 'POST', '/v1/score', {'user': {'user_id': '1'}, 'items': [-2**63 - 1]},
     None, 400, 'items[0] is an integer beyond 64 bits'),
    ('recommend user_id beyond 64 bits', 'POST', '/v1/recommend', {'user_id': -2**63 - 1}, None, 400,
     'beyond 64 bits'),
    ('recommend new item given twice', 'POST', '/v1/recommend',
     {'user_id': '1', 'items': [{'item_id': 'new-1'}, {'item_id': 'new-2'}, {'item_id': 'new-1'}]}, None, 400,
     "items[2].item_id 'new-1' is given twice (items[0] too)"),
    ('recommend new items beyond --max_items', 'POST', '/v1/recommend',
     {'user_id': '1', 'items': [{'item_id': f'new-{j}'} for j in range(MAX_ITEMS + 1)]}, None, 400,
     f'at most {MAX_ITEMS} new items'),
    ('string feature too long', 'POST', '/v1/score', {'user': {'user_id': '1', 'gender': 'x' * 300}, 'items': ['1']},
     None, 400, 'got a string of 300 characters'),
    ('v2 input name not a string', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, {**GOOD_ITEMS, 'name': ['item_id']}]), None, 400, 'each input needs a "name" string'),
    ('v2 output not an object', 'POST', '/v2/models/{model}/infer', _infer([GOOD_USER, GOOD_ITEMS], outputs=['score']),
     None, 400, 'each entry of outputs must be an object'),
    ('v2 output unknown field', 'POST', '/v2/models/{model}/infer',
     _infer([GOOD_USER, GOOD_ITEMS], outputs=[{'name': 'score', 'shape': [2]}]), None, 400,
     "output 'score': unknown field 'shape'"),
    ('v2 unclaimed binary bytes', 'POST', '/v2/models/{model}/infer', 'BINARY_EXTRA', None, 400,
     'not claimed'),
    ('v2 binary data without its header', 'POST', '/v2/models/{model}/infer', 'BINARY_NO_HEADER', None, 400,
     'needs the Inference-Header-Content-Length header'),
]


def _binary_body(kind):
  """A binary-extension request whose sizes are wrong, or without its header: (body, headers)."""
  ids = np.asarray([1, 2], '<i8').tobytes()
  size = len(ids) + (8 if kind == 'BINARY_OVERRUN' else 0)
  header = json.dumps(_infer([GOOD_USER, {'name': 'item_id', 'datatype': 'INT64', 'shape': [2],
                                          'parameters': {'binary_data_size': size}}])).encode()
  extra = b'\0' * 8 if kind == 'BINARY_EXTRA' else b''
  if kind == 'BINARY_NO_HEADER':
    return header + ids, {}
  return header + ids + extra, {'Inference-Header-Content-Length': str(len(header))}


def test_at_least_30_kinds_of_bad_input_get_a_4xx_and_the_server_keeps_serving(server, model):
  url, proc = server
  assert len(BAD_REQUESTS) >= 30
  failures = []
  for name, method, path, body, headers, want, phrase in BAD_REQUESTS:
    path = path.replace('{model}', model.name)
    if body in ('BINARY_OVERRUN', 'BINARY_EXTRA', 'BINARY_NO_HEADER'):
      body, headers = _binary_body(body)
    status, out, hdrs = http(url, path, body, method=method, headers=headers)
    if (status != want or not isinstance(out, dict) or phrase not in out.get('error', '')
        or 'application/json' not in hdrs.get('Content-Type', '')):
      failures.append((name, status, out))
  assert not failures, failures
  assert proc.poll() is None
  status, out, _ = http(url, '/v1/score', {'user': {'user_id': known_user(model)}, 'items': item_ids(model, 3)})
  assert status == 200 and len(out['items']) == 3
  assert http(url, '/v2/health/live')[1] == {'live': True}


def test_integer_ids_match_only_as_plain_decimal_strings(server, model):
  """A string matches an integer id only as ASCII decimal digits: Python's int() would also read ' 10', '+10',
  '1_0' and full-width digits as 10, ids that are not this user's or item's. Those are unknown: cold starts."""
  url, _ = server
  user, item = known_user(model, 12), item_ids(model, 1, 12)[0]
  assert len(user) >= 2 and len(item) >= 2  # '1_0'-style variants need two digits
  variants = lambda x: [f' {x}', f'{x}\n', f'+{x}', f'{x[0]}_{x[1:]}', ''.join(chr(ord(c) + 0xFEE0) for c in x)]
  status, out, _ = http(url, '/v1/score', {'user': {'user_id': user}, 'items': [item, *variants(item)]})
  assert status == 200, out
  assert out['user']['known'] and [e['cold_start'] for e in out['items']] == [False] + [True] * 5
  for v in variants(user):
    status, out, _ = http(url, '/v1/score', {'user': {'user_id': v}, 'items': [item]})
    assert status == 200 and out['user'] == {'user_id': v, 'known': False, 'cold_start': True, 'features': 'oov'}, out
  status, out, _ = http(url, f'/v2/models/{model.name}/infer',
                        _infer([_t('user_id', [user, f'+{user}']), _t('item_id', [item, f'{item[0]}_{item[1:]}'])]))
  assert status == 200, out
  cold = {o['name']: o['data'] for o in out['outputs']}
  assert cold['user_cold_start'] == [False, True] and cold['item_cold_start'] == [False, True]


def test_string_ids_match_exactly_trailing_nul_included():
  """numpy strings drop trailing NULs, so 'b\\0' looked up as 'b': an id the table does not hold, scored as a
  known item. Both lookup paths (vectorized and scalar) must call it unknown."""
  from mtl_rec.serving.loader import IdIndex  # pylint: disable=g-import-not-at-top
  index = IdIndex(np.array(['a', 'b', 'c']))
  assert index.lookup(['b', 'b\0', 'c\0\0', 'a\0b', 'a']).tolist() == [1, -1, -1, -1, 0]
  assert [index.position(x) for x in ('b', 'b\0')] == [1, -1]


def test_a_text_context_input_takes_as_long_a_string_over_v2_as_over_v1():
  """A text context feature (a search query) takes up to MAX_TEXT_CHARS on /v1/score; the /v2 BYTES input was
  capped at the ids' MAX_ID_CHARS. Ids keep their cap."""
  from mtl_rec.serving import protocol  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.loader import MAX_ID_CHARS  # pylint: disable=g-import-not-at-top
  from mtl_rec.serving.validation import MAX_TEXT_CHARS, BadRequest  # pylint: disable=g-import-not-at-top
  raw_types, max_chars = {'user_id': 'id', 'item_id': 'id', 'query': 'str'}, {'query': MAX_TEXT_CHARS}
  tensor = lambda name, text: {'name': name, 'datatype': 'BYTES', 'shape': [1], 'data': [text]}
  parse_input = protocol._parse_input  # pylint: disable=protected-access
  parse = lambda t: parse_input(t, memoryview(b''), 0, 8, raw_types, max_chars)
  query = 'cheap flights ' * (MAX_ID_CHARS // 10)
  assert MAX_ID_CHARS < len(query) <= MAX_TEXT_CHARS and parse(tensor('query', query))[1] == [query]
  with pytest.raises(BadRequest, match=f"input 'query': values are 0 to {MAX_TEXT_CHARS} characters"):
    parse(tensor('query', 'x' * (MAX_TEXT_CHARS + 1)))
  with pytest.raises(BadRequest, match=f"input 'user_id': values are 1 to {MAX_ID_CHARS} characters"):
    parse(tensor('user_id', query))


def test_categorical_values_match_exactly_trailing_nul_included():
  """The same for a categorical feature's value (a request's gender 'M\\0' encoded as 'M', and not reported as
  unknown): it is unknown, on the batch path (encode) and the one-value check (unknown) alike."""
  from mtl_rec import encoding  # pylint: disable=g-import-not-at-top
  vocabs = {'g': encoding.Vocab.fit(np.array(['F', 'M']))}
  rule = {'kind': 'vocab', 'raw': 'g', 'raw_type': 'str', 'vocab': 'g'}
  assert encoding.encode(rule, ['M', 'M\0', 'F\0\0', 'F'], vocabs).tolist() == [2, 0, 0, 1]
  assert [encoding.unknown(rule, x, vocabs) for x in ('M', 'M\0')] == [False, True]
  hashed = {'kind': 'hash', 'raw': 'g', 'raw_type': 'str', 'buckets': 10}
  assert encoding.encode(hashed, ['M\0'], vocabs).tolist() == [encoding.OOV_ROW]


def test_405_names_the_allowed_methods_and_v2_slash_is_server_metadata(server):
  url, _ = server
  status, out, hdrs = http(url, '/v1/score', method='DELETE')
  assert status == 405 and hdrs.get('Allow') == 'POST' and 'use POST' in out['error']
  status, out, hdrs = http(url, '/v2/health/live', b'{}', method='POST')
  assert status == 405 and 'GET' in hdrs.get('Allow', '').split(', ')
  assert http(url, '/v2/')[1] == http(url, '/v2')[1]
  # counted under the endpoint the method missed (its route template), not with the paths that match nothing
  status, out, _ = http(url, '/v2/models/some_model/ready', b'{}', method='POST')
  assert status == 405
  m = _metrics(url)
  assert m['mtl_rec_requests_total{endpoint="/v1/score",code="405"}'] >= 1
  assert m['mtl_rec_request_errors_total{endpoint="/v2/health/live",code="405"}'] >= 1
  assert m['mtl_rec_requests_total{endpoint="/v2/models/{name}/ready",code="405"}'] >= 1
  assert not any('unmatched' in k and 'code="405"' in k for k in m)


def test_a_client_hanging_up_mid_body_is_a_client_error_not_a_server_one(server, model):
  """A body cut short by the client closing the connection is counted as a 4xx, never a 500 (an alert-worthy
  server bug), and the server serves on."""
  url, proc = server
  host, port = url.removeprefix('http://').rsplit(':', 1)
  before = _metrics(url)
  for _ in range(3):
    with socket.create_connection((host, int(port)), timeout=10) as sock:
      sock.sendall(b'POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                   b'Content-Length: 100\r\n\r\n{"user_id"')
    time.sleep(0.2)
  deadline = time.time() + 10
  while time.time() < deadline:  # the server notices the hang-up asynchronously
    after = _metrics(url)
    if after.get('mtl_rec_request_errors_total{endpoint="/v1/recommend",code="400"}', 0) >= before.get(
        'mtl_rec_request_errors_total{endpoint="/v1/recommend",code="400"}', 0) + 3:
      break
    time.sleep(0.2)
  key500 = 'mtl_rec_request_errors_total{endpoint="/v1/recommend",code="500"}'
  assert after.get(key500, 0) == before.get(key500, 0)
  assert after.get('mtl_rec_request_errors_total{endpoint="/v1/recommend",code="400"}', 0) >= before.get(
      'mtl_rec_request_errors_total{endpoint="/v1/recommend",code="400"}', 0) + 3
  assert proc.poll() is None
  status, out, _ = http(url, '/v1/recommend', {'user_id': known_user(model), 'k': 3})
  assert status == 200 and len(out['items']) == 3


def test_requests_the_http_parser_rejects_get_a_400_naming_the_problem(server):
  """Malformed HTTP (aiohttp's parser answers before any handler): a 400 that names the problem, and one log line,
  not an ERROR with a traceback (the server fixture's teardown checks its log holds none)."""
  url, proc = server
  host, port = url.removeprefix('http://').rsplit(':', 1)
  cases = [(b'FOO /v1/score HTTP/1.1\r\nHost: x\r\n\r\n', b'method'),
           (b'POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n', b'Content-Length'),
           (b'GET /' + b'a' * 9000 + b' HTTP/1.1\r\nHost: x\r\n\r\n', b'8190 bytes')]
  for request, phrase in cases:
    with socket.create_connection((host, int(port)), timeout=10) as sock:
      sock.sendall(request)
      answer = b''
      while chunk := sock.recv(65536):
        answer += chunk
    assert answer.startswith(b'HTTP/1.') and b' 400 ' in answer.split(b'\r\n')[0] and phrase in answer, answer[:300]
  assert proc.poll() is None and http(url, '/v2/health/live')[1] == {'live': True}


def test_concurrent_requests_are_batched_and_never_recompile(server, model):
  url, _ = server
  before = _metrics(url)
  bodies = [{'user': {'user_id': known_user(model, j % 50)}, 'items': item_ids(model, 40, j % 60)}
            for j in range(96)]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    results = list(pool.map(lambda b: http(url, '/v1/score', b), bodies))
  assert all(status == 200 for status, _, _ in results)
  after = _metrics(url)
  calls = after['mtl_rec_batch_requests_count{function="score"}'] - before.get(
      'mtl_rec_batch_requests_count{function="score"}', 0)
  merged = after['mtl_rec_batch_requests_sum{function="score"}'] - before.get(
      'mtl_rec_batch_requests_sum{function="score"}', 0)
  assert merged == 96 and calls < 96, (calls, merged)  # some calls carried several requests
  # Every batch shape was compiled at startup: the load compiled nothing new.
  assert after['mtl_rec_compiled_executables{function="score"}'] == len(model.score_buckets)
  assert after['mtl_rec_compiled_executables{function="recommend"}'] == len(model.recommend_buckets)


def _metrics(url):
  status, text, hdrs = http(url, '/metrics', raw=True)
  assert status == 200 and hdrs['Content-Type'].startswith('text/plain')
  out = {}
  for line in text.decode().splitlines():
    if line and not line.startswith('#'):
      key, value = line.rsplit(' ', 1)
      out[key] = float(value)
  return out


def test_metrics_report_requests_errors_latency_and_batches(server, model):
  url, _ = server
  http(url, '/v1/score', b'not json')
  assert http(url, '/v1/score', {'user': {'user_id': known_user(model)}, 'items': item_ids(model, 2)})[0] == 200
  m = _metrics(url)
  assert m['mtl_rec_requests_total{endpoint="/v1/score",code="400"}'] >= 1
  assert m['mtl_rec_request_errors_total{endpoint="/v1/score",code="400"}'] >= 1
  assert m['mtl_rec_request_latency_seconds_count{endpoint="/v1/score"}'] >= 1
  assert any(k.startswith('mtl_rec_request_latency_seconds_bucket{endpoint="/v1/score",le="0.005"}') for k in m)
  assert any(k.startswith('mtl_rec_batch_rows_bucket{function="score"') for k in m)
  assert 'mtl_rec_model_info{name="mtl_rec_synthetic",version="1"}' in m


def test_gzip_request_bodies_and_health_endpoints(server, model):
  url, _ = server
  body = gzip.compress(json.dumps({'user': {'user_id': known_user(model)}, 'items': item_ids(model, 2)}).encode())
  status, out, _ = http(url, '/v1/score', body, headers={'Content-Encoding': 'gzip'})
  assert status == 200 and len(out['items']) == 2
  assert http(url, '/v2/health/ready')[0] == 200
  assert http(url, f'/v2/models/{model.name}/ready')[1] == {'name': model.name, 'ready': True}
  assert http(url, f'/v2/models/{model.name}/versions/1')[1]['versions'] == ['1']
  assert http(url, '/v2')[1]['extensions'] == ['binary_tensor_data']


def test_requests_beyond_the_queue_limit_get_a_503_and_the_server_recovers(export_dir, model, tmp_path,
                                                                          import_blocker):
  """A server that lets 16 rows wait, and holds each batch open 400 ms for companions: of concurrent requests of 10
  rows each, the first waits and those that would pile up beyond the limit are turned away at once with a 503."""
  log_path = tmp_path / 'stderr.log'
  url, proc = start_server(export_dir, log_path, import_blocker, '--max_batch_rows=16', '--max_queued_rows=16',
                           '--max_wait_ms=400', '--max_recommend_users=1')
  try:
    body = {'user': {'user_id': known_user(model)}, 'items': item_ids(model, 10)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      answers = list(pool.map(lambda _: http(url, '/v1/score', body), range(8)))
    statuses = sorted(s for s, _, _ in answers)
    assert 200 in statuses and 503 in statuses, statuses
    for status, out, hdrs in answers:
      if status == 503:
        assert 'retry later' in out['error'] and 'application/json' in hdrs['Content-Type']
    status, out, _ = http(url, '/v1/score', body)  # the queue drained: served again
    assert status == 200 and len(out['items']) == 10
    _, text, _ = http(url, '/metrics', raw=True)
    assert re.search(rb'mtl_rec_request_errors_total\{endpoint="/v1/score",code="503"\} [1-9]', text), text[-3000:]
  finally:
    stop_server(proc, log_path)


@pytest.mark.parametrize('flag, phrase', [('--port=-1', 'not an integer in the range [0, 65535]'),
                                          ('--port=70000', 'not an integer in the range [0, 65535]'),
                                          ('--max_batch_rows=0', 'not a positive integer'),
                                          ('--max_wait_ms=-1', 'not a non-negative number'),
                                          ('--max_items=0', 'not a positive integer'),
                                          ('--host=no-such-host.invalid', 'cannot listen on --host=no-such-host'),
                                          ('--host=192.0.2.1', 'pass an address of this machine'),
                                          ('--port=BUSY', 'it is in use'),
                                          ('--export_dir=serve.py', 'serve.py is a file, not a directory')])
def test_serve_py_flag_mistakes_are_one_error_line(flag, phrase):
  """A bad serving flag (a port out of range used to be an OverflowError traceback from bind) stops serve.py with
  one `error:` line, before it loads anything."""
  with socket.socket() as busy:  # a port another process listens on
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    flag = flag.replace('--port=BUSY', f'--host=127.0.0.1 --port={port}')
    r = subprocess.run([sys.executable, 'serve.py', '--export_dir=/nonexistent/export', *flag.split()],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert r.returncode == 1 and 'error: ' in r.stderr and phrase.replace('BUSY', str(port)) in r.stderr, (
      r.stderr[-2000:])
  assert 'Traceback' not in r.stderr


@pytest.mark.parametrize('flag, value', [('concurrency', '1,x'), ('recommend_users', '0'), ('rate', 'fast'),
                                         ('rate', '-5'), ('recommend_budget_ms', '0'), ('duration', '-1'),
                                         ('recommend_k', '0')])
def test_serving_benchmark_flags_are_usage_errors_naming_the_flag(flag, value, capsys):
  """A bad flag stops the benchmark before it loads anything (no export is needed to see it), with argparse's usage
  error naming the flag, not a traceback."""
  from mtl_rec.serving import benchmark  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    benchmark.main(['--export_dir=/nonexistent/export', f'--{flag}={value}'])
  err = capsys.readouterr().err
  assert e.value.code == 2 and f'--{flag}=' in err and 'Traceback' not in err


def test_serving_benchmark_names_a_missing_export_dir(capsys):
  from mtl_rec.serving import benchmark  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    benchmark.main(['--export_dir=/nonexistent/export'])
  assert e.value.code == 2 and '--export_dir=/nonexistent/export does not exist' in capsys.readouterr().err


def test_serving_benchmark_checks_its_out_path_before_measuring(export_dir, tmp_path, capsys):
  """--out is written after minutes of measuring: a directory there (or under a file) is a usage error at the start,
  not an IsADirectoryError that loses the measurements."""
  from mtl_rec.serving import benchmark  # pylint: disable=g-import-not-at-top
  (tmp_path / 'a_file').write_text('keep')
  for out, phrase in ((tmp_path, 'is a directory; pass a file path'),
                      (tmp_path / 'a_file' / 'r.json', 'is a file, not a directory')):
    with pytest.raises(SystemExit) as e:
      benchmark.main([f'--export_dir={export_dir}', f'--out={out}', '--skip_http', '--duration=0.1'])
    assert e.value.code == 2 and phrase in capsys.readouterr().err
  benchmark_out = tmp_path / 'new' / 'dir' / 'r.json'  # a missing directory is created, the report written
  benchmark.main([f'--export_dir={export_dir}', f'--out={benchmark_out}', '--skip_http', '--duration=0.05',
                  '--max_requests=3', '--batch_sizes=1', '--recommend_users=1', '--rate='])
  assert json.loads(benchmark_out.read_text()) and (tmp_path / 'a_file').read_text() == 'keep'


def test_the_ready_line_of_an_ipv6_host_is_a_url_clients_can_use(export_dir, tmp_path, import_blocker):
  """serve.py --host=::1 printed http://::1:PORT, which curl and urllib refuse; the address is bracketed."""
  log_path = tmp_path / 'stderr.log'
  url, proc = start_server(export_dir, log_path, import_blocker, '--host=::1', '--max_batch_rows=8',
                           '--max_recommend_users=1')
  try:
    assert url.startswith('http://[::1]:'), url
    assert http(url, '/v2/health/live')[:2] == (200, {'live': True})
  finally:
    stop_server(proc, log_path)


def test_unknown_items_of_a_hashed_id_vocabulary_are_scored_from_their_buckets(tmp_path, import_blocker):
  """Hashed item ids are an open vocabulary, as hashed user ids are: an item the export does not know is scored
  from its id's bucket (as training would encode it), not from the out-of-vocabulary row that made every new item
  alike — on /v1/score, on /v2 infer and for new items a request describes."""
  from conftest import make_tiny_config, train_and_export  # pylint: disable=g-import-not-at-top
  c = make_tiny_config()
  c.features.item_id.vocabulary = 'hash'
  c.features.item_id.hash_buckets = 64
  path = train_and_export(c, str(tmp_path / 'run'))[1]
  model = ExportedModel(path, max_batch_rows=64)
  assert model.hashed_ids['item'] == ['item_id']
  # two new (integer, as the synthetic catalog's) ids in different buckets, hashed as training hashes them
  top = int(np.max(model.items.ids))
  rows = {str(x): int(model.hashed_id_rows('item', [str(x)])['item_id'][0]) for x in range(top + 1, top + 20)}
  first = str(top + 1)
  new = [first, next(x for x in rows if rows[x] != rows[first])]
  assert model.items.lookup(new).tolist() == [-1, -1] and min(rows.values()) > 0  # 0: the OOV row
  log_path = tmp_path / 'server.log'
  url, proc = start_server(path, log_path, import_blocker, '--max_batch_rows=64', '--max_recommend_users=1')
  try:
    user = str(model.users.ids[0])
    status, out, _ = http(url, '/v1/score', {'user': {'user_id': user}, 'items': new})
    assert status == 200 and [e['cold_start'] for e in out['items']] == [True, True], out
    v1 = [e['click'] for e in out['items']]
    assert v1[0] != v1[1], out  # the OOV row would give both the same score
    tensor = lambda name, data: {'name': name, 'datatype': 'BYTES', 'shape': [len(data)], 'data': data}
    status, out, _ = http(url, f'/v2/models/{model.name}/infer',
                          {'inputs': [tensor('user_id', [user]), tensor('item_id', new)]})
    assert status == 200, out
    v2 = next(o['data'] for o in out['outputs'] if o['name'] == 'click')
    np.testing.assert_allclose(v2, v1, atol=1e-6)
    # new items the request describes (no content fields here: the id is all the model knows of them); recommend
    # ranks the new items it is given through the same parsing
    status, out, _ = http(url, '/v1/score', {'user': {'user_id': user}, 'items': [{'item_id': x} for x in new]})
    assert status == 200 and [e['click'] for e in out['items']] == pytest.approx(v1, abs=1e-6), out
  finally:
    stop_server(proc, log_path)

"""The streaming reader (data.reader='stream'): shards, order, resume, and the batches it gives the model.

A synthetic log written as Parquet with many row groups; the shard iterators are checked by the global row ids they
yield (every row once per epoch, disjoint shards), the model batches of one process with 2 shards against those of
2 processes with one shard each, and a position saved and restored (directly and through the Orbax checkpoint).
"""

import dataclasses
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtl_rec import config as config_lib
from mtl_rec import experiment as experiment_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec.checkpoint import Checkpointer
from mtl_rec.data import readers
from mtl_rec.data import stream as stream_lib
from mtl_rec.data import synthetic
from mtl_rec.data import write as write_lib
from mtl_rec.data.types import to_dataset
from mtl_rec.errors import DataError
from mtl_rec.tasks import LabelColumn

ROWS_PER_GROUP = 100


def _write_log(directory, num_files=2, groups_per_file=5):
  """Files of `groups_per_file` row groups of ROWS_PER_GROUP rows: columns user_id, item_id (ints), rating."""
  rng = np.random.default_rng(0)
  paths, n = [], num_files * groups_per_file * ROWS_PER_GROUP
  users, items = rng.integers(0, 50, n), rng.integers(1000, 1040, n)
  per_file = n // num_files
  for f in range(num_files):
    sl = slice(f * per_file, (f + 1) * per_file)
    path = str(directory / f'log_{f}.parquet')
    pq.write_table(pa.table({'user_id': users[sl], 'item_id': items[sl], 'rating': rng.integers(1, 6, per_file)}),
                   path, row_group_size=ROWS_PER_GROUP)
    paths.append(path)
  return paths, users, items


def _plan(groups, num_shards, per_shard, interleave=2, seed=0):
  return stream_lib.Plan(groups, groups.rows.copy(), num_shards, interleave, per_shard, seed)


def _decode(cols):
  n = cols['_row'].size
  return stream_lib.Chunk(cols['user_id'].astype(np.int64), cols['item_id'].astype(np.int64), cols['_row'],
                          {'rating': LabelColumn(cols['rating'].astype(np.float32), np.ones(n, bool))}, {})


def _shard(plan, epoch, shard, start=0):
  import grain  # pylint: disable=g-import-not-at-top
  return stream_lib.ShardIterator(plan, _decode, ['user_id', 'item_id', 'rating'], epoch, shard,
                                  grain.ReadOptions(num_threads=2, prefetch_buffer_size=2), start)


def test_row_groups_from_metadata(tmp_path):
  paths, _, _ = _write_log(tmp_path)
  groups = stream_lib.RowGroups.of(paths)
  assert len(groups) == 10 and groups.num_rows == 1000
  np.testing.assert_array_equal(groups.start, np.arange(10) * ROWS_PER_GROUP)
  np.testing.assert_array_equal(groups.file, [0] * 5 + [1] * 5)
  cols = groups.read(7, ['user_id'])
  np.testing.assert_array_equal(cols['_row'], np.arange(700, 800))


@pytest.mark.parametrize('num_shards', [1, 2, 5])
def test_shards_are_disjoint_and_read_every_row_once_per_epoch(tmp_path, num_shards):
  paths, users, _ = _write_log(tmp_path)
  groups = stream_lib.RowGroups.of(paths)
  plan = _plan(groups, num_shards, per_shard=1000 // num_shards // 4)  # 4 steps cover every row
  assert plan.steps_per_epoch == 4
  orders = []
  for epoch in range(2):
    rows = [np.concatenate([c.row for c in _shard(plan, epoch, s)]) for s in range(num_shards)]
    for s, r in enumerate(rows):  # a shard reads only its row groups: g % num_shards == s
      assert set(np.unique(r // ROWS_PER_GROUP) % num_shards) == {s}
    union = np.concatenate(rows)
    np.testing.assert_array_equal(np.sort(union), np.arange(1000))  # every row exactly once
    orders.append(union)
    # the chunks carry their rows' values
    chunk = next(_shard(plan, epoch, 0))
    np.testing.assert_array_equal(chunk.user, users[chunk.row])
  assert not np.array_equal(orders[0], orders[1])  # a new order each epoch
  again = np.concatenate([np.concatenate([c.row for c in _shard(plan, 1, s)]) for s in range(num_shards)])
  np.testing.assert_array_equal(again, orders[1])  # and the same order for the same (seed, epoch)


def test_batches_mix_row_groups_and_drop_only_the_tail(tmp_path):
  paths, _, _ = _write_log(tmp_path)
  plan = _plan(stream_lib.RowGroups.of(paths), 2, per_shard=150, interleave=2)
  assert plan.steps_per_epoch == 3  # 500 rows a shard: 3 batches of 150, the last 50 dropped
  batches = list(_shard(plan, 0, 0))
  assert len(batches) == 3 and all(len(b) == 150 for b in batches)
  assert len(np.unique(batches[0].row // ROWS_PER_GROUP)) == 2  # a batch draws from `interleave` row groups
  assert len(np.unique(np.concatenate([b.row for b in batches]))) == 450


def test_resume_from_a_saved_position_gives_the_same_batches(tmp_path):
  paths, _, _ = _write_log(tmp_path)
  plan = _plan(stream_lib.RowGroups.of(paths), 2, per_shard=60, interleave=2)
  full = [c.row for c in _shard(plan, 1, 1)]
  it = _shard(plan, 1, 1)
  head = [next(it).row for _ in range(3)]
  state = it.get_state()
  assert state == {'epoch': 1, 'shard': 1, 'batch': 3}
  fresh = _shard(plan, 0, 1)  # set_state moves it to the saved epoch as well
  fresh.set_state(state)
  for a, b in zip(head + [c.row for c in fresh], full, strict=True):
    np.testing.assert_array_equal(a, b)


def test_files_changed_under_a_run_are_an_error(tmp_path):
  paths, _, _ = _write_log(tmp_path)
  groups = stream_lib.RowGroups.of(paths)
  plan = stream_lib.Plan(groups, groups.rows + 1, 2, 2, 50, 0)  # counts that the files no longer match
  with pytest.raises(DataError, match='files changed'):
    next(_shard(plan, 0, 0))
  with pytest.raises(DataError, match='row groups'):
    _plan(groups, 11, 10)
  with pytest.raises(DataError, match='multiple'):
    stream_lib.owned_shards(3, 0, 2)
  assert stream_lib.owned_shards(4, 1, 2) == [2, 3]


def test_id_index(tmp_path):
  dense = stream_lib.IdIndex(np.array([5, 3, 9]))
  np.testing.assert_array_equal(dense(np.array([9, 5, 4, 3, -1, 100])), [2, 0, -1, 1, -1, -1])
  sparse = stream_lib.IdIndex(np.array([10**12, 7, 10**15]))
  np.testing.assert_array_equal(sparse(np.array([7, 10**15, 8])), [1, 2, -1])
  text = stream_lib.IdIndex(np.array(['b', 'a', 'c']))
  np.testing.assert_array_equal(text(np.array(['c', 'z', 'a'])), [2, -1, 1])


@pytest.fixture(scope='module')
def files_dir(tmp_path_factory):
  """A synthetic MovieLens-like dataset as Parquet tables, the log in row groups of 500 rows."""
  out = tmp_path_factory.mktemp('files')
  ds = to_dataset(synthetic.generate(num_users=120, num_items=80, interactions_per_user=25, latent_dim=4, seed=0))
  write_lib.write_dataset(ds, str(out), 'parquet', row_group_size=500)
  return out


def _files_config(tiny_config, files_dir, **overrides):
  c = tiny_config(**{'train__batch_size': 200, **overrides})
  c.data.source = 'files'
  c.data.log.paths = (str(files_dir / 'log.parquet'),)
  c.data.user_table.paths = (str(files_dir / 'users.parquet'),)
  c.data.item_table.paths = (str(files_dir / 'items.parquet'),)
  c.data.reader = 'stream'
  return c


def test_one_process_with_two_shards_builds_what_two_processes_build(tiny_config, files_dir, tmp_path):
  c = _files_config(tiny_config, files_dir)
  c.data.stream.num_shards = 2
  exp = experiment_lib.build(c, workdir=str(tmp_path))
  stream = exp.stream
  assert stream.local and stream.shards == [0, 1] and stream.batch_size == 200
  both = list(stream.epoch(0))
  assert len(both) == stream.steps_per_epoch > 3
  halves = []
  for shard in (0, 1):  # what process `shard` of 2 builds: its shard only
    stream.shards = [shard]
    halves.append(list(stream.epoch(0)))
  stream.shards = [0, 1]
  for b, h0, h1 in zip(both, *halves, strict=True):
    assert b['observed'].shape == (200,) and h0['observed'].shape == (100,)
    for path, x in _leaves(b):
      np.testing.assert_array_equal(x, np.concatenate([_get(h0, path), _get(h1, path)]), err_msg=str(path))
  # positives first then their negatives, per shard; the click label is 'observed'
  b = both[0]
  k = c.sampling.num_negatives
  np.testing.assert_array_equal(b['observed'][:100], np.r_[np.ones(100 // (1 + k)), np.zeros(100 - 100 // (1 + k))])
  # a training row's ids and rating come from its file row: the streamed batch equals the in-memory encoding
  at = {int(r): k for k, r in enumerate(exp.data.log['_row'])}  # global row -> its position in the held sample
  chunk = next(stream_lib.ShardIterator(stream.plan, stream.decode, stream.columns, 0, 0, stream.read_options))
  assert set(chunk.row.tolist()) <= set(exp.data.log['_row'][exp.split.train].tolist())
  pos = np.asarray([at[int(r)] for r in chunk.row])
  np.testing.assert_array_equal(chunk.user, exp.user_index[pos])
  np.testing.assert_array_equal(chunk.item, exp.item_index[pos])
  np.testing.assert_array_equal(chunk.columns['rating'].values, exp.labels.columns['rating'].values[pos])


def _leaves(tree, path=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, path + (k,))
  else:
    yield path, tree


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_reader_position_round_trips_through_the_checkpoint(tiny_config, files_dir, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  exp = experiment_lib.build(_files_config(tiny_config, files_dir), workdir=str(tmp_path / 'run'))
  spe = exp.stream.steps_per_epoch
  reference = list(exp.stream.epoch(1))
  ckpt = Checkpointer(str(tmp_path), keep=2)
  step = spe + 2  # epoch 1, batch 2
  ckpt.save(step, {'w': jax.numpy.zeros(3)}, {'note': 'x'},
            input_state={'epoch': 1, 'batch': 2, 'num_shards': 1, 'shards': [0]})
  ckpt.wait()
  restored = ckpt.restore_input(step, exp.stream.epoch(0))
  assert (restored.epoch, restored.batch) == (1, 2)
  assert restored.get_state() == exp.stream.state_at(step)  # what the training loop saves at that step
  rest = list(restored)
  assert len(rest) == spe - 2
  for got, want in zip(rest, reference[2:], strict=True):
    for path, x in _leaves(want):
      np.testing.assert_array_equal(_get(got, path), x, err_msg=str(path))
  with pytest.raises(ValueError, match='shard layout'):
    ckpt.restore_input(step, _two_shard_stream(exp).epoch(0))
  ckpt.close()


def _two_shard_stream(exp):
  stream = exp.stream
  plan = stream_lib.Plan(stream.plan.groups, stream.plan.train_rows, 2, stream.plan.interleave,
                         stream.plan.positives_per_shard // 2, stream.plan.seed)
  return type(stream)(plan, stream.decode, stream.columns, stream.encoder, stream.specs, stream.sampler,
                      stream.num_negatives, stream.seed, [0, 1], stream.read_options)


def test_a_bad_row_outside_the_samples_is_found_before_training_naming_the_users_file_and_line(tiny_config,
                                                                                              tmp_path):
  """A label out of range far into a CSV log, in no sample: the survey pass (before anything is trained) finds
  it, and the error names the CSV the user gave (not the Parquet copy) with that row's line. The training stream
  checks its row groups the same way (the test's second half: a decoded row group with the bad row)."""
  ds = to_dataset(synthetic.generate(num_users=120, num_items=80, interactions_per_user=25, latent_dim=4, seed=0))
  bad = len(ds.log['rating']) - 7
  ds.log['rating'] = np.asarray(ds.log['rating'], np.float64)
  ds.log['rating'][bad] = 9.0  # the rating task's range is (1, 5)
  write_lib.write_dataset(ds, str(tmp_path / 'data'), 'csv')
  c = _files_config(tiny_config, tmp_path / 'data')
  c.data.stream.update(fit_rows=100, eval_rows=20, row_group_size=500)  # the bad row is in no sample
  c.data.log.paths = (str(tmp_path / 'data' / 'log.csv'),)
  c.data.user_table.paths = (str(tmp_path / 'data' / 'users.csv'),)
  c.data.item_table.paths = (str(tmp_path / 'data' / 'items.csv'),)
  with pytest.raises(DataError) as e:
    experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  assert f"log.csv, row {bad + 1}, line {bad + 2}: column 'rating' holds 9" in str(e.value), str(e.value)
  assert 'parquet' not in str(e.value) and not os.path.exists(tmp_path / 'run' / 'input' / 'survey.npz')
  # the stream's own check, on a copy whose survey passed (the bad value written after it); the fixed CSV has the
  # same size and, likely, the same second as the bad one: its Parquet copy is made again all the same
  ds.log['rating'][bad] = 4.0
  write_lib.write_dataset(ds, str(tmp_path / 'data'), 'csv')
  exp = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  copy = exp.stream.plan.groups.paths[0]
  table = pq.read_table(copy)
  ratings = table.column('rating').to_numpy().copy()
  ratings[bad] = 9.0
  pq.write_table(table.set_column(table.schema.get_field_index('rating'), 'rating', pa.array(ratings)), copy,
                 row_group_size=500)
  with pytest.raises(DataError) as e:
    for _ in exp.stream.epoch(0):
      pass
  assert f"log.csv, row {bad + 1}, line {bad + 2}: column 'rating' holds 9" in str(e.value), str(e.value)


def test_a_cached_survey_is_reused_only_for_the_same_checks(tiny_config, tmp_path):
  """The survey pass checks every row's labels; its cache (W/input/survey.npz) is keyed by those checks too: a rerun
  whose rating task allows a narrower range reads the log again and finds a row outside it that no sample holds,
  before training (it reused the first run's survey, and the row stopped the run mid-epoch)."""
  ds = to_dataset(synthetic.generate(num_users=120, num_items=80, interactions_per_user=25, latent_dim=4, seed=0))
  bad = len(ds.log['rating']) - 7
  ds.log['rating'] = np.asarray(ds.log['rating'], np.float64)
  ds.log['rating'][bad] = 9.0
  write_lib.write_dataset(ds, str(tmp_path / 'data'), 'parquet', row_group_size=500)
  c = _files_config(tiny_config, tmp_path / 'data')
  c.data.stream.update(fit_rows=100, eval_rows=20, row_group_size=500)  # the row is in no sample
  c.tasks.rating.range = (1.0, 10.0)
  experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  survey = tmp_path / 'run' / 'input' / 'survey.npz'
  written = survey.stat().st_mtime_ns
  experiment_lib.build(c, workdir=str(tmp_path / 'run'))  # the same checks: reused
  assert survey.stat().st_mtime_ns == written
  c.tasks.rating.range = (1.0, 5.0)
  with pytest.raises(DataError, match=f"row {bad + 1}: column 'rating' holds 9"):
    experiment_lib.build(c, workdir=str(tmp_path / 'run'))


def test_stream_config_errors(tiny_config, files_dir, tmp_path):
  c = _files_config(tiny_config, files_dir, train__batch_size=257)  # 255 divides by 1 + 4 negatives, not by 8 groups
  with pytest.raises(DataError, match='multiple of') as e:
    experiment_lib.build(c, workdir=str(tmp_path))
  # the batch sizes it suggests pass this check and the trainer's (gradient groups, devices) alike
  suggested = [int(x) for x in re.search(r'e\.g\. (\d+(?: or \d+)*)', str(e.value)).group(1).split(' or ')]
  for batch in suggested:
    assert batch % trainer_lib.batch_multiple(c) == 0, (batch, str(e.value))
    experiment_lib.build(_files_config(tiny_config, files_dir, train__batch_size=batch), workdir=str(tmp_path))
  for field, value, match in (('data.source', 'synthetic', 'data.reader'), ('data.split', 'leave_last_out', 'row by row'),
                              ('data.cold_items', 0.1, 'cold-start'), ('data.stream.eval_rows', 0, 'eval_rows')):
    c = _files_config(tiny_config, files_dir)
    section, name = field.rsplit('.', 1)
    node = c
    for part in section.split('.'):
      node = node[part]
    node[name] = value
    with pytest.raises(ValueError, match=match):
      experiment_lib.build(c, workdir=str(tmp_path))
  c = _files_config(tiny_config, files_dir)
  c.data.user_table.paths = ()  # user features would have to come from the log
  with pytest.raises(ValueError, match='no users table'):
    experiment_lib.build(c, workdir=str(tmp_path))


def test_survey_counts_ids_per_set_and_is_reused(tmp_path):
  paths, users, items = _write_log(tmp_path, num_files=2, groups_per_file=10)  # 20 row groups: several merges
  groups = stream_lib.RowGroups.of(paths)
  path = str(tmp_path / 'run' / 'survey.npz')
  codes = lambda cols, g: (cols['_row'] % 3).astype(np.int8)  # a split code per row: 0 train, 1 valid, 2 test
  stats = stream_lib.survey(groups, ['user_id', 'item_id'], codes, ['user_id', 'item_id'], path, key='k1')
  code = np.arange(users.size) % 3
  for name, ids in (('user_id', users), ('item_id', items)):
    values = np.unique(ids)
    np.testing.assert_array_equal(stats[f'{name}_values'], values)
    want = np.stack([np.bincount(np.searchsorted(values, ids[code == k]), minlength=values.size) for k in range(3)], 1)
    np.testing.assert_array_equal(stats[f'{name}_counts'], want)
  np.testing.assert_array_equal(stats['group_counts'].sum(0), np.bincount(code, minlength=3))
  np.testing.assert_array_equal(stats['group_counts'].sum(1), groups.rows)
  for p in paths:  # reused from the run directory: the log is not read again
    open(p, 'wb').close()
  empty = stream_lib.RowGroups.__new__(stream_lib.RowGroups)
  again = stream_lib.survey(empty, ['user_id'], codes, ['user_id'], path, key='k1')
  np.testing.assert_array_equal(again['user_id_counts'], stats['user_id_counts'])
  with pytest.raises(Exception):  # another key (another split or log): computed again, here from the emptied files
    stream_lib.survey(stream_lib.RowGroups.of(paths), ['user_id'], codes, ['user_id'], path, key='k2')


def _same_experiment(streamed, memory, sampled=False):
  """The streamed experiment holds a sample of the log; everything it holds equals the in-memory experiment (but
  `sampled`: label statistics, from the fitting sample, are estimates)."""
  rows = streamed.data.log['_row']
  for name in ('train', 'valid', 'test'):
    held = rows[getattr(streamed.split, name)]
    assert np.isin(held, getattr(memory.split, name)).all(), name  # the same split, row by row
  if sampled:
    for a, b in zip(streamed.specs, memory.specs, strict=True):
      assert dataclasses.replace(a, bias_init=b.bias_init) == b and abs(a.bias_init - b.bias_init) < 0.1
  else:
    assert streamed.specs == memory.specs
  assert streamed.encoder.specs == memory.encoder.specs  # ids: exact counts over the whole log
  for name, vocab in memory.encoder.vocabs.items():
    np.testing.assert_array_equal(streamed.encoder.vocabs[name].keys, vocab.keys, err_msg=name)
  for table in ('user_table', 'item_table'):
    for name, x in getattr(memory.encoder, table).items():
      np.testing.assert_array_equal(getattr(streamed.encoder, table)[name], x, err_msg=name)
  for name in ('train', 'valid', 'test'):
    assert streamed.counts[name] == memory.counts[name]


def test_streamed_experiment_never_loads_the_log_and_equals_the_in_memory_one(tiny_config, files_dir, tmp_path,
                                                                               monkeypatch):
  c = _files_config(tiny_config, files_dir)
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  c.data.reader = 'stream'
  with monkeypatch.context() as m:  # the log is read row group by row group only
    m.setattr(readers, 'read_tables', _refuse_log(readers.read_tables))
    streamed = experiment_lib.build(c, workdir=str(tmp_path / 'all'))
  _same_experiment(streamed, memory)
  assert streamed.data.num_rows == memory.data.num_rows  # a log this small is held whole
  assert streamed.stream.steps_per_epoch == memory.stream.steps_per_epoch
  assert (tmp_path / 'all' / 'input' / 'survey.npz').exists() and (tmp_path / 'all' / 'input' / 'sample.npz').exists()

  # capped samples: 150 held-out rows of whole users, ~600 rows to fit on; ids still counted over the whole log
  c.data.stream.eval_rows, c.data.stream.fit_rows = 150, 600
  capped = experiment_lib.build(c, workdir=str(tmp_path / 'capped'))
  _same_experiment(capped, memory, sampled=True)
  held = capped.split.valid.size + capped.split.test.size
  assert 0 < held <= 150 and capped.counts['sampled']['evaluation_users'] < 120
  log_users = memory.data.log['user_id']
  for u in np.unique(capped.data.log['user_id'][np.concatenate([capped.split.valid, capped.split.test])]):
    assert (capped.data.log['user_id'] == u).sum() == (log_users == u).sum()  # all of an evaluation user's rows
  assert 400 < capped.fit_rows.size < 800
  assert capped.data.num_rows < memory.data.num_rows / 2


def test_histories_stream_as_in_memory(tiny_config, files_dir, tmp_path):
  """History features of a streamed log come from every training row (a pass over its row groups), not from the
  sample it holds: the tables equal the in-memory run's, capped samples and all, and no batch holds its target."""
  c = _files_config(tiny_config, files_dir)
  with c.unlocked():
    c.features.user_history = config_lib.feature('user', kind='history', of='item_id', max_values=8)
    c.features.item_audience = config_lib.feature('item', kind='history', of='user_id', max_values=8)
    c.features.user_liked = config_lib.feature('user', kind='history', of='item_id', max_values=8,
                                               where='rating >= 4')
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  assert (memory.encoder.user_table['user_history'] >= 0).all(1).mean() > 0.5  # most users capped: order matters
  liked = memory.encoder.user_table['user_liked']
  assert (liked >= 0).any() and ((liked >= 0).sum(1) < (memory.encoder.user_table['user_history'] >= 0).sum(1)).any()
  c.data.reader = 'stream'
  c.data.stream.eval_rows, c.data.stream.fit_rows = 150, 600
  streamed = experiment_lib.build(c, workdir=str(tmp_path))
  _same_experiment(streamed, memory, sampled=True)  # every user and item table, the histories among them
  assert streamed.data.num_rows < memory.data.num_rows / 2 and (tmp_path / 'input' / 'histories.npz').exists()
  batch = next(iter(streamed.stream.epoch(0)))
  assert not (batch['user']['user_history'] == batch['item']['item_id'][:, None]).any()
  assert not (batch['item']['item_audience'] == batch['user']['user_id'][:, None]).any()
  assert (batch['user']['user_history'] >= 0).sum() > 0


def _refuse_log(read_tables):
  def read(paths, *args, **kwargs):
    if any('log' in os.path.basename(p) for p in paths):
      raise AssertionError(f'the log was loaded whole: {paths}')
    return read_tables(paths, *args, **kwargs)
  return read


def test_csv_logs_stream_through_a_parquet_copy(tiny_config, files_dir, tmp_path):
  c = _files_config(tiny_config, files_dir)
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  csv_dir = tmp_path / 'csv'
  write_lib.write_dataset(memory.data, str(csv_dir), 'csv')
  c.data.log.paths = (str(csv_dir / 'log.csv'),)
  c.data.reader = 'stream'
  c.data.stream.row_group_size = 700
  streamed = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  _same_experiment(streamed, memory)
  copy, = (tmp_path / 'run' / 'input' / 'parquet').iterdir()
  assert pq.ParquetFile(copy).metadata.num_row_groups == -(-memory.data.num_rows // 700)
  # The CSV file changes (its last row dropped): converted again, and the copy of the earlier version removed.
  lines = (csv_dir / 'log.csv').read_text().splitlines(keepends=True)
  (csv_dir / 'log.csv').write_text(''.join(lines[:-1]))
  again = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  assert again.data.num_rows == memory.data.num_rows - 1
  newer, = (tmp_path / 'run' / 'input' / 'parquet').iterdir()
  assert newer.name != copy.name
  (csv_dir / 'bad.csv').write_text('user_id,item_id,timestamp\n1,2,4\n')  # no rating column
  c.data.log.paths = (str(csv_dir / 'bad.csv'),)
  with pytest.raises(DataError, match="bad.csv has no column 'rating'"):
    experiment_lib.build(c, workdir=str(tmp_path / 'bad'))


def test_csv_columns_whose_type_changes_after_the_first_block_stream_as_in_memory(tmp_path, monkeypatch):
  """The streamed CSV conversion reads a block at a time, and its first block fixed the undeclared columns'
  types: a column empty there and text later, or integers and then 0.5, stopped the conversion (the in-memory
  reader, which reads the file whole, infers their type from every row). It now converts again with the column
  widened: the copy holds the columns the in-memory reader reads."""
  monkeypatch.setattr(readers, '_CSV_BLOCK_BYTES', 4096)
  rows = 3000
  path = tmp_path / 'log.csv'
  with open(path, 'w') as f:
    f.write('user_id,survey,watch,late\n')
    for r in range(rows):
      f.write(f"{r % 7},{'ok' if r == rows - 2 else ''},{'0.5' if r == rows - 1 else r % 3},"
              f"{'' if r < rows - 3 else r % 2}\n")
  columns = {'user_id': '', 'survey': '', 'watch': '', 'late': ''}
  readers.csv_to_parquet(str(path), str(tmp_path / 'log.parquet'), ',', columns, 'interaction log', 1000)
  copy = pq.read_table(tmp_path / 'log.parquet')
  assert [str(t) for t in copy.schema.types] == ['int64', 'string', 'double', 'int64']
  memory, _ = readers.read_tables([str(path)], 'csv', ',', columns, 'interaction log')
  for name in columns:
    np.testing.assert_array_equal(readers.to_numpy(copy.column(name), name, 'log'), memory[name], err_msg=name)
  # a declared type is not widened: a value that is no number is an error, as before
  with pytest.raises(DataError, match=r"log.csv could not be read .*invalid value 'ok'"):
    readers.csv_to_parquet(str(path), str(tmp_path / 'declared.parquet'), ',', {**columns, 'survey': 'float'},
                           'interaction log')


def test_columns_empty_in_a_file_or_dictionary_encoded_stream_as_in_memory(tiny_config, files_dir, tmp_path):
  """Two Parquet files of one log: a label column empty throughout the second (written as nulls of no type) and
  a context column dictionary-encoded in the first, plain text in the second. The in-memory reader combines them;
  the stream refused both ("type null"; "holds string in ... but dictionary<...>")."""
  c = _files_config(tiny_config, files_dir)
  log = pq.read_table(files_dir / 'log.parquet')
  n = log.num_rows
  half = n // 2
  device = np.asarray(['web', 'ios', 'android'])[np.arange(n) % 3]
  watch = (np.arange(n) % 10) / 10.0
  first = log.slice(0, half).append_column('device', pa.array(device[:half]).dictionary_encode()) \
      .append_column('watch', pa.array(watch[:half]))
  second = log.slice(half).append_column('device', pa.array(device[half:])) \
      .append_column('watch', pa.nulls(n - half))
  assert str(second.schema.field('watch').type) == 'null'
  pq.write_table(first, tmp_path / 'log-1.parquet', row_group_size=500)
  pq.write_table(second, tmp_path / 'log-2.parquet', row_group_size=500)
  c.data.log.paths = (str(tmp_path / 'log-*.parquet'),)
  with c.unlocked():
    c.features.device = config_lib.feature('context')
    c.tasks.watch = config_lib.task('regression', 'watch')
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  c.data.reader = 'stream'
  streamed = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  _same_experiment(streamed, memory, sampled=True)
  assert memory.encoder.vocabs['device'].keys.tolist() == ['android', 'ios', 'web']
  rows = streamed.data.log['_row']
  for name in ('watch', 'rating'):
    want, got = memory.labels.columns[name], streamed.labels.columns[name]
    np.testing.assert_array_equal(got.present, want.present[rows], err_msg=name)
    np.testing.assert_array_equal(got.values, want.values[rows], err_msg=name)
  assert 0 < memory.labels.columns['watch'].present.mean() < 1
  batch = next(iter(streamed.stream.epoch(0)))  # the training stream reads the second file's null column too
  assert set(np.unique(batch['context']['device'])) <= {1, 2, 3}


def test_a_sparse_regression_label_takes_its_scale_from_every_row_as_in_memory(tiny_config, files_dir, tmp_path):
  """A regression label on a few rows, none in the stream's samples: its scale came from the samples (numpy's
  zero-size error with none there; a narrower range, which clips predictions, with some). The survey pass reads
  every row: the range is the whole log's, as in memory."""
  c = _files_config(tiny_config, files_dir)
  log = pq.read_table(files_dir / 'log.parquet')
  watch = np.full(log.num_rows, np.nan)
  watch[[101, 1703, log.num_rows - 9]] = [0.25, 0.75, 0.5]
  pq.write_table(log.append_column('watch', pa.array(watch, from_pandas=True)), tmp_path / 'log.parquet',
                 row_group_size=500)
  c.data.log.paths = (str(tmp_path / 'log.parquet'),)
  c.data.stream.update(fit_rows=50, eval_rows=20)
  with c.unlocked():
    c.tasks.watch = config_lib.task('regression', 'watch')
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  c.data.reader = 'stream'
  streamed = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  rows = streamed.data.log['_row']
  assert not np.isin([101, 1703, log.num_rows - 9], rows).all()  # at least one labelled row is in no sample
  spec = lambda exp: next(s for s in exp.specs if s.name == 'watch')
  assert spec(streamed).value_range == spec(memory).value_range == (0.25, 0.75)


@pytest.mark.parametrize('split', ['column', 'column_without_valid', 'timestamp', 'timestamp_as_text', 'random'])
def test_every_row_by_row_split_streams_as_in_memory(tiny_config, files_dir, tmp_path, split):
  """timestamp_as_text: times written as text (numbers) in Parquet: the stream compared the text with the cut."""
  c = _files_config(tiny_config, files_dir)
  log = pq.read_table(files_dir / 'log.parquet')
  cut = int(np.median(log.column('timestamp').to_numpy()))
  if split == 'timestamp_as_text':
    at = log.schema.get_field_index('timestamp')
    log = log.set_column(at, 'timestamp', pa.array(log.column('timestamp').to_numpy().astype(str)))
    pq.write_table(log, tmp_path / 'log.parquet', row_group_size=500)
    c.data.log.paths = (str(tmp_path / 'log.parquet'),)
    split = 'timestamp'
  if split.startswith('column'):
    names = np.asarray(['train', 'test', 'train', 'valid', 'train'] * (log.num_rows // 5 + 1))[:log.num_rows]
    if split == 'column_without_valid':  # validation is then the seeded share of the 'train' rows, in both readers
      names[names == 'valid'] = 'train'
    pq.write_table(log.append_column('set', pa.array(names)), tmp_path / 'log.parquet', row_group_size=500)
    c.data.log.paths = (str(tmp_path / 'log.parquet'),)
    c.data.split, c.data.split_column = 'column', 'set'
  elif split == 'timestamp':
    c.data.split, c.data.split_cut = 'timestamp', cut
  else:
    c.data.split = 'random'
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  c.data.reader = 'stream'
  streamed = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
  _same_experiment(streamed, memory)
  assert memory.split.valid.size > 0 and memory.split.test.size > 0
  if split.startswith('column'):  # a restart finds whether the column names 'valid' rows in the run directory
    import unittest.mock  # pylint: disable=g-import-not-at-top
    with unittest.mock.patch.object(experiment_lib, '_any_equal', side_effect=AssertionError('read again')):
      again = experiment_lib.build(c, workdir=str(tmp_path / 'run'))
    np.testing.assert_array_equal(again.data.log['_row'][again.split.valid], rows_of(streamed, 'valid'))


def rows_of(exp, name):
  return exp.data.log['_row'][getattr(exp.split, name)]


def test_a_bad_id_in_a_streamed_log_names_its_file_and_row(tiny_config, files_dir, tmp_path):
  log = pq.read_table(files_dir / 'log.parquet').to_pydict()
  log['user_id'] = [float(u) for u in log['user_id']]
  log['user_id'][1234] = None  # in the third row group of 500 rows
  pq.write_table(pa.table(log), tmp_path / 'log.parquet', row_group_size=500)
  c = _files_config(tiny_config, files_dir)
  c.data.log.paths = (str(tmp_path / 'log.parquet'),)
  with pytest.raises(DataError, match=r"log.parquet, row 1235: column 'user_id' holds a null id"):
    experiment_lib.build(c, workdir=str(tmp_path / 'run'))


def test_a_streamed_runs_export_says_whose_seen_items_it_holds(tiny_config, files_dir, tmp_path):
  from mtl_rec import export  # pylint: disable=g-import-not-at-top
  c = _files_config(tiny_config, files_dir)
  c.data.reader = 'memory'
  memory = export.tables_from_experiment(experiment_lib.build(c))
  assert memory.seen_history == 'train + valid ratings'
  c.data.reader = 'stream'
  c.data.stream.eval_rows, c.data.stream.fit_rows = 150, 300  # samples of the users and of the training rows
  exp = experiment_lib.build(c, workdir=str(tmp_path))
  tables = export.tables_from_experiment(exp)
  n = exp.counts['sampled']['evaluation_users']
  assert f'all of them for the {n} evaluation users, for the others only their rows in the fitting sample' in \
      tables.seen_history
  np.testing.assert_array_equal(tables.user_ids, memory.user_ids)
  full, held = np.diff(memory.seen_indptr), np.diff(tables.seen_indptr)
  evaluated = np.isin(tables.user_ids, exp.data.log['user_id'][np.concatenate([exp.split.valid, exp.split.test])])
  assert 0 < evaluated.sum() < evaluated.size
  np.testing.assert_array_equal(held[evaluated], full[evaluated])
  assert (held[~evaluated] < full[~evaluated]).all()


def test_a_history_condition_reads_its_column_on_every_reader(tiny_config, files_dir, tmp_path):
  """A `where` column that no task or metric reads (here the rating, with the rating tasks gone) is read from the
  files all the same: in memory, streamed from Parquet and streamed through a CSV's Parquet copy, the same table."""
  c = _files_config(tiny_config, files_dir)
  with c.unlocked():
    del c.tasks['like'], c.tasks['rating']
    c.features.user_liked = config_lib.feature('user', kind='history', of='item_id', max_values=8,
                                               where='rating >= 4')
  c.eval.gain_column = ''
  c.train.early_stopping_metric = ''
  c.data.reader = 'memory'
  memory = experiment_lib.build(c)
  liked = memory.encoder.user_table['user_liked']
  assert (liked >= 0).any() and 'rating' in memory.data.log
  c.data.reader = 'stream'
  streamed = experiment_lib.build(c, workdir=str(tmp_path / 'parquet'))
  np.testing.assert_array_equal(streamed.encoder.user_table['user_liked'], liked)
  csv_dir = tmp_path / 'csv'
  write_lib.write_dataset(memory.data, str(csv_dir), 'csv')
  c.data.log.paths = (str(csv_dir / 'log.csv'),)
  c.data.user_table.paths = (str(csv_dir / 'users.csv'),)
  c.data.item_table.paths = (str(csv_dir / 'items.csv'),)
  from_csv = experiment_lib.build(c, workdir=str(tmp_path / 'csv_run'))
  np.testing.assert_array_equal(from_csv.encoder.user_table['user_liked'], liked)

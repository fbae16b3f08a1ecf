"""Tests of the data sources in mtl_rec/data: MovieLens loaders, TFDS source, synthetic generator.

The only network use is fetching real ML-100K once per session (GroupLens if reachable, else the recbole wheel
from the package index via pip); everything else is written by the tests. The internet (urllib / socket) is
the only thing mocked.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import shutil
import socket
import urllib.error
import zipfile
from unittest import mock

import numpy as np
import pytest

from mtl_rec import data as data_lib
from mtl_rec.data import DataError, RatingsData, fetch, movielens, synthetic, tfds_source


# ------------------------------------------------------------------------------------------------------------
# Helpers.


def assert_same_data(a: RatingsData, b: RatingsData) -> None:
  """Everything but `source` is identical (values and dtypes)."""
  assert a.name == b.name
  for part_a, part_b in ((a, b), (a.users, b.users), (a.items, b.items)):
    for field in dataclasses.fields(part_a):
      va, vb = getattr(part_a, field.name), getattr(part_b, field.name)
      if isinstance(va, np.ndarray):
        assert va.dtype.kind == vb.dtype.kind and va.shape == vb.shape, field.name
        np.testing.assert_array_equal(va, vb, err_msg=field.name)
      elif field.name not in ('source', 'users', 'items'):
        assert va == vb, field.name


def write_grouplens_100k(data: RatingsData, directory: pathlib.Path) -> pathlib.Path:
  """Writes `data` as GroupLens u.data / u.user / u.item (latin-1) into `directory`."""
  directory.mkdir(parents=True, exist_ok=True)
  rows = np.stack([data.user_id, data.item_id, data.rating.astype(np.int64), data.timestamp], axis=1)
  np.savetxt(directory / 'u.data', rows, fmt='%d', delimiter='\t')
  u = data.users
  (directory / 'u.user').write_text(''.join(
      f'{i}|{a}|{g}|{o}|{z}\n' for i, a, g, o, z in zip(u.user_id, u.age, u.gender, u.occupation, u.zip_code)),
      encoding='latin-1')
  it = data.items
  lines = []
  for iid, title, year, genres in zip(it.item_id, it.title, it.year, it.genres):
    date = f'01-Jan-{year}' if year > 0 else ''
    flags = '|'.join('1' if g else '0' for g in genres)
    lines.append(f'{iid}|{title}|{date}||http://us.imdb.com/M/title-exact?{iid}|{flags}\n')
  (directory / 'u.item').write_bytes(''.join(lines).encode('latin-1'))
  return directory


def zip_dir(directory: pathlib.Path, dest: pathlib.Path, folder: str) -> pathlib.Path:
  with zipfile.ZipFile(dest, 'w', zipfile.ZIP_DEFLATED) as zf:
    if folder:
      zf.writestr(f'{folder}/', '')
    for f in sorted(directory.iterdir()):
      zf.write(f, f'{folder}/{f.name}' if folder else f.name)
  return dest


class FakeResponse(io.BytesIO):
  """What urllib.request.urlopen returns, serving `payload`."""

  def __init__(self, payload: bytes, content_length: int | None = None):
    super().__init__(payload)
    self.headers = {'Content-Length': str(len(payload) if content_length is None else content_length)}


# ------------------------------------------------------------------------------------------------------------
# Real ML-100K (fetched once per session).


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory) -> pathlib.Path:
  env = os.environ.get('MTL_REC_DATA')
  return pathlib.Path(env) if env else tmp_path_factory.mktemp('mtl_rec_cache')


@pytest.fixture(scope='session')
def ml100k(cache_dir) -> RatingsData:
  # The package registry is reachable wherever the tests run (they install from it), so this goes through the
  # recbole-wheel fallback for real; an error here is a failure, never a skip.
  return movielens.load_100k(cache_dir=cache_dir)


@pytest.fixture(scope='session')
def grouplens_dir(ml100k, tmp_path_factory) -> pathlib.Path:
  return write_grouplens_100k(ml100k, tmp_path_factory.mktemp('grouplens') / 'ml-100k')


def test_real_100k_counts_and_order(ml100k):
  assert ml100k.name == 'movielens-100k'
  assert ml100k.num_ratings == 100_000
  assert len(np.unique(ml100k.user_id)) == len(ml100k.users.user_id) == 943
  assert len(np.unique(ml100k.item_id)) == len(ml100k.items.item_id) == 1_682
  # u.data's first rows: the official u1.test split relies on this order.
  first = np.stack([ml100k.user_id[:2], ml100k.item_id[:2], ml100k.rating[:2].astype(np.int64),
                    ml100k.timestamp[:2]], axis=1)
  np.testing.assert_array_equal(first, [[196, 242, 3, 881250949], [186, 302, 3, 891717742]])
  assert ml100k.user_id.dtype == np.int64 and ml100k.item_id.dtype == np.int64
  assert ml100k.rating.dtype == np.float32 and ml100k.timestamp.dtype == np.int64
  assert set(np.unique(ml100k.rating)) == {1, 2, 3, 4, 5}
  assert ml100k.items.genre_names == movielens.GENRES and ml100k.items.genres.shape == (1_682, 19)
  assert ml100k.users.age.dtype == np.int32 and ml100k.items.year.dtype == np.int32
  # Spot checks of the side tables: user 1 and Toy Story.
  assert (ml100k.users.user_id[0], ml100k.users.age[0], ml100k.users.gender[0], ml100k.users.occupation[0],
          ml100k.users.zip_code[0]) == (1, 24, 'M', 'technician', '85711')
  toy_story = ml100k.items.genres[0]
  assert ml100k.items.year[0] == 1995
  assert {g for g, on in zip(movielens.GENRES, toy_story) if on} == {'Animation', "Children's", 'Comedy'}
  assert ml100k.source  # says which source was used


def test_second_load_comes_from_cache(ml100k, cache_dir):
  with mock.patch('urllib.request.urlopen', side_effect=AssertionError('no download expected')), \
       mock.patch('subprocess.run', side_effect=AssertionError('no pip expected')):
    again = movielens.load_100k(cache_dir=cache_dir, allow_download=False)
  assert 'cached' in again.source
  assert_same_data(ml100k, again)


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path):
  monkeypatch.setenv('MTL_REC_DATA', str(tmp_path / 'x'))
  assert fetch.default_cache_dir() == tmp_path / 'x'
  assert fetch.default_cache_dir(tmp_path / 'y') == tmp_path / 'y'
  assert fetch.default_cache_dir('') == tmp_path / 'x'  # the config's '' means 'not given'
  monkeypatch.delenv('MTL_REC_DATA')
  assert fetch.default_cache_dir() == pathlib.Path.home() / '.cache' / 'mtl_rec'


# ------------------------------------------------------------------------------------------------------------
# GroupLens format: directory, zip, download.


@pytest.mark.parametrize('kind', ['dir', 'parent_dir', 'zip_with_folder', 'zip_flat'])
def test_grouplens_formats_load_identically(ml100k, grouplens_dir, tmp_path, kind):
  if kind == 'dir':
    path = grouplens_dir
  elif kind == 'parent_dir':
    path = grouplens_dir.parent  # files one level down, under ml-100k/
  elif kind == 'zip_with_folder':
    path = zip_dir(grouplens_dir, tmp_path / 'ml-100k.zip', 'ml-100k')
  else:
    path = zip_dir(grouplens_dir, tmp_path / 'flat.zip', '')
  loaded = movielens.load_100k(path=str(path))
  assert str(path) in loaded.source
  assert_same_data(ml100k, loaded)


def test_download_path(ml100k, grouplens_dir, tmp_path):
  payload = zip_dir(grouplens_dir, tmp_path / 'served.zip', 'ml-100k').read_bytes()
  cache = tmp_path / 'cache'
  calls = []

  def fake_urlopen(url, timeout=None):
    calls.append((url, timeout))
    return FakeResponse(payload)

  with mock.patch('urllib.request.urlopen', side_effect=fake_urlopen):
    loaded = movielens.load_100k(cache_dir=cache)
  assert calls == [(movielens.ML_100K_URL, fetch.DOWNLOAD_TIMEOUT_S)]
  assert calls[0][1] <= 10
  assert 'grouplens download' in loaded.source
  assert (cache / 'ml-100k.zip').is_file() and not (cache / 'ml-100k.zip.part').exists()
  assert_same_data(ml100k, loaded)

  with mock.patch('urllib.request.urlopen', side_effect=AssertionError('no second download')):
    again = movielens.load_100k(cache_dir=cache)
  assert 'cached grouplens' in again.source
  assert_same_data(ml100k, again)


@pytest.mark.parametrize('failure', ['unreachable', 'truncated', 'not_a_zip'])
def test_failed_download_leaves_nothing(grouplens_dir, tmp_path, failure):
  payload = zip_dir(grouplens_dir, tmp_path / 'served.zip', 'ml-100k').read_bytes()
  if failure == 'unreachable':
    effect = urllib.error.URLError(socket.gaierror(-2, 'Name or service not known'))
  elif failure == 'truncated':
    effect = [FakeResponse(payload[:1000], content_length=len(payload))]
  else:
    effect = [FakeResponse(b'<html>captive portal</html>')]
  dest = tmp_path / 'cache' / 'ml-100k.zip'
  with mock.patch('urllib.request.urlopen', side_effect=effect):
    assert not fetch.download(movielens.ML_100K_URL, dest)
  assert not dest.exists() and not dest.with_name('ml-100k.zip.part').exists()


def test_no_source_without_downloads(tmp_path):
  with pytest.raises(DataError, match='ml-100k.zip'):
    movielens.load_100k(cache_dir=tmp_path, allow_download=False)
  with pytest.raises(DataError, match=str(tmp_path)):
    movielens.load_100k(path='', cache_dir=str(tmp_path), allow_download=False)  # '' = no path
  with pytest.raises(DataError, match='ml-1m.zip'):
    movielens.load_1m(cache_dir=tmp_path, allow_download=False)
  with pytest.raises(DataError, match='neither a directory nor a zip'):
    movielens.load_100k(path=tmp_path / 'missing')


# ------------------------------------------------------------------------------------------------------------
# Corrupt and partial files.


def _corrupt_copy(grouplens_dir: pathlib.Path, tmp_path: pathlib.Path, name: str, edit) -> pathlib.Path:
  target = tmp_path / 'ml-100k'
  shutil.copytree(grouplens_dir, target)
  path = target / name
  lines = path.read_bytes().split(b'\n')
  path.write_bytes(b'\n'.join(edit(lines)))
  return target


@pytest.mark.parametrize('name,edit,message', [
    ('u.data', lambda ls: ls[:-500] + [b'12\t20'], r'u\.data, line 99502: 2 .* fields, expected 4'),
    ('u.data', lambda ls: ls[:4] + [b'1\t2\tthree\t4'] + ls[5:], r'u\.data, line 5: field 3 is not a number'),
    ('u.data', lambda ls: ls[:2] + [b'1\t2\t7\t4'] + ls[3:], r'u\.data, line 3: rating .* invalid'),
    ('u.data', lambda ls: ls[:-11] + [b''], r'99,990 ratings.*partial or truncated'),
    ('u.item', lambda ls: ls[:9] + [ls[9][:30]] + ls[10:], r'u\.item, line 10: .* fields, expected 24'),
    ('u.user', lambda ls: ls[:2] + [b'3|twenty|M|writer|32067'] + ls[3:], r'u\.user, line 3: age'),
    ('u.user', lambda ls: ls[:5] + ls[4:], r'user id 5 appears more than once'),
    ('u.user', lambda ls: ls[:-6] + [b''], r'refers to user .* not in the user file'),
])
def test_corrupt_grouplens_file_raises(grouplens_dir, tmp_path, name, edit, message):
  path = _corrupt_copy(grouplens_dir, tmp_path, name, edit)
  with pytest.raises(DataError, match=message) as err:
    movielens.load_100k(path=path)
  assert 'Fix or replace' in str(err.value)


def test_missing_file_raises(grouplens_dir, tmp_path):
  path = _corrupt_copy(grouplens_dir, tmp_path, 'u.user', lambda ls: ls)
  (path / 'u.user').unlink()
  with pytest.raises(DataError, match="no file 'u.user'"):
    movielens.load_100k(path=path)


def test_corrupt_cached_zip_says_delete_and_rerun(grouplens_dir, tmp_path):
  payload = zip_dir(grouplens_dir, tmp_path / 'good.zip', 'ml-100k').read_bytes()
  cache = tmp_path / 'cache'
  cache.mkdir()
  # Flip bytes in the middle of the compressed u.data: still a zip, but its CRC check fails.
  broken = bytearray(payload)
  broken[len(broken) // 3: len(broken) // 3 + 64] = bytes(64)
  (cache / 'ml-100k.zip').write_bytes(bytes(broken))
  with pytest.raises(DataError, match=r'ml-100k\.zip.*Delete .*ml-100k\.zip.* re-run'):
    movielens.load_100k(cache_dir=cache, allow_download=False)


def test_corrupt_cached_recbole_wheel(tmp_path):
  wheel_dir = tmp_path / 'recbole'
  wheel_dir.mkdir(parents=True)
  wheel = wheel_dir / f'recbole-{movielens.RECBOLE_VERSION}-py3-none-any.whl'
  with zipfile.ZipFile(wheel, 'w') as zf:
    zf.writestr('recbole/dataset_example/ml-100k/ml-100k.inter',
                'user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t30')
  with pytest.raises(DataError, match=r'ml-100k\.inter, line 3: .*Delete .*recbole-.*\.whl'):
    movielens.load_100k(cache_dir=tmp_path, allow_download=False)


# ------------------------------------------------------------------------------------------------------------
# ML-1M format.

_ML1M_RATINGS = [(1, 1193, 5, 978300760), (1, 661, 3, 978302109), (2, 1193, 4, 978298413),
                 (3, 3408, 1, 978297867), (2, 2, 2, 978299000)]
_ML1M_USERS = ['1::F::1::10::48067', '2::M::56::16::70072', '3::M::25::15::55117']
_ML1M_MOVIES = ['1193::One Flew Over the Cuckoo\'s Nest (1975)::Drama', '661::James and the Giant Peach '
                '(1996)::Animation|Children\'s|Musical', '2::Jumanji (1995)::Adventure|Children\'s|Fantasy',
                '3408::Café au lait (2000)::Comedy|Drama', '5::No Year::Film-Noir']


def write_ml1m(directory: pathlib.Path, ratings=_ML1M_RATINGS) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'ratings.dat').write_text(''.join('::'.join(map(str, r)) + '\n' for r in ratings))
  (directory / 'users.dat').write_text('\n'.join(_ML1M_USERS) + '\n')
  (directory / 'movies.dat').write_bytes(('\n'.join(_ML1M_MOVIES) + '\n').encode('latin-1'))
  return directory


@pytest.mark.parametrize('as_zip', [False, True])
def test_ml1m_fixture(tmp_path, as_zip):
  directory = write_ml1m(tmp_path / 'ml-1m')
  path = zip_dir(directory, tmp_path / 'ml-1m.zip', 'ml-1m') if as_zip else directory
  d = movielens.load_1m(path=path, expect_full=False)
  assert d.name == 'movielens-1m'
  np.testing.assert_array_equal(np.stack([d.user_id, d.item_id, d.rating.astype(np.int64), d.timestamp], 1),
                                _ML1M_RATINGS)
  np.testing.assert_array_equal(d.users.user_id, [1, 2, 3])
  np.testing.assert_array_equal(d.users.gender, ['F', 'M', 'M'])
  np.testing.assert_array_equal(d.users.age, [1, 56, 25])
  np.testing.assert_array_equal(d.users.occupation, ['10', '16', '15'])
  np.testing.assert_array_equal(d.users.zip_code, ['48067', '70072', '55117'])
  np.testing.assert_array_equal(d.items.item_id, [2, 5, 661, 1193, 3408])
  assert d.items.title[4] == 'Café au lait (2000)'
  np.testing.assert_array_equal(d.items.year, [1995, -1, 1996, 1975, 2000])
  assert d.items.genre_names == movielens.GENRES
  names = [{g for g, on in zip(movielens.GENRES, row) if on} for row in d.items.genres]
  assert names[2] == {'Animation', "Children's", 'Musical'} and names[1] == {'Film-Noir'}


def test_ml1m_full_counts_and_corruption(tmp_path):
  directory = write_ml1m(tmp_path / 'ml-1m')
  with pytest.raises(DataError, match='partial or truncated'):
    movielens.load_1m(path=directory)  # expect_full=True: a fixture is not the full dataset
  bad = write_ml1m(tmp_path / 'bad', ratings=_ML1M_RATINGS[:3] + [(3, 'x', 1, 5)])
  with pytest.raises(DataError, match=r'ratings\.dat, line 4: field 2 is not a number'):
    movielens.load_1m(path=bad, expect_full=False)
  (bad / 'ratings.dat').write_text('1::1193::5::978300760\n1::661:3::978302109\n')
  with pytest.raises(DataError, match=r'ratings\.dat, line 2: 3 .* fields'):
    movielens.load_1m(path=bad, expect_full=False)
  (bad / 'ratings.dat').write_text('1::1193::5::978300760\n9::661::3::978302109\n')
  with pytest.raises(DataError, match='refers to user 9'):
    movielens.load_1m(path=bad, expect_full=False)


def test_ml1m_download_path(tmp_path):
  payload = zip_dir(write_ml1m(tmp_path / 'ml-1m'), tmp_path / 'served.zip', 'ml-1m').read_bytes()
  with mock.patch('urllib.request.urlopen', return_value=FakeResponse(payload)) as urlopen:
    d = movielens.load_1m(cache_dir=tmp_path / 'cache', expect_full=False)
  assert urlopen.call_args.args[0] == movielens.ML_1M_URL
  assert 'grouplens download' in d.source and d.num_ratings == len(_ML1M_RATINGS)
  with mock.patch('urllib.request.urlopen', side_effect=urllib.error.URLError('offline')):
    with pytest.raises(DataError, match='could not be downloaded.*ml-1m.zip'):
      movielens.load_1m(cache_dir=tmp_path / 'empty')


def test_ml1m_parses_a_million_lines_fast(tmp_path):
  rng = np.random.default_rng(0)
  block = np.stack([rng.integers(1, 4, 1000), rng.choice([2, 5, 661, 1193, 3408], 1000), rng.integers(1, 6, 1000),
                    rng.integers(956703932, 1046454590, 1000)], axis=1)
  directory = write_ml1m(tmp_path / 'ml-1m', ratings=[])
  # Formatting a million lines in Python takes longer than parsing them; repeat a formatted block instead.
  text = ''.join('::'.join(map(str, r)) + '\n' for r in block.tolist())
  (directory / 'ratings.dat').write_text(text * 1000)
  import time  # pylint: disable=import-outside-toplevel
  start = time.perf_counter()
  d = movielens.load_1m(path=directory, expect_full=False)
  elapsed = time.perf_counter() - start
  assert d.num_ratings == 1_000_000
  np.testing.assert_array_equal(d.item_id, np.tile(block[:, 1], 1000))
  np.testing.assert_array_equal(d.timestamp[-1000:], block[:, 3])
  assert elapsed < 20, elapsed  # ~1 s unloaded; generous for busy CI machines


# ------------------------------------------------------------------------------------------------------------
# TFDS.


def _tfds_examples():
  def ex(user, movie, rating, ts, male, age, occupation, zip_code, title, genres):
    return {'user_id': user, 'movie_id': movie, 'user_rating': np.float32(rating), 'timestamp': np.int64(ts),
            'user_gender': np.bool_(male), 'raw_user_age': np.float32(age),
            'bucketized_user_age': np.float32(18.0), 'user_occupation_label': np.int64(0),
            'user_occupation_text': occupation, 'user_zip_code': zip_code, 'movie_title': title,
            'movie_genres': np.array(genres, dtype=np.int64)}
  # Labels: 2 Animation, 3 Children, 4 Comedy, 7 Drama, 17 Unknown (TFDS_GENRES order).
  return [
      ex(b'196', b'242', 3, 881250949, True, 49, b'writer', b'55105', b'Kolya (1996)', [4]),
      ex(b'186', b'302', 3, 891717742, False, 39, b'executive', b'00000', b'L.A. Confidential (1997)', [7]),
      ex(b'196', b'1', 5, 881251000, True, 49, b'writer', b'55105', b'Toy Story (1995)', [2, 3, 4]),
      ex(b'22', b'267', 1, 878887116, True, 25, b'writer', b'40206', b'unknown', [17]),
  ]


def test_tfds_source_maps_features():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  examples = _tfds_examples()

  def as_data_source(self, split=None, decoders=None, deserialize_method=None, **kwargs):
    del self, split, decoders, deserialize_method, kwargs
    return examples

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    d = tfds_source.load('movielens/100k-ratings', expect_full=False)
  assert d.name == 'movielens-100k' and 'tfds' in d.source
  np.testing.assert_array_equal(d.user_id, [196, 186, 196, 22])
  np.testing.assert_array_equal(d.item_id, [242, 302, 1, 267])
  np.testing.assert_array_equal(d.rating, [3, 3, 5, 1])
  np.testing.assert_array_equal(d.timestamp, [881250949, 891717742, 881251000, 878887116])
  np.testing.assert_array_equal(d.users.user_id, [22, 186, 196])
  np.testing.assert_array_equal(d.users.gender, ['M', 'F', 'M'])
  np.testing.assert_array_equal(d.users.age, [25, 39, 49])
  np.testing.assert_array_equal(d.users.occupation, ['writer', 'executive', 'writer'])
  np.testing.assert_array_equal(d.users.zip_code, ['40206', '00000', '55105'])
  np.testing.assert_array_equal(d.items.item_id, [1, 242, 267, 302])
  np.testing.assert_array_equal(d.items.year, [1995, 1996, -1, 1997])
  assert d.items.genre_names == movielens.GENRES  # TFDS labels mapped onto GroupLens names, no extras
  names = [{g for g, on in zip(d.items.genre_names, row) if on} for row in d.items.genres]
  assert names == [{'Animation', "Children's", 'Comedy'}, {'Comedy'}, {'unknown'}, {'Drama'}]
  for arr, dtype in ((d.user_id, np.int64), (d.rating, np.float32), (d.timestamp, np.int64),
                     (d.users.age, np.int32), (d.items.year, np.int32), (d.items.genres, np.bool_)):
    assert arr.dtype == dtype


def test_tfds_source_random_mock_1m():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  with tfds.testing.mock_data(num_examples=30):
    d = tfds_source.load('movielens/1m-ratings', expect_full=False, batch_size=7)
  assert d.name == 'movielens-1m' and d.num_ratings == 30
  assert len(d.users.user_id) == len(np.unique(d.user_id))
  assert d.items.genres.shape == (len(d.items.item_id), len(d.items.genre_names))
  assert d.items.genre_names[:19] == movielens.GENRES
  with tfds.testing.mock_data(num_examples=30):
    with pytest.raises(DataError, match='expected'):
      tfds_source.load('movielens/1m-ratings')  # random data is not the full dataset


def test_tfds_source_unprepared_fails_fast(tmp_path):
  with pytest.raises(DataError, match='not prepared'):
    tfds_source.load('movielens/100k-ratings', data_dir=str(tmp_path), download=False)
  # Offline: must not sit through TFDS' minutes of download retries.
  with mock.patch('socket.create_connection', side_effect=OSError('offline')):
    with pytest.raises(DataError, match='unreachable'):
      tfds_source.load('movielens/100k-ratings', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='Unsupported'):
    tfds_source.load('movielens/25m-ratings')


# ------------------------------------------------------------------------------------------------------------
# Synthetic.


def test_synthetic_deterministic_and_well_formed():
  a = synthetic.generate(500, 300, 7, latent_dim=6, seed=3)
  b = synthetic.generate(500, 300, 7, latent_dim=6, seed=3)
  assert_same_data(a, b)
  c = synthetic.generate(500, 300, 7, latent_dim=6, seed=4)
  assert not np.array_equal(a.item_id, c.item_id)

  assert a.user_id.dtype == np.int64 and a.item_id.dtype == np.int64
  assert a.rating.dtype == np.float32 and a.timestamp.dtype == np.int64
  assert a.num_ratings == 500 * 7
  assert a.user_id.min() >= 1 and a.user_id.max() <= 500 and a.item_id.min() >= 1 and a.item_id.max() <= 300
  assert set(np.unique(a.rating)) <= {1, 2, 3, 4, 5} and len(np.unique(a.rating)) == 5
  pairs = a.user_id * 1_000_000 + a.item_id
  assert len(np.unique(pairs)) == a.num_ratings
  np.testing.assert_array_equal(a.users.user_id, np.arange(1, 501))
  np.testing.assert_array_equal(a.items.item_id, np.arange(1, 301))
  assert a.users.age.dtype == np.int32 and a.items.year.dtype == np.int32
  assert a.items.genres.shape == (300, len(a.items.genre_names)) and a.items.genres.any(axis=1).all()
  assert set(np.unique(a.users.gender)) == {'M', 'F'}
  assert all(len(z) == 5 and z.isdigit() for z in a.users.zip_code)
  # Each user's rows are in time order.
  same_user = a.user_id[1:] == a.user_id[:-1]
  assert (np.diff(a.timestamp)[same_user] > 0).all()


def test_synthetic_small_catalog_uses_every_item():
  d = synthetic.generate(40, 6, 6)
  assert d.num_ratings == 240
  assert len(np.unique(d.user_id * 100 + d.item_id)) == 240


def test_synthetic_planted_signal_is_real():
  d, truth = synthetic.generate_with_truth(4000, 2000, 5, latent_dim=8, seed=0)
  rng = np.random.default_rng(0)
  interacted = truth.affinity(d.user_id, d.item_id)
  random = truth.affinity(d.user_id, rng.integers(1, 2001, d.num_ratings))
  assert interacted.mean() > random.mean() + 0.5
  # Ratings follow u.v; popular items get more interactions.
  assert np.corrcoef(interacted, d.rating)[0, 1] > 0.25
  counts = np.bincount(d.item_id - 1, minlength=2000)
  assert np.corrcoef(truth.item_popularity, counts)[0, 1] > 0.3

  def r2(x, y):
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    residual = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
    return 1 - residual.var() / y.var()

  # Side features are predictable from the factors.
  assert r2(truth.user_factors, d.users.age.astype(float)) > 0.4
  assert r2(truth.user_factors, (d.users.gender == 'M').astype(float)) > 0.1
  assert r2(truth.item_factors, d.items.year.astype(float)) > 0.4
  assert r2(truth.item_factors, d.items.genres[:, 8].astype(float)) > 0.1  # Drama


def test_synthetic_scales_without_dense_matrix():
  # 100k users x 500k items would be 200 GB as a dense float32 matrix.
  d = synthetic.generate(100_000, 500_000, 5, seed=1)
  assert d.num_ratings >= 100_000 * 5 - 10
  assert len(np.unique(d.user_id * 1_000_000 + d.item_id)) == d.num_ratings
  assert len(d.items.item_id) == 500_000


def test_package_exports():
  assert data_lib.RatingsData is RatingsData and data_lib.DataError is DataError
  assert data_lib.movielens is movielens and data_lib.synthetic is synthetic
  assert data_lib.tfds_source is tfds_source
  assert issubclass(DataError, ValueError)

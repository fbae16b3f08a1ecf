"""Synthetic ratings with planted structure, at any scale, for tests and benchmarks.

The generative story (every array is seeded, so the same arguments give identical data):

  * User factors U [num_users, d] and item factors V [num_items, d], scaled so that u.v has unit variance, plus
    an item popularity bias p ~ N(0, 1).
  * Each user draws a candidate subset of items, half uniformly and half from a long-tailed (1/rank)
    distribution over items ranked by popularity, and keeps the top `interactions_per_user` candidates by
    `affinity_weight * u.v + popularity_weight * p + Gumbel noise` (Gumbel top-k = sampling without
    replacement with probability increasing in that score). Duplicate candidates are dropped, so no
    (user, item) pair repeats. Nothing of size users x items is ever built: users are processed in chunks
    against their own candidates only, so 2M users x 2M items takes seconds, not terabytes.
  * Rating = clip(round(mu + b_u + b_i + rating_affinity_weight * u.v + noise), 1, 5).
  * Side features are noisy functions of the factors, so they carry signal: gender, age, occupation and the zip
    code's first digit from U; genres and release year from V.
  * Timestamps: each user starts at a random time and rates items at exponential gaps, in random order
    relative to the scores (so time does not leak the ranking).

Raw ids are 1..N like MovieLens: user id `k` is row `k - 1` of `Truth.user_factors`.

`write_log` is another, simpler story at another scale: an interaction log of any length (100M rows and more)
written to Parquet a row group at a time, for the streaming benchmark (mtl_rec.data_benchmark).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_rec import errors
from mtl_rec import files
from mtl_rec.data.movielens import GENRES
from mtl_rec.data.types import Dataset, ItemTable, RatingsData, UserTable

# ML-100K's occupations, so synthetic users look like MovieLens ones to the feature code.
OCCUPATIONS: tuple[str, ...] = (
    'administrator', 'artist', 'doctor', 'educator', 'engineer', 'entertainment', 'executive', 'healthcare',
    'homemaker', 'lawyer', 'librarian', 'marketing', 'none', 'other', 'programmer', 'retired', 'salesman',
    'scientist', 'student', 'technician', 'writer',
)

_START_TIME = 874_724_710  # 1997-09-20, ML-100K's first timestamp.
_DAY = 86_400


@dataclasses.dataclass(frozen=True)
class Truth:
  """The planted parameters behind a synthetic `RatingsData`. Row k is raw id k + 1."""

  user_factors: np.ndarray  # float32 [U, d]
  item_factors: np.ndarray  # float32 [I, d]
  item_popularity: np.ndarray  # float32 [I], the popularity bias p in the selection score
  user_bias: np.ndarray  # float32 [U], b_u
  item_bias: np.ndarray  # float32 [I], b_i
  global_mean: float  # mu
  rating_affinity_weight: float  # weight of u.v in the rating

  def affinity(self, user_id: np.ndarray, item_id: np.ndarray) -> np.ndarray:
    """u.v for arrays of raw (1-based) user and item ids."""
    u = self.user_factors[np.asarray(user_id) - 1]
    v = self.item_factors[np.asarray(item_id) - 1]
    return np.einsum('...d,...d->...', u, v)


def generate(num_users: int, num_items: int, interactions_per_user: int, latent_dim: int = 8, seed: int = 0,
             **kwargs) -> RatingsData:
  """Synthetic ratings; see `generate_with_truth` for the arguments."""
  return generate_with_truth(num_users, num_items, interactions_per_user, latent_dim, seed, **kwargs)[0]


def generate_with_truth(
    num_users: int,
    num_items: int,
    interactions_per_user: int,
    latent_dim: int = 8,
    seed: int = 0,
    *,
    num_candidates: int | None = None,
    popular_candidate_frac: float = 0.5,
    affinity_weight: float = 2.0,
    popularity_weight: float = 1.0,
    global_mean: float = 2.6,
    bias_std: float = 0.35,
    rating_affinity_weight: float = 0.7,
    rating_noise_std: float = 0.9,
    chunk_size: int = 1 << 15,
) -> tuple[RatingsData, Truth]:
  """Synthetic ratings plus the planted truth.

  Args:
    num_users: number of users (raw ids 1..num_users).
    num_items: number of items (raw ids 1..num_items).
    interactions_per_user: interactions drawn per user (a user gets fewer only in the rare case where its
      candidate subset had too many duplicates).
    latent_dim: d, the size of the planted factors.
    seed: the same seed (and arguments) gives identical arrays.
    num_candidates: size of each user's candidate subset; default max(8 * interactions_per_user, 32), capped at
      num_items (then every item is a candidate). Larger = sharper selection, more work.
    popular_candidate_frac: share of candidates drawn from the 1/rank popularity distribution (the rest are
      uniform); this is what makes item counts long-tailed.
    affinity_weight: weight of u.v in the selection score.
    popularity_weight: weight of the popularity bias in the selection score.
    global_mean: mu of the rating model.
    bias_std: std of the user and item rating biases.
    rating_affinity_weight: weight of u.v in the rating.
    rating_noise_std: std of the rating noise before rounding.
    chunk_size: users per chunk; bounds memory at about chunk_size * num_candidates * latent_dim floats. The
      output depends on it (it sets the random streams), so keep it fixed for reproducibility.

  Returns:
    (data, truth). Ratings rows are grouped by user (users in id order), each user's rows in time order.
  """
  if min(num_users, num_items, interactions_per_user, latent_dim, chunk_size) < 1:
    raise errors.ConfigError('num_users, num_items, interactions_per_user, latent_dim and chunk_size must be >= 1.')
  if interactions_per_user > num_items:
    raise errors.ConfigError(f'interactions_per_user={interactions_per_user} > num_items={num_items}.')
  k = interactions_per_user
  c = min(num_items, num_candidates or max(8 * k, 32))
  if c < k:
    raise errors.ConfigError(f'num_candidates={c} < interactions_per_user={k}.')

  seeds = np.random.SeedSequence(seed).spawn(4)
  params_rng, users_rng, items_rng = (np.random.default_rng(s) for s in seeds[:3])
  chunk_seeds = seeds[3]

  # Factor scale so that u.v ~ unit variance: Var(u.v) = d * s^4.
  scale = latent_dim ** -0.25
  user_factors = (params_rng.standard_normal((num_users, latent_dim), dtype=np.float32) * scale)
  item_factors = (params_rng.standard_normal((num_items, latent_dim), dtype=np.float32) * scale)
  popularity = params_rng.standard_normal(num_items, dtype=np.float32)
  user_bias = params_rng.normal(0.0, bias_std, num_users).astype(np.float32)
  # Popular items are rated a little higher, as in MovieLens.
  item_bias = (params_rng.normal(0.0, bias_std, num_items) + 0.15 * popularity).astype(np.float32)
  by_popularity = np.argsort(-popularity, kind='stable').astype(np.int64)

  users_out, items_out, ratings_out, times_out = [], [], [], []
  starts = range(0, num_users, chunk_size)
  for start, chunk_seed in zip(starts, chunk_seeds.spawn(len(starts))):
    rng = np.random.default_rng(chunk_seed)
    users = np.arange(start, min(start + chunk_size, num_users))
    b = len(users)
    u = user_factors[users]

    if c == num_items:
      cand = np.broadcast_to(np.arange(num_items, dtype=np.int64), (b, c))
      dup = None
    else:
      uniform = rng.integers(0, num_items, (b, c))
      # floor((I + 1) ** x) - 1 for x ~ U[0, 1) puts mass ~ 1 / (rank + 1) on rank 0..I-1.
      log_span = np.float32(np.log(num_items + 1.0))
      rank = np.exp(rng.random((b, c), dtype=np.float32) * log_span).astype(np.int64) - 1
      popular = np.take(by_popularity, np.clip(rank, 0, num_items - 1))
      cand = np.where(rng.random((b, c)) < popular_candidate_frac, popular, uniform)
      cand.sort(axis=1)
      dup = np.zeros((b, c), dtype=bool)
      dup[:, 1:] = cand[:, 1:] == cand[:, :-1]

    # np.take is several times faster than fancy indexing for this random row gather, the hot spot here.
    uv = np.einsum('bcd,bd->bc', np.take(item_factors, cand, axis=0), u, optimize=True)  # [b, c]
    with np.errstate(divide='ignore'):
      gumbel = -np.log(-np.log(rng.random((b, c), dtype=np.float32)))
    score = affinity_weight * uv + popularity_weight * np.take(popularity, cand) + gumbel
    if dup is not None:
      score[dup] = -np.inf
    top = np.argpartition(-score, k - 1, axis=1)[:, :k] if k < c else np.broadcast_to(np.arange(c), (b, c))
    # argpartition leaves picks roughly in score order; shuffle them so the time order below carries no rank.
    top = np.take_along_axis(top, np.argsort(rng.random((b, k)), axis=1), axis=1)
    valid = np.isfinite(np.take_along_axis(score, top, axis=1))
    picked = np.take_along_axis(cand, top, axis=1)
    picked_uv = np.take_along_axis(uv, top, axis=1)

    raw = (global_mean + user_bias[users][:, None] + np.take(item_bias, picked) + rating_affinity_weight * picked_uv
           + rng.normal(0.0, rating_noise_std, (b, k)).astype(np.float32))
    rating = np.clip(np.rint(raw), 1, 5).astype(np.float32)
    first = _START_TIME + rng.integers(0, 400 * _DAY, b)
    gaps = rng.exponential(2 * _DAY, (b, k)).astype(np.int64) + 1
    times = first[:, None] + np.cumsum(gaps, axis=1)

    users_out.append(np.repeat(users, k).reshape(b, k)[valid])
    items_out.append(picked[valid])
    ratings_out.append(rating[valid])
    times_out.append(times[valid])

  data = RatingsData(
      name='synthetic',
      source=f'synthetic(num_users={num_users}, num_items={num_items}, interactions_per_user={k}, '
      f'latent_dim={latent_dim}, seed={seed})',
      user_id=np.concatenate(users_out).astype(np.int64) + 1,
      item_id=np.concatenate(items_out).astype(np.int64) + 1,
      rating=np.concatenate(ratings_out),
      timestamp=np.concatenate(times_out).astype(np.int64),
      users=_users(user_factors, users_rng),
      items=_items(item_factors, items_rng),
  )
  truth = Truth(user_factors=user_factors, item_factors=item_factors, item_popularity=popularity,
                user_bias=user_bias, item_bias=item_bias, global_mean=global_mean,
                rating_affinity_weight=rating_affinity_weight)
  return data, truth


def _projection(factors: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
  """[N, n] standardized random projections of the factors: each column ~ N(0, 1)."""
  w = rng.standard_normal((factors.shape[1], n)).astype(np.float32)
  w /= np.linalg.norm(w, axis=0, keepdims=True) * factors.std() + 1e-12
  return factors @ w


def _gumbel_argmax(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  with np.errstate(divide='ignore'):
    return np.argmax(logits - np.log(-np.log(rng.random(logits.shape, dtype=np.float32))), axis=1)


def _digits_to_str(digits: np.ndarray) -> np.ndarray:
  """[N, L] ints 0..9 -> [N] strings, without a Python loop over rows."""
  ascii_bytes = np.ascontiguousarray((digits + ord('0')).astype(np.uint8))
  return ascii_bytes.view(f'S{digits.shape[1]}')[:, 0].astype(str)


def _decimal_digits(values: np.ndarray) -> np.ndarray:
  """[N] non-negative ints -> [N, L] zero-padded decimal digits (L fits the largest)."""
  width = max(1, len(str(int(values.max(initial=0)))))
  return (values[:, None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10


def _users(factors: np.ndarray, rng: np.random.Generator) -> UserTable:
  n = factors.shape[0]
  z = _projection(factors, rng, 2)
  male = rng.random(n) < 1.0 / (1.0 + np.exp(-1.5 * z[:, 0]))
  age = np.clip(np.rint(33 + 9 * z[:, 1] + rng.normal(0, 5, n)), 7, 73).astype(np.int32)
  occupation = _gumbel_argmax(2.0 * _projection(factors, rng, len(OCCUPATIONS)), rng)
  region = _gumbel_argmax(2.0 * _projection(factors, rng, 10), rng)
  digits = np.concatenate([region[:, None], rng.integers(0, 10, (n, 4))], axis=1)
  return UserTable(
      user_id=np.arange(1, n + 1, dtype=np.int64),
      gender=np.where(male, 'M', 'F'),
      age=age,
      occupation=np.asarray(OCCUPATIONS)[occupation],
      zip_code=_digits_to_str(digits),
  )


def _items(factors: np.ndarray, rng: np.random.Generator) -> ItemTable:
  n = factors.shape[0]
  g = len(GENRES)
  # Base rates: 'unknown' (column 0) is rare, the rest average ~1.7 genres per item like ML-100K.
  base = np.full(g, -3.8, dtype=np.float32)
  base[0] = -8.0
  logits = 2.0 * _projection(factors, rng, g) + base
  # logits + logistic noise > 0, i.e. U < sigmoid(logits): one exp instead of two logs per entry.
  with np.errstate(over='ignore'):
    genres = rng.random((n, g), dtype=np.float32) * (1 + np.exp(-logits)) < 1
  none = ~genres.any(axis=1)
  genres[none, np.argmax(logits[none], axis=1)] = True
  year_z = _projection(factors, rng, 1)[:, 0]
  year = np.clip(np.rint(1988 + 8 * year_z + rng.normal(0, 4, n)), 1920, 2000).astype(np.int32)
  ids = np.arange(1, n + 1, dtype=np.int64)
  return ItemTable(
      item_id=ids,
      title=np.char.add('Item ', _digits_to_str(_decimal_digits(ids))),
      year=year,
      genres=genres,
      genre_names=GENRES,
  )


# ---------------------------------------------------------------------------------------------------------------
# A shop's log: the tasks and features of your own data, not MovieLens's.

SHOP_DEVICES = ('android', 'ios', 'web')
SHOP_SATISFACTION = ('bad', 'ok', 'great')
SHOP_CATEGORIES = ('books', 'games', 'garden', 'home', 'music', 'outdoor', 'sports', 'toys')


def shop(num_users: int = 2000, num_items: int = 500, interactions_per_user: int = 20, latent_dim: int = 4,
         seed: int = 0, item_vector_dim: int = 0) -> Dataset:
  """A synthetic shop: a log of the items users clicked, with string ids, request context and four labels.

  Columns: log (user, item, ts, device, hour, add_to_cart, watch_fraction, satisfaction), users (user, country,
  age), items (item, title, category, tags, price). The planted signal, from the factors of `generate_with_truth`:
  which items a user clicks (affinity u.v and popularity); add_to_cart from a second user direction against the
  item factors, cheaper items and the 'web' device; watch_fraction from u.v; a 3-class satisfaction survey
  (answered on 40% of the rows, else empty) from u.v plus the item's quality. Side features carry signal too:
  country from the user factors, category and tags from the item factors; age is missing for 10% of the users.
  With `item_vector_dim` > 0 the items table also has 'embedding': the item's factors, popularity and quality
  through a random linear map to that many numbers, plus noise — what a pretrained encoder of the item's content
  would give, and the only feature that knows an item no one has clicked yet.
  """
  data, truth = generate_with_truth(num_users, num_items, interactions_per_user, latent_dim, seed)
  rng = np.random.default_rng([seed, 7])
  n = data.num_ratings
  u_idx, i_idx = data.user_id - 1, data.item_id - 1
  affinity = truth.affinity(data.user_id, data.item_id).astype(np.float64)
  cart_direction = rng.standard_normal((latent_dim, latent_dim)) / np.sqrt(latent_dim)
  cart_affinity = np.einsum('nd,nd->n', truth.user_factors[u_idx] @ cart_direction, truth.item_factors[i_idx])
  price = np.exp(rng.normal(3.0, 0.8, num_items))
  device = rng.choice(len(SHOP_DEVICES), n, p=(0.45, 0.35, 0.2))
  cart_logit = 1.5 * cart_affinity - 0.6 * (np.log(price[i_idx]) - 3.0) + 0.8 * (device == 2) - 1.0
  add_to_cart = (rng.random(n) < 1 / (1 + np.exp(-cart_logit))).astype(np.int64)
  watch = 1 / (1 + np.exp(-(1.2 * affinity + rng.normal(0, 0.7, n))))
  quality = rng.normal(0, 1, num_items)
  mood = affinity + 0.8 * quality[i_idx] + rng.normal(0, 0.8, n)
  satisfaction = np.asarray(SHOP_SATISFACTION)[np.digitize(mood, np.quantile(mood, [1 / 3, 2 / 3]))]
  satisfaction = np.where(rng.random(n) < 0.4, satisfaction, '')
  hour = ((data.timestamp // 3600) % 24).astype(np.int64)

  countries = np.asarray(['br', 'de', 'fr', 'in', 'jp', 'us'])
  country = countries[_gumbel_argmax(2.0 * _projection(truth.user_factors, rng, countries.size), rng)]
  age = np.clip(rng.normal(35, 11, num_users), 16, 80).round()
  age[rng.random(num_users) < 0.1] = np.nan
  category = np.asarray(SHOP_CATEGORIES)[_gumbel_argmax(
      2.0 * _projection(truth.item_factors, rng, len(SHOP_CATEGORIES)), rng)]
  tag_names = np.asarray([f't{j:02d}' for j in range(24)])
  tag_logits = 2.0 * _projection(truth.item_factors, rng, tag_names.size) - 2.5
  has_tag = rng.random((num_items, tag_names.size)) < 1 / (1 + np.exp(-tag_logits))
  tags = np.asarray(['|'.join(tag_names[row]) for row in has_tag])
  items_extra = {}
  if item_vector_dim:
    planted = np.concatenate([truth.item_factors / truth.item_factors.std(), truth.item_popularity[:, None],
                              quality[:, None]], axis=1)
    vectors = planted @ rng.standard_normal((planted.shape[1], item_vector_dim)) / np.sqrt(planted.shape[1])
    vectors = vectors + rng.normal(0, 0.1, vectors.shape)
    items_extra['embedding'] = np.empty(num_items, dtype=object)
    items_extra['embedding'][:] = np.round(vectors, 4).tolist()
  user_ids = np.char.add('u', _digits_to_str(_decimal_digits(np.arange(1, num_users + 1))))
  item_ids = np.char.add('i', _digits_to_str(_decimal_digits(np.arange(1, num_items + 1))))
  return Dataset(
      name='synthetic-shop', source=f'synthetic.shop(num_users={num_users}, num_items={num_items}, seed={seed})',
      log={'user': user_ids[u_idx], 'item': item_ids[i_idx], 'ts': data.timestamp,
           'device': np.asarray(SHOP_DEVICES)[device], 'hour': hour, 'add_to_cart': add_to_cart,
           'watch_fraction': np.round(watch, 4), 'satisfaction': satisfaction},
      users={'user': user_ids, 'country': country, 'age': age},
      items={'item': item_ids, 'title': np.char.add('Product ', item_ids), 'category': category, 'tags': tags,
             'price': np.round(price, 2), **items_extra},
      user_column='user', item_column='item', timestamp_column='ts')


def sparse_id(index: np.ndarray, salt: int) -> np.ndarray:
  """Ids as real logs have them: 62-bit numbers spread out (a bijective hash of the index), not 0..n-1."""
  x = (index.astype(np.uint64) + np.uint64(salt << 40)) * np.uint64(0x9E3779B97F4A7C15)
  return (x >> np.uint64(2)).astype(np.int64)


def write_log(directory: str, rows: int, num_users: int, num_items: int, seed: int, row_group_size: int,
              rows_per_file: int, latent_dim: int = 8) -> list[str]:
  """The synthetic log's files (written unless a complete copy is there): user_id, item_id (int64, sparse_id),
  rating (int8, 1-5: planted factors + noise), timestamp (int64, increasing). Users are uniform, items Zipf-popular."""
  done = os.path.join(directory, 'COMPLETE.json')
  meta = {'ids': 'sparse', 'rows': rows, 'num_users': num_users, 'num_items': num_items, 'seed': seed,
          'row_group_size': row_group_size, 'rows_per_file': rows_per_file, 'latent_dim': latent_dim}
  if os.path.exists(done) and json.load(open(done))['meta'] == meta:
    return json.load(open(done))['paths']
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  rng = np.random.default_rng([seed, 31])
  user_f = rng.normal(0, 1 / np.sqrt(latent_dim), (num_users, latent_dim)).astype(np.float32)
  item_f = rng.normal(0, 1 / np.sqrt(latent_dim), (num_items, latent_dim)).astype(np.float32)
  item_bias = rng.normal(0, 0.5, num_items).astype(np.float32)
  popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
  cdf = np.cumsum(popularity / popularity.sum())
  schema = pa.schema([('user_id', pa.int64()), ('item_id', pa.int64()), ('rating', pa.int8()),
                      ('timestamp', pa.int64())])
  paths, written = [], 0
  t = time.time()
  while written < rows:
    path = os.path.join(directory, f'log-{len(paths):05d}.parquet')
    with pq.ParquetWriter(path + '.tmp', schema) as w:
      in_file = 0
      while in_file < rows_per_file and written < rows:
        n = min(row_group_size, rows_per_file - in_file, rows - written)
        users = rng.integers(0, num_users, n)
        items = np.minimum(np.searchsorted(cdf, rng.random(n)), num_items - 1)
        score = 3.4 + 2.0 * np.einsum('ij,ij->i', user_f[users], item_f[items]) + item_bias[items]
        rating = np.clip(np.rint(score + rng.normal(0, 0.6, n)), 1, 5).astype(np.int8)
        w.write_table(pa.table({'user_id': sparse_id(users, 1), 'item_id': sparse_id(items, 2), 'rating': rating,
                                'timestamp': np.arange(written, written + n, dtype=np.int64)}, schema=schema),
                      row_group_size=n)
        in_file += n
        written += n
    os.replace(path + '.tmp', path)
    paths.append(path)
    print(f'log: {written:,} / {rows:,} rows written ({time.time() - t:.0f}s)', flush=True)
  files.write_json(done, {'meta': meta, 'paths': paths})
  return paths

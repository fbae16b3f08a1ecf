"""Evaluation metrics: pointwise (AUC, logloss, accuracy, RMSE, MAE) and ranking (full-catalog and sampled).

Everything here is host-side numpy except `masked_topk`, which runs on the accelerator so the trainer never
copies a [users, items] score matrix to the host: it ranks in batches and brings back only [B, K] item indices.

Ranking conventions
-------------------
* Full-catalog protocol (RecBole): every item not in the user's training interactions is a candidate; the
  trainer builds `exclude` from the training CSR (and should also exclude the reserved out-of-vocabulary row 0).
  `topk_ranking_metrics` averages over users with at least one relevant item; users without any are skipped.
* Sampled protocol (NCF, He et al. 2017): the held-out positive is ranked among itself and M sampled
  unobserved items. Ties are pessimistic: a negative scoring *equal* to the positive ranks above it, so a
  constant model gets HR@K = 0 (for M >= K) instead of a perfect score.
* Relevant sets come as a CSR triple `(indptr, indices[, gains])` (see `csr_from_pairs`) or a list of arrays.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

CSR = tuple  # (indptr int [U+1], indices int [nnz]) or (indptr, indices, gains float [nnz])
Relevant = Union[CSR, Sequence[np.ndarray]]


# ----------------------------------------------------------------------------------------------------------------
# Validation helpers.
# ----------------------------------------------------------------------------------------------------------------


def _as_1d_float(name: str, x: np.ndarray) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}')
  if arr.size == 0:
    raise ValueError(f'{name} is empty')
  if not np.all(np.isfinite(arr)):
    raise ValueError(f'{name} contains NaN or inf ({int(np.sum(~np.isfinite(arr)))} entries)')
  return arr


def _check_same_shape(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f'{a_name} and {b_name} must have the same shape, got {a.shape} and {b.shape}')


def _binary_labels(labels: np.ndarray) -> np.ndarray:
  y = _as_1d_float('labels', labels)
  if not np.all((y == 0.0) | (y == 1.0)):
    bad = np.unique(y[(y != 0.0) & (y != 1.0)])[:5]
    raise ValueError(f'labels must be binary 0/1, found values such as {bad.tolist()}')
  return y


def _probabilities(probs: np.ndarray) -> np.ndarray:
  p = _as_1d_float('probs', probs)
  if np.any((p < 0.0) | (p > 1.0)):
    raise ValueError(f'probs must lie in [0, 1], got range [{p.min()}, {p.max()}]')
  return p


# ----------------------------------------------------------------------------------------------------------------
# Pointwise metrics.
# ----------------------------------------------------------------------------------------------------------------


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC via the Mann-Whitney statistic; tied scores get their average rank (same as sklearn).

  Args:
    labels: [N] binary labels (0/1 or bool).
    scores: [N] real-valued scores, higher means more likely positive.

  Returns:
    The probability that a random positive outscores a random negative, ties counting one half.

  Raises:
    ValueError: on shape mismatch, NaN/inf, non-binary labels, or when only one class is present.
  """
  y = _binary_labels(labels)
  s = _as_1d_float('scores', scores)
  _check_same_shape('labels', y, 'scores', s)
  n_pos = float(y.sum())
  n_neg = float(y.size - n_pos)
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f'AUC is undefined when only one class is present (positives={int(n_pos)}, '
                     f'negatives={int(n_neg)})')
  order = np.argsort(s, kind='stable')
  s_sorted = s[order]
  # Average 1-based rank of each tie group: groups are runs of equal values in the sorted array.
  starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
  ends = np.r_[starts[1:], s_sorted.size]  # exclusive
  group_rank = (starts + 1 + ends) / 2.0
  ranks_sorted = np.repeat(group_rank, ends - starts)
  pos_rank_sum = float(np.sum(ranks_sorted[y[order] == 1.0]))
  return (pos_rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy (natural log); probs are clipped to [eps, 1 - eps] so 0/1 stay finite."""
  y = _binary_labels(labels)
  p = _probabilities(probs)
  _check_same_shape('labels', y, 'probs', p)
  p = np.clip(p, eps, 1.0 - eps)
  return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
  """Fraction of correct hard predictions, predicting 1 when prob > threshold (strict, as in Keras)."""
  y = _binary_labels(labels)
  p = _probabilities(probs)
  _check_same_shape('labels', y, 'probs', p)
  return float(np.mean((p > threshold) == (y == 1.0)))


def rmse(y: np.ndarray, yhat: np.ndarray) -> float:
  """Root mean squared error."""
  a = _as_1d_float('y', y)
  b = _as_1d_float('yhat', yhat)
  _check_same_shape('y', a, 'yhat', b)
  return float(np.sqrt(np.mean((a - b) ** 2)))


def mae(y: np.ndarray, yhat: np.ndarray) -> float:
  """Mean absolute error."""
  a = _as_1d_float('y', y)
  b = _as_1d_float('yhat', yhat)
  _check_same_shape('y', a, 'yhat', b)
  return float(np.mean(np.abs(a - b)))


# ----------------------------------------------------------------------------------------------------------------
# CSR helpers.
# ----------------------------------------------------------------------------------------------------------------


def csr_from_pairs(user_rows: np.ndarray,
                   item_rows: np.ndarray,
                   num_users: int,
                   gains: np.ndarray | None = None) -> CSR:
  """Groups (user, item[, gain]) pairs by user into CSR form.

  Within a row, items are sorted ascending. Duplicate pairs are kept as given (the ranking metrics reject
  them; for an "observed" set they are harmless).

  Args:
    user_rows: [N] int user rows in [0, num_users).
    item_rows: [N] int item rows (>= 0).
    num_users: number of CSR rows.
    gains: optional [N] float gains (e.g. the held-out rating) carried along with the items.

  Returns:
    `(indptr int64 [num_users + 1], indices int64 [N])`, plus `gains float64 [N]` when gains were given.
  """
  u = np.asarray(user_rows)
  i = np.asarray(item_rows)
  if u.ndim != 1 or i.ndim != 1 or u.shape != i.shape:
    raise ValueError(f'user_rows and item_rows must be 1-D of equal length, got {u.shape} and {i.shape}')
  if not (np.issubdtype(u.dtype, np.integer) and np.issubdtype(i.dtype, np.integer)) and u.size:
    raise ValueError(f'user_rows and item_rows must be integer arrays, got {u.dtype} and {i.dtype}')
  u = u.astype(np.int64)
  i = i.astype(np.int64)
  if u.size and (u.min() < 0 or u.max() >= num_users):
    raise ValueError(f'user_rows must lie in [0, {num_users}), got range [{u.min()}, {u.max()}]')
  if i.size and i.min() < 0:
    raise ValueError(f'item_rows must be non-negative, got min {i.min()}')
  order = np.lexsort((i, u))
  indptr = np.zeros(num_users + 1, dtype=np.int64)
  np.cumsum(np.bincount(u, minlength=num_users), out=indptr[1:])
  if gains is None:
    return indptr, i[order]
  g = _as_1d_float('gains', gains) if u.size else np.asarray(gains, dtype=np.float64)
  _check_same_shape('gains', g, 'item_rows', i)
  return indptr, i[order], g[order]


def _normalize_relevant(relevant: Relevant, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Returns (indptr, indices, gains-or-None); a tuple is always CSR, anything else a per-user sequence."""
  if isinstance(relevant, tuple):
    if len(relevant) not in (2, 3):
      raise ValueError('a tuple `relevant` is read as CSR (indptr, indices[, gains]); pass per-user arrays '
                       f'as a list instead (got a tuple of length {len(relevant)})')
    indptr = np.asarray(relevant[0], dtype=np.int64)
    indices = np.asarray(relevant[1], dtype=np.int64)
    gains = None if len(relevant) == 2 else np.asarray(relevant[2], dtype=np.float64)
  else:
    rows = [np.asarray(r).reshape(-1) for r in relevant]
    lengths = np.array([r.size for r in rows], dtype=np.int64)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    gains = None
  if indptr.size != num_rows + 1:
    raise ValueError(f'relevant has {indptr.size - 1} user rows but topk_items has {num_rows}; they must align')
  if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.size:
    raise ValueError('relevant CSR indptr must start at 0, be non-decreasing and end at len(indices)')
  if indices.size and indices.min() < 0:
    raise ValueError('relevant item indices must be non-negative')
  if gains is not None:
    if gains.shape != indices.shape:
      raise ValueError(f'relevant gains shape {gains.shape} must match indices shape {indices.shape}')
    if not np.all(np.isfinite(gains)) or np.any(gains < 0):
      raise ValueError('relevant gains must be finite and non-negative')
  return indptr, indices, gains


# ----------------------------------------------------------------------------------------------------------------
# Full-catalog ranking.
# ----------------------------------------------------------------------------------------------------------------


def _discounts(n: int) -> np.ndarray:
  return 1.0 / np.log2(np.arange(n, dtype=np.float64) + 2.0)


def topk_ranking_metrics(topk_items: np.ndarray, relevant: Relevant, k: int | Sequence[int]) -> dict[str, float]:
  """Recall, NDCG, precision and hit rate at K for full-catalog top-K lists (RecBole's definitions).

  For user u with relevant set R_u and ranked list L_u (best first):
    recall@K = |L_u[:K] ∩ R_u| / |R_u|,    precision@K = |L_u[:K] ∩ R_u| / K,    hit@K = 1[L_u[:K] ∩ R_u ≠ ∅],
    ndcg@K = Σ_{r<K, L_u[r]∈R_u} 1/log2(r+2)  /  Σ_{r<min(|R_u|,K)} 1/log2(r+2).
  With gains g_u(i) (third CSR array), also ndcg@K_graded = Σ_{r<K} g_u(L_u[r])/log2(r+2) divided by the same
  sum over the user's gains sorted descending (users whose gains are all zero contribute 0).
  Every metric is averaged over the users with |R_u| > 0; the others are skipped.

  Args:
    topk_items: int [U, K'] item rows per user, best first, K' >= max(k). Negative entries are padding
      (e.g. for users with fewer than K candidates) and never count as hits.
    relevant: per-user relevant items aligned with topk_items' rows: a tuple is read as CSR
      `(indptr, indices[, gains])` (see `csr_from_pairs`); a list is read as U per-user int arrays.
      Duplicate items within a user are rejected.
    k: cutoff, or several cutoffs (all computed from the same lists).

  Returns:
    Dict with `recall@K`, `ndcg@K`, `precision@K`, `hit@K` (and `ndcg@K_graded` when gains are given) for each
    K, as Python floats. NaN if no user has a relevant item.
  """
  topk = np.asarray(topk_items)
  if topk.ndim != 2:
    raise ValueError(f'topk_items must be 2-D [users, K], got shape {topk.shape}')
  if topk.size and not np.issubdtype(topk.dtype, np.integer):
    raise ValueError(f'topk_items must be an integer array, got dtype {topk.dtype}')
  ks = [int(k)] if np.ndim(k) == 0 else [int(x) for x in k]
  if not ks or min(ks) < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  kmax = max(ks)
  if kmax > topk.shape[1]:
    raise ValueError(f'k={kmax} exceeds the number of ranked items per user ({topk.shape[1]})')
  num_users = topk.shape[0]
  topk = topk[:, :kmax].astype(np.int64)
  indptr, indices, gains = _normalize_relevant(relevant, num_users)
  n_rel = np.diff(indptr)

  # Duplicates in a top-K row would be counted as several hits.
  srt = np.sort(topk, axis=1)
  if np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
    raise ValueError('topk_items has a repeated item within a user row')

  # Vectorized membership: encode (user, item) as one int64 key and binary-search the sorted relevant keys.
  width = int(max(indices.max(initial=-1), topk.max(initial=-1))) + 1
  rel_user = np.repeat(np.arange(num_users, dtype=np.int64), n_rel)
  rel_keys = rel_user * width + indices
  key_order = np.argsort(rel_keys, kind='stable')
  rel_keys_sorted = rel_keys[key_order]
  if np.any(rel_keys_sorted[1:] == rel_keys_sorted[:-1]):
    raise ValueError('relevant has a repeated item within a user row')
  query = np.arange(num_users, dtype=np.int64)[:, None] * width + topk
  pos = np.searchsorted(rel_keys_sorted, query)
  pos_clipped = np.minimum(pos, max(rel_keys_sorted.size - 1, 0))
  hits = (topk >= 0) & (rel_keys_sorted.size > 0)
  if rel_keys_sorted.size:
    hits &= rel_keys_sorted[pos_clipped] == query

  evaluated = n_rel > 0
  num_eval = int(evaluated.sum())
  disc = _discounts(kmax)
  disc_cum = np.concatenate([[0.0], np.cumsum(disc)])

  graded_gain_matrix = None
  if gains is not None:
    graded_gain_matrix = np.where(hits, gains[key_order][pos_clipped] if gains.size else 0.0, 0.0)
    # Ideal DCG per user: sort each row's gains descending, keep the first K of each row.
    g_order = np.lexsort((-gains, rel_user))
    g_sorted = gains[g_order]
    rank_in_row = np.arange(indices.size, dtype=np.int64) - indptr[rel_user]

  out: dict[str, float] = {}
  for kk in ks:
    h = hits[:, :kk]
    n_hit = h.sum(axis=1).astype(np.float64)
    dcg = (h * disc[:kk]).sum(axis=1)
    idcg = disc_cum[np.minimum(n_rel, kk)]
    with np.errstate(invalid='ignore', divide='ignore'):
      per_user = {
          f'recall@{kk}': n_hit / n_rel,
          f'ndcg@{kk}': dcg / idcg,
          f'precision@{kk}': n_hit / kk,
          f'hit@{kk}': (n_hit > 0).astype(np.float64),
      }
      if graded_gain_matrix is not None:
        gdcg = (graded_gain_matrix[:, :kk] * disc[:kk]).sum(axis=1)
        in_k = rank_in_row < kk
        gidcg = np.bincount(rel_user[in_k], weights=g_sorted[in_k] * disc[rank_in_row[in_k]], minlength=num_users)
        per_user[f'ndcg@{kk}_graded'] = np.where(gidcg > 0, gdcg / np.where(gidcg > 0, gidcg, 1.0), 0.0)
    for name, values in per_user.items():
      out[name] = float(values[evaluated].mean()) if num_eval else float('nan')
  return out


def masked_topk(scores, exclude, k: int):
  """Top-k items per row on device, never returning an excluded item unless a row runs out of candidates.

  Args:
    scores: jax/numpy float [B, I] scores (higher is better).
    exclude: bool [B, I], True for items that must not be ranked (the user's training items, the OOV row 0).
    k: number of items to keep.

  Returns:
    `(values [B, k], indices int32 [B, k])` from `jax.lax.top_k`, best first. Excluded items get -inf, so if a
    row has fewer than k candidates its tail has value -inf and points at excluded items; map those indices to
    -1 (e.g. `np.where(np.isneginf(values), -1, indices)`) before `topk_ranking_metrics`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  scores = jnp.asarray(scores)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  masked = jnp.where(jnp.asarray(exclude, dtype=bool), jnp.array(-jnp.inf, scores.dtype), scores)
  return jax.lax.top_k(masked, k)


# ----------------------------------------------------------------------------------------------------------------
# Sampled ranking (NCF protocol).
# ----------------------------------------------------------------------------------------------------------------


def sampled_hr_ndcg(pos_scores: np.ndarray, neg_scores: np.ndarray, k: int = 10) -> dict[str, float]:
  """Hit ratio and NDCG of each positive ranked among itself and its M sampled negatives.

  rank = number of negatives scoring >= the positive (pessimistic ties: a tie ranks above the positive, so
  a constant model scores 0 rather than 1). HR@K = mean 1[rank < K]; NDCG@K = mean 1[rank < K] / log2(rank + 2).

  Args:
    pos_scores: [N] score of each held-out positive.
    neg_scores: [N, M] scores of the M negatives sampled for that positive.
    k: cutoff.

  Returns:
    `{'hr@K_sampled': float, 'ndcg@K_sampled': float}`.
  """
  pos = _as_1d_float('pos_scores', pos_scores)
  neg = np.asarray(neg_scores, dtype=np.float64)
  if neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
    raise ValueError(f'neg_scores must be [N, M] with N = len(pos_scores) = {pos.shape[0]}, got {neg.shape}')
  if not np.all(np.isfinite(neg)):
    raise ValueError('neg_scores contains NaN or inf')
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  rank = np.sum(neg >= pos[:, None], axis=1)
  hit = rank < k
  ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
  return {f'hr@{k}_sampled': float(hit.mean()), f'ndcg@{k}_sampled': float(ndcg.mean())}


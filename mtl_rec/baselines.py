"""Non-learned floors reported beside every model number: item popularity, the mu + b_u + b_i bias model and EASE.

Row 0 of our user/item vocabularies is reserved for out-of-vocabulary ids. It never appears in training data,
so its fitted bias is exactly 0 (the regularizer dominates an empty sum) and such rows predict mu + the other bias.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _rows(name: str, rows: np.ndarray, size: int) -> np.ndarray:
  arr = np.asarray(rows)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}')
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'{name} must be integer rows, got dtype {arr.dtype}')
  arr = arr.astype(np.int64)
  if arr.size and (arr.min() < 0 or arr.max() >= size):
    raise ValueError(f'{name} must lie in [0, {size}), got range [{arr.min()}, {arr.max()}]')
  return arr


def popularity_scores(train_item_rows: np.ndarray, num_items: int) -> np.ndarray:
  """Training interaction count per item row, as float32 [num_items] scores (higher = more popular)."""
  items = _rows('train_item_rows', train_item_rows, num_items)
  return np.bincount(items, minlength=num_items).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BiasModel:
  """Baseline predictor r_hat = mu + b_user[u] + b_item[i], clipped to the rating scale."""

  mu: float
  b_user: np.ndarray  # float32 [num_users]
  b_item: np.ndarray  # float32 [num_items]
  rating_min: float = 1.0
  rating_max: float = 5.0

  def predict(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
    """Predicted ratings, float32 [N], clipped to [rating_min, rating_max]."""
    u = _rows('user_rows', user_rows, self.b_user.shape[0])
    i = _rows('item_rows', item_rows, self.b_item.shape[0])
    if u.shape != i.shape:
      raise ValueError(f'user_rows and item_rows must have equal length, got {u.shape} and {i.shape}')
    pred = self.mu + self.b_user[u].astype(np.float64) + self.b_item[i]
    return np.clip(pred, self.rating_min, self.rating_max).astype(np.float32)


def fit_bias_model(user_rows: np.ndarray,
                   item_rows: np.ndarray,
                   ratings: np.ndarray,
                   num_users: int,
                   num_items: int,
                   reg_user: float = 10.0,
                   reg_item: float = 25.0,
                   iters: int = 10,
                   rating_min: float = 1.0,
                   rating_max: float = 5.0) -> BiasModel:
  """Fits mu + b_u + b_i by regularized alternating least squares (Koren's baseline predictors).

  Minimizes Σ (r - mu - b_u - b_i)^2 + reg_user Σ b_u^2 + reg_item Σ b_i^2 with mu fixed at the global mean.
  Each half-step is the exact minimizer for one bias given the other:
    b_i = Σ_{u∈R(i)} (r - mu - b_u) / (reg_item + |R(i)|),
    b_u = Σ_{i∈R(u)} (r - mu - b_i) / (reg_user + |R(u)|),
  so the objective decreases monotonically. The default 10 sweeps stop short of convergence (on ML-100K u1 the
  test RMSE is 0.0003 above the converged fit's, 0.9557 vs 0.9553, which takes ~80 sweeps): cheap enough to tune the
  shrinkage over a 36-point grid on every run, at a cost the floor's third decimal barely shows.
  Defaults (25 for items, 10 for users) are Koren's (2010) values for Netflix-scale data.

  Args:
    user_rows, item_rows: [N] int rows of the training ratings.
    ratings: [N] training ratings.
    num_users, num_items: vocabulary sizes (rows never seen get bias 0).
    reg_user, reg_item: L2 shrinkage toward 0, in units of "pseudo-ratings".
    iters: alternating sweeps (item then user).
    rating_min, rating_max: clip range of `predict`.

  Returns:
    The fitted `BiasModel`.
  """
  u = _rows('user_rows', user_rows, num_users)
  i = _rows('item_rows', item_rows, num_items)
  r = np.asarray(ratings, dtype=np.float64)
  if r.ndim != 1 or not (u.shape == i.shape == r.shape):
    raise ValueError(f'user_rows, item_rows and ratings must be 1-D of equal length, got {u.shape}, {i.shape}, '
                     f'{r.shape}')
  if r.size == 0:
    raise ValueError('cannot fit a bias model on zero ratings')
  if not np.all(np.isfinite(r)):
    raise ValueError('ratings contains NaN or inf')
  if reg_user < 0 or reg_item < 0 or iters < 1:
    raise ValueError(f'need reg_user, reg_item >= 0 and iters >= 1, got {reg_user}, {reg_item}, {iters}')
  mu = float(r.mean())
  resid = r - mu
  n_user = np.bincount(u, minlength=num_users).astype(np.float64)
  n_item = np.bincount(i, minlength=num_items).astype(np.float64)
  # A zero denominator only happens for unseen rows with reg 0; their numerator is 0 as well, so use 1.
  den_user = np.where(reg_user + n_user > 0, reg_user + n_user, 1.0)
  den_item = np.where(reg_item + n_item > 0, reg_item + n_item, 1.0)
  b_user = np.zeros(num_users)
  b_item = np.zeros(num_items)
  for _ in range(iters):
    b_item = np.bincount(i, weights=resid - b_user[u], minlength=num_items) / den_item
    b_user = np.bincount(u, weights=resid - b_item[i], minlength=num_users) / den_user
  return BiasModel(mu=mu, b_user=b_user.astype(np.float32), b_item=b_item.astype(np.float32),
                   rating_min=rating_min, rating_max=rating_max)


# The regularization grids the floors are tuned over on the validation split: a floor with the wrong shrinkage is a
# floor too low (Koren's Netflix values, 10 and 25 pseudo-ratings, halve most item biases of ML-100K's 1,682 movies).
BIAS_REGS = (1.0, 2.0, 3.0, 5.0, 10.0, 25.0)
EASE_L2 = (10.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
EASE_MAX_ITEMS = 8192  # EASE inverts an items x items matrix: catalogs larger than this get no EASE floor
EASE_MAX_CELLS = 50_000_000  # nor do logs whose dense users x items matrix would exceed this (200 MB of float32)


def interactions(user_rows: np.ndarray, item_rows: np.ndarray, num_users: int, num_items: int) -> np.ndarray:
  """The binary user x item matrix X (float32 [num_users, num_items]) of interaction rows (repeats count once)."""
  x = np.zeros((num_users, num_items), np.float32)
  x[_rows('user_rows', user_rows, num_users), _rows('item_rows', item_rows, num_items)] = 1.0
  return x


def gram(x: np.ndarray) -> np.ndarray:
  """X^T X in float64 [I, I]: the item co-occurrence counts EASE starts from (one for every l2)."""
  if x.shape[1] > EASE_MAX_ITEMS:
    raise ValueError(f'EASE inverts a {x.shape[1]} x {x.shape[1]} matrix; at most {EASE_MAX_ITEMS} items')
  return x.T.astype(np.float64) @ x.astype(np.float64)


def fit_ease(g: np.ndarray, l2: float) -> np.ndarray:
  """EASE (Steck 2019), the closed-form item-item model from the Gram matrix g = X^T X: B = argmin ||X - XB||^2 +
  l2 ||B||^2 with diag(B) = 0, i.e. P = (g + l2 I)^-1, B = -P / diag(P), diag(B) = 0. A user's scores are X_u B.
  float32 [I, I]."""
  if l2 <= 0:
    raise ValueError(f'EASE needs l2 > 0, got {l2}')
  num_items = g.shape[0]
  g = g + l2 * np.eye(num_items)
  p = np.linalg.inv(g)
  b = p / -np.diag(p)[None, :]
  b[np.diag_indices(num_items)] = 0.0
  return b.astype(np.float32)

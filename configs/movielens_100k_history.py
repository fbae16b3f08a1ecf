"""ML-100K with interaction-history features (SVD++-style implicit feedback), opt-in.

`user_history`: the items a user interacted with in training, pooled through the shared item-id table; `item_audience`:
the users who interacted with an item, pooled through the shared user-id table. Each example's own id is left out of
the pool (no label leak). Variants: `:both` (default), `:user`, `:item`.

On u1 (seed 0) both features improve every test column over the default config (README, "History features"), at
about 3x the training time on 2 CPU cores, which is why they are not on by default.
"""

from configs import movielens_100k
from mtl_rec import config as config_lib


def get_config(variant: str = 'both'):
  if variant not in ('both', 'user', 'item'):
    raise ValueError(f"unknown variant {variant!r} of movielens_100k_history; use ':both', ':user' or ':item'")
  c = movielens_100k.get_config()
  with c.unlocked():
    if variant in ('both', 'user'):
      c.features.user_history = config_lib.feature('user', kind='history', of='item_id', max_values=64)
    if variant in ('both', 'item'):
      c.features.item_audience = config_lib.feature('item', kind='history', of='user_id', max_values=64)
  return c

"""ML-100K with more or fewer interaction-history features than the default (SVD++-style implicit feedback).

The default (configs/movielens_100k.py) has two user histories pooled through the shared item-id table:
`user_history`, the 16 items a user interacted with last in training, and `user_liked`, the 32 items they rated 4
or more last (`where='rating >= 4'`). `item_audience`: the 32 users who interacted with an item last, pooled through
the shared user-id table. Each example's own id is left out of every pool (no label leak). Variants: `:both`
(default: adds `item_audience`), `:user` (the default's), `:implicit` (`user_history` of 32 alone: the default
before `user_liked`), `:item` (the audience instead of the user histories), `:none` (no history). README, "Model", has
what each gives.
"""

from configs import movielens_100k
from mtl_rec import config as config_lib
from mtl_rec import errors

VARIANTS = ('both', 'user', 'implicit', 'item', 'none')


def get_config(variant: str = 'both'):
  if variant not in VARIANTS:
    raise errors.ConfigError(f"unknown variant {variant!r} of movielens_100k_history; use one of "
                             f"{', '.join(':' + v for v in VARIANTS)}")
  c = movielens_100k.get_config()
  with c.unlocked():
    if variant in ('item', 'none'):
      del c.features['user_history']
    if variant in ('implicit', 'item', 'none'):
      del c.features['user_liked']
    if variant == 'implicit':
      c.features.user_history.max_values = 32
    if variant in ('both', 'item'):
      c.features.item_audience = config_lib.feature('item', kind='history', of='user_id', max_values=32)
  return c

"""Writes the worked example's data, examples/shop/{log,users,items}.csv, from mtl_rec's synthetic shop generator.

  python examples/make_shop_data.py [--out=examples/shop] [--users=2000] [--items=300] [--per_user=20] [--seed=0]

The tables are what a team's own export looks like: a click log with string ids, a timestamp, request context
(device, hour) and labels (add_to_cart 0/1, watch_fraction in [0, 1], a satisfaction survey answered on some rows),
a users table and an items table with side features (tags as a '|'-separated string). configs/shop.py declares them.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtl_rec.data import synthetic  # pylint: disable=wrong-import-position
from mtl_rec.data import write  # pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shop'))
  parser.add_argument('--users', type=int, default=2000)
  parser.add_argument('--items', type=int, default=300)
  parser.add_argument('--per_user', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  ds = synthetic.shop(args.users, args.items, args.per_user, seed=args.seed)
  for name, path in write.write_dataset(ds, args.out, 'csv').items():
    print(f'{name}: {path}')


if __name__ == '__main__':
  main()

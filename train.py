"""Trains the unified multi-task model and prints its test metrics.

  python train.py --workdir=runs/ml100k                                   # MovieLens-100K, the default
  python train.py --config=configs/synthetic.py --workdir=W --config.train.epochs=1

Re-running with the same --workdir resumes from its latest checkpoint. The logic lives in mtl_rec.train_lib.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from mtl_rec import distributed, train_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/movielens_100k.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/ml100k', 'Run directory: checkpoints, metrics, logs.')
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --workdir=DIR')
  logging.getLogger().setLevel(logging.INFO)
  distributed.initialize()
  try:
    result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # bad config values and data files: the message names the problem and the fix
    sys.exit(f'error: {e}')
  if 'test' in result and distributed.is_lead():
    print(f'\nTest metrics ({result["data"]["name"]}, {result["data"]["split"]} split, best step '
          f'{result["best_step"]}), written to {_WORKDIR.value}/metrics.json:')
    print(train_lib.format_table(result))


if __name__ == '__main__':
  app.run(main)

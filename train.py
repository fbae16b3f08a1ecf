"""Trains the unified multi-task model and prints its test metrics.

  python train.py --workdir=runs/ml100k                                   # MovieLens-100K, the default
  python train.py --config=configs/synthetic.py --workdir=W --config.train.epochs=1
  python train.py --config=configs/synthetic.py --workdir=W2 --init_from=W     # warm start from W's best weights
  python train.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I   # one of N processes

Re-running with the same --workdir resumes from its latest checkpoint. The logic lives in mtl_rec.train_lib.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from mtl_rec import distributed, train_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/movielens_100k.py', 'Experiment config file.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/ml100k', 'Run directory: checkpoints, metrics, logs.')
_INIT_FROM = flags.DEFINE_string(
    'init_from', None, 'Warm start: a finished run\'s workdir (or its checkpoints/latest/<step>) whose weights start '
    'this run; ids it knew keep their rows, new ids start fresh. Ignored when --workdir already has a checkpoint.')
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --workdir=DIR')
  logging.getLogger().setLevel(logging.WARNING)  # libraries (orbax, absl) log a lot at INFO
  logging.getLogger('mtl_rec').setLevel(logging.INFO)
  distributed.initialize()
  try:
    result = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _INIT_FROM.value)
  except ValueError as e:  # bad config values and data files: the message names the problem and the fix
    sys.exit(f'error: {e}')
  if 'test' in result and distributed.is_lead():
    print(f'\nTest metrics ({result["data"]["name"]}, {result["data"]["split"]} split, best step '
          f'{result["best_step"]}), written to {_WORKDIR.value}/metrics.json:')
    print(train_lib.format_table(result))


if __name__ == '__main__':
  app.run(main)

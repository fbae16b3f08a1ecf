"""Trains the unified multi-task model and prints its test metrics.

  python train.py --workdir=runs/ml100k                                   # MovieLens-100K, the default
  python train.py --config=configs/synthetic.py --workdir=W --config.train.epochs=1
  python train.py --config=configs/synthetic.py --workdir=W2 --init_from=W     # warm start from W's best weights
  python train.py ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I   # one of N processes

Re-running with the same --workdir resumes from its latest checkpoint. Training lives in mtl_rec.loop, the export
of its best checkpoint in mtl_rec.export.
"""

import logging

from absl import app, flags

from mtl_rec import checkpoint, distributed, errors, evaluation, export, files, loop

_CONFIG = errors.define_config_file('config', 'configs/movielens_100k.py', 'Experiment config file.')
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
  config = _CONFIG.value
  with errors.reported():  # bad config values and data files: one line naming the problem and the fix
    files.output_directory(_WORKDIR.value, '--workdir', create=False)  # created once the data is checked
    if _INIT_FROM.value:  # checked even when a resumed run ignores it: a typo is named, not silently passed over
      checkpoint.find_checkpoint(_INIT_FROM.value)
    result = loop.train_and_evaluate(config, _WORKDIR.value, _INIT_FROM.value)
    # Every process takes part (gathering sharded parameters is collective); process 0 writes W/export/<version>/.
    path = export.export_trained(result.run, _WORKDIR.value, result.metrics) if (
        result.run and config.export.enabled) else None
  m = result.metrics
  if 'test' in m and distributed.is_lead():
    if path:
      logging.getLogger('mtl_rec').info('exported the best checkpoint to %s', path)
    print(f'\nTest metrics ({m["data"]["name"]}, {m["data"]["split"]} split, best step {m["best_step"]}), written '
          f'to {_WORKDIR.value}/metrics.json:')
    print(evaluation.format_table(m, evaluation.headline_metrics(result.run.exp.specs, config.eval.k)))


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)

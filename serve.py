"""Serves an export directory over HTTP: /v1/score, /v1/recommend, the Open Inference Protocol v2 and /metrics.

  python serve.py --export_dir=runs/ml100k/export            # the newest version
  python serve.py --export_dir=runs/ml100k/export/3 --port=8600

Loads only the export (no model or training code). The logic lives in mtl_rec.serving.
"""

import logging

from absl import app, flags

from mtl_rec import errors
from mtl_rec.serving import app as serving_app

_D = serving_app.ServerOptions()
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'W/export (newest version) or one W/export/<version>.',
                                  required=True)
_HOST = flags.DEFINE_string('host', _D.host, 'Address to bind.')
_PORT = flags.DEFINE_integer('port', _D.port, 'Port to bind; 0 picks a free one (printed on the ready line).',
                             lower_bound=0, upper_bound=65535)
_MAX_BATCH_ROWS = flags.DEFINE_integer('max_batch_rows', _D.max_batch_rows, 'Rows merged into one model call.',
                                       lower_bound=1)
_MAX_WAIT_MS = flags.DEFINE_float('max_wait_ms', _D.max_wait_ms, 'Longest wait for a batch to fill, in ms.',
                                  lower_bound=0.0)
_MAX_RECOMMEND_USERS = flags.DEFINE_integer('max_recommend_users', _D.max_recommend_users,
                                            'Users merged into one recommend call.', lower_bound=1)
_MAX_ITEMS = flags.DEFINE_integer('max_items', _D.max_items, 'Items per /v1/score request, and new items per '
                                  '/v1/recommend request (those at most 256).', lower_bound=1)
_MAX_BODY_BYTES = flags.DEFINE_integer('max_body_bytes', _D.max_body_bytes, 'Larger request bodies get a 413.',
                                       lower_bound=1)
_MAX_QUEUED_ROWS = flags.DEFINE_integer('max_queued_rows', _D.max_queued_rows,
                                        'Rows waiting for the model beyond which requests get a 503 (retry later).',
                                        lower_bound=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --export_dir=DIR')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  options = serving_app.ServerOptions(
      host=_HOST.value, port=_PORT.value, max_batch_rows=_MAX_BATCH_ROWS.value, max_wait_ms=_MAX_WAIT_MS.value,
      max_recommend_users=_MAX_RECOMMEND_USERS.value, max_items=_MAX_ITEMS.value,
      max_body_bytes=_MAX_BODY_BYTES.value, max_queued_rows=_MAX_QUEUED_ROWS.value)
  with errors.reported():  # a bad --export_dir, a --host or --port it cannot listen on: one line naming it
    serving_app.serve(_EXPORT_DIR.value, options)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)

"""Shared test setup: simulated devices, the tiny config, and one trained + exported tiny run per session.

XLA_FLAGS must be set before jax is imported anywhere: the sharding tests run on 8 simulated CPU devices.
Tests marked `slow` (end-to-end training, subprocesses, servers) are skipped by `pytest -m "not slow"`.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One persistent compilation cache for the session and the subprocesses it starts (they inherit the environment):
# the many small runs compile the same programs, and a run compiles its train step twice (memory_report's AOT
# compile, then the jit's). Compiled programs are reused bit for bit; numbers do not change.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
  _JAX_CACHE = tempfile.mkdtemp(prefix='mtl_rec_test_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _JAX_CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
else:
  _JAX_CACHE = None

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import selectors  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import textwrap  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position
import urllib.error  # pylint: disable=g-import-not-at-top,wrong-import-position
import urllib.request  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a serving process must never import: the network, features, tasks, training, export, and their libraries.
BLOCKED_MODULES = ('mtl_rec.model', 'mtl_rec.trainer', 'mtl_rec.loop', 'mtl_rec.deterministic', 'mtl_rec.tasks',
                   'mtl_rec.features', 'mtl_rec.experiment', 'mtl_rec.scoring', 'mtl_rec.evaluation',
                   'mtl_rec.export', 'mtl_rec.fusion', 'mtl_rec.data', 'mtl_rec.input_pipeline', 'mtl_rec.checkpoint',
                   'mtl_rec.runs', 'flax', 'optax', 'orbax')


@pytest.fixture(scope='session')
def import_blocker():
  """Python source that makes importing any of BLOCKED_MODULES fail: the prefix of a serving subprocess."""
  return textwrap.dedent(f'''
      import importlib.abc, sys
      BLOCKED = {BLOCKED_MODULES!r}
      class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if any(name == b or name.startswith(b + '.') for b in BLOCKED):
            raise ImportError(f'{{name}} is blocked: serving must load the export only')
          return None
      sys.meta_path.insert(0, _Block())
  ''')


def make_tiny_config(**overrides):
  """configs/synthetic.py:tiny (seconds per run on one device), with `section__field=value` overrides."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  c = synthetic.get_config('tiny')
  for key, value in overrides.items():
    section, field = key.split('__')
    c[section][field] = value
  return c


@pytest.fixture(scope='session')
def tiny_config():
  """A factory: `tiny_config(train__epochs=2, ...)` returns a fresh configs/synthetic.py:tiny config."""
  return make_tiny_config


def exported_run_config():
  """The tiny run that the export and serving tests share: 200 users, a catalog of 120 items that `recommend`
  scores in 3 blocks of 48 (the running top-k path, padding included)."""
  c = make_tiny_config()
  c.data.synthetic.num_users = 200
  c.data.synthetic.num_items = 120
  c.data.synthetic.interactions_per_user = 10
  c.train.log_every_steps = 20
  c.export.max_k = 20
  c.export.chunk_items = 48
  from mtl_rec import config as config_lib  # pylint: disable=g-import-not-at-top
  with c.unlocked():  # a [users, L] input, as the default config's user history: served from the table or a request
    c.features.user_history = config_lib.feature('user', kind='history', of='item_id', max_values=8)
    c.features.user_liked = config_lib.feature('user', kind='history', of='item_id', max_values=8,
                                               where='rating >= 4')  # as the default's
  return c


def train_and_export(config, workdir):
  """(TrainResult, export version dir) of a run trained and exported the way train.py does it."""
  from mtl_rec import export, loop  # pylint: disable=g-import-not-at-top
  result = loop.train_and_evaluate(config, workdir)
  return result, export.export_trained(result.run, workdir, result.metrics)


@pytest.fixture(scope='session')
def exported_run(tmp_path_factory):
  """(workdir, TrainResult) of the tiny run, trained and exported once per session (W/export/1)."""
  workdir = str(tmp_path_factory.mktemp('tiny_exported_run'))
  return workdir, train_and_export(exported_run_config(), workdir)[0]


# serve.py in a subprocess and plain HTTP calls to it (the serving tests of several modules).


def start_server(export_dir, log_path, import_blocker, *flags):
  """serve.py in a subprocess on a free port, with the model and training modules blocked: (url, process)."""
  flags = [f'--export_dir={export_dir}', '--port=0', *flags]
  script = import_blocker + f'import runpy; sys.argv = {["serve.py", *flags]!r}; runpy.run_path("serve.py", ' \
                            'run_name="__main__")'
  with open(log_path, 'w') as log:
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
  sel = selectors.DefaultSelector()
  sel.register(proc.stdout, selectors.EVENT_READ)
  url, deadline = None, time.time() + 240
  while url is None and time.time() < deadline and proc.poll() is None:
    if sel.select(timeout=1.0):
      m = re.search(r'on (http://\S+)', proc.stdout.readline())
      url = m.group(1) if m else None
  if url is None:
    proc.kill()
    pytest.fail(f'serve.py did not become ready: {log_path.read_text()[-3000:]}')
  return url, proc


def stop_server(proc, log_path):
  proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
  assert 'Traceback' not in log_path.read_text()  # no request caused an unexpected error


def http(url, path, body=None, method=None, headers=None, raw=False):
  """(status, parsed JSON or raw bytes, headers)."""
  data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
  req = urllib.request.Request(url + path, data=data, method=method or ('POST' if data is not None else 'GET'),
                               headers={'Content-Type': 'application/json', **(headers or {})})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      status, content, hdrs = r.status, r.read(), dict(r.headers)
  except urllib.error.HTTPError as e:
    status, content, hdrs = e.code, e.read(), dict(e.headers)
  return status, (content if raw else json.loads(content)), hdrs


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _JAX_CACHE:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)

"""Unified multi-task network vs ensemble fusion: quality with error bars and cost, side by side, in one command.

  python -m mtl_rec.benchmark --config=configs/movielens_100k.py --seeds=3 --out=runs/bench
  python -m mtl_rec.benchmark --config=configs/synthetic.py --seeds=2 --out=/tmp/b --config.train.epochs=1

For every seed (config.seed = 0..N-1) it trains the unified model once per backbone (shared-bottom, MMoE, PLE) and
the ensemble (one single-task model per task, see mtl_rec.fusion) on the same split, evaluates every system the same
way, and writes OUT/report.md, OUT/report.json and OUT/{quality,cost,curves}.png. Runs live under OUT/seed<S>/;
re-running the command skips the runs that finished (their metrics.json exists), so an interrupted benchmark resumes.

Measured per system:
  quality   every test metric of metrics.json (the ensemble's: each member's own task metrics), and the fused
            ranking's full-catalog NDCG@10 with graded gains under fixed / learned / stacking fusion weights.
  cost      parameters (counted from the params pytrees), training wall time and examples/s, peak memory (peak RSS
            of each training run's own process, and XLA's memory analysis of the compiled train step), serving
            latency and throughput for one user x 100 candidates, all systems timed interleaved in one process.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_rec import benchmark_report as report_lib
from mtl_rec import capacity
from mtl_rec import config as config_lib
from mtl_rec import errors
from mtl_rec import export as export_lib
from mtl_rec import files
from mtl_rec import fusion
from mtl_rec import fusion_weights
from mtl_rec import loop
from mtl_rec import runs as runs_lib
from mtl_rec.experiment import Experiment
from mtl_rec.scoring import NetworkScorer
from mtl_rec.serving.loader import ExportedModel

log = logging.getLogger(__name__)

BACKBONES = config_lib.BACKBONES
RANKING_KEYS = ('recall@10', 'ndcg@10', 'ndcg@10_graded', 'hr@10_sampled', 'ndcg@10_sampled')


def unified_name(backbone: str) -> str:
  return f'unified_{backbone}'


# ---------------------------------------------------------------------------------------------------------------
# Training runs, optionally each in its own process (for its peak memory).


def train_child(config_path: str, workdir: str) -> None:
  """Entry point of the training subprocess: trains, then records the process's peak RSS beside metrics.json."""
  logging.getLogger().setLevel(logging.WARNING)
  with open(config_path) as f:
    config = config_lib.from_json(f.read())
  loop.train_and_evaluate(config, workdir)
  files.write_json(os.path.join(workdir, 'resources.json'), {'peak_rss_bytes': capacity.peak_rss_bytes()})


def _isolated_train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """train_and_evaluate in a fresh Python process (peak RSS is then that run's own); returns metrics.json."""
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'requested_config.json')
  with open(config_path, 'w') as f:
    f.write(config_lib.to_json(config))
  root = os.path.dirname(os.path.dirname(os.path.abspath(fusion.__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  code = 'import sys; from mtl_rec import benchmark; benchmark.train_child(sys.argv[1], sys.argv[2])'
  proc = subprocess.run([sys.executable, '-c', code, config_path, workdir], env=env, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'training {workdir} failed (exit {proc.returncode}); its output is above. Re-running the '
                       'benchmark resumes it')
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


def train_or_load(config: ml_collections.ConfigDict, workdir: str, isolate: bool) -> dict[str, Any]:
  done = os.path.join(workdir, 'metrics.json')
  if os.path.exists(done):  # finished in an earlier invocation
    with open(done) as f:
      return json.load(f)
  t = time.time()
  result = _isolated_train(config, workdir) if isolate else loop.train_and_evaluate(config, workdir).metrics
  print(f'  trained {workdir} in {time.time() - t:.0f}s', flush=True)
  return result


# ---------------------------------------------------------------------------------------------------------------
# Per-run cost from the run directory.


@dataclasses.dataclass
class RunCost:
  """Training cost of one run (one network)."""

  wall_time_sec: float  # train_and_evaluate end to end: data, compile, training, per-epoch validation, test eval
  batch_size: int
  examples_per_sec: float  # median over the logged intervals of history.jsonl (robust to the compile interval)
  steps: int
  step_device_bytes: int  # XLA memory analysis of the compiled train step: arguments + temporaries
  peak_rss_bytes: int | None  # the run's own process; None when not trained in a subprocess
  history: list[dict[str, Any]]


def run_cost(workdir: str, metrics: dict[str, Any]) -> RunCost:
  with open(os.path.join(workdir, 'config.json')) as f:
    batch = int(json.load(f)['train']['batch_size'])
  with open(os.path.join(workdir, 'history.jsonl')) as f:
    history = [json.loads(line) for line in f if line.strip()]
  eps = [r['examples_per_sec'] for r in history[1:]] or [r['examples_per_sec'] for r in history]
  mem = metrics.get('memory', {})
  rss_path = os.path.join(workdir, 'resources.json')
  rss = None
  if os.path.exists(rss_path):
    with open(rss_path) as f:
      rss = int(json.load(f)['peak_rss_bytes'])
  return RunCost(wall_time_sec=float(metrics['wall_time_sec']), batch_size=batch,
                 examples_per_sec=float(np.median(eps)) if eps else float('nan'), steps=int(metrics['steps']),
                 step_device_bytes=int(mem.get('step_argument_size_in_bytes', 0) + mem.get('step_temp_size_in_bytes', 0)),
                 peak_rss_bytes=rss, history=history)


def system_cost(costs: Sequence[RunCost], unified_batch: int, params: int) -> dict[str, Any]:
  """A system's training cost from its runs (one for unified, one per member for the ensemble).

  examples/s is per example of the unified stream (an observed pair or a sampled negative): the ensemble spends
  the sum of its members' step times on one unified batch's worth of data (each member takes as many steps per
  epoch as the unified model, see fusion.member_config), so its rate is unified_batch / sum(step times).
  """
  step_time = sum(c.batch_size / c.examples_per_sec for c in costs)
  rss = [c.peak_rss_bytes for c in costs if c.peak_rss_bytes is not None]
  return {'params': int(params), 'train_wall_time_sec': sum(c.wall_time_sec for c in costs),
          'train_examples_per_sec': unified_batch / step_time, 'train_step_time_ms': 1e3 * step_time,
          'steps': sum(c.steps for c in costs),
          'peak_rss_mb': max(rss) / 2**20 if len(rss) == len(costs) else None,
          'train_step_device_mb': sum(c.step_device_bytes for c in costs) / 2**20}


# ---------------------------------------------------------------------------------------------------------------
# Serving cost.


def export_system(name: str, scorer: NetworkScorer, exp: Experiment, config: ml_collections.ConfigDict,
                  weights: dict[str, float], export_root: str, metrics: dict[str, Any]) -> str:
  """Writes (or reuses) the system's export with mtl_rec.export: its networks fused behind one `score`; returns the
  version directory."""
  versions = [d for d in os.listdir(export_root) if d.isdigit()] if os.path.isdir(export_root) else []
  if versions:  # exported by an earlier invocation of the benchmark
    return os.path.join(export_root, max(versions, key=int))
  return export_lib.write_export(export_root, scorer.networks, export_lib.tables_from_experiment(exp), config,
                                 metrics=metrics, fusion_weights=weights, name=f'{config.name}_{name}',
                                 source={'system': name})


def time_serving(systems: dict[str, tuple[NetworkScorer, np.ndarray, str]], exp: Experiment, candidates: int = 100,
                 requests: int = 300, warmup: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
  """Latency/throughput of scoring one user x `candidates` items with each system, two ways.

  * `export`: the exported `score` artifact through the serving loader (mtl_rec.serving.loader.ExportedModel
    .score_rows: host-side feature gather and batch-bucket padding, the deserialized artifact, outputs back on the
    host) — what the serving binary does per request, minus HTTP.
  * `jit`: the system's fused scorer jitted in this process (no export, no padding), the model cost alone.
  The systems are timed interleaved (request r goes to every system before request r + 1, starting with a
  different system each time) so that load from other processes falls on all of them alike. Throughput is one
  request in flight at a time: requests/s = 1 / mean latency.
  """
  rng = np.random.default_rng([seed, 6])
  reqs = []
  for _ in range(requests + warmup):
    u = int(rng.integers(exp.num_users))
    items = rng.choice(exp.num_items, size=min(candidates, exp.num_items), replace=False)
    reqs.append((u, items))
  calls = {}
  for name, (scorer, weights, version_dir) in systems.items():
    cross = scorer.catalog_fn()
    w = jnp.asarray(weights, jnp.float32)
    jitted = jax.jit(lambda p, q, i, cross=cross, w=w: cross(p, q, i)[0] @ w)

    def jit_call(u, items, jitted=jitted, scorer=scorer):
      item = {n: v[items] for n, v in exp.encoder.item_table.items()}
      return np.asarray(jitted(scorer.params, scorer.query_features(np.asarray([u])), item))
    calls[(name, 'jit')] = jit_call
    model = ExportedModel(version_dir, max_batch_rows=max(candidates, 16))
    model_w = np.asarray(weights, np.float32)

    def export_call(u, items, model=model, model_w=model_w):
      n = items.shape[0]
      user = {k: np.repeat(model.user_table[k][u:u + 1], n, axis=0) for k in model.user_inputs}  # [n, ...]
      return model.score_rows(user, items, np.tile(model_w, (n, 1)))['score']
    calls[(name, 'export')] = export_call
  keys = list(calls)
  lat = {k: [] for k in keys}
  for r, (u, items) in enumerate(reqs):
    for j in range(len(keys)):
      key = keys[(r + j) % len(keys)]
      t = time.perf_counter()
      calls[key](u, items)
      if r >= warmup:
        lat[key].append(time.perf_counter() - t)
  out = {name: {} for name in systems}
  for (name, how), v in lat.items():
    v = np.asarray(v)
    prefix = '' if how == 'export' else 'jit_'
    out[name].update({f'{prefix}latency_ms_p50': 1e3 * float(np.percentile(v, 50)),
                      f'{prefix}latency_ms_p99': 1e3 * float(np.percentile(v, 99)),
                      f'{prefix}throughput_rps': float(1.0 / v.mean()),
                      f'{prefix}throughput_candidates_per_sec': float(candidates / v.mean())})
  return out


# ---------------------------------------------------------------------------------------------------------------
# The benchmark.


def system_configs(config: ml_collections.ConfigDict, seed: int, backbones: Sequence[str], ensemble_backbone: str,
                   max_epochs: int) -> dict[str, ml_collections.ConfigDict]:
  """{system: config} for one seed; the ensemble config is the one its members derive from."""
  out = {}
  for name, backbone in [(unified_name(b), b) for b in backbones] + [(report_lib.ENSEMBLE, ensemble_backbone)]:
    c = copy.deepcopy(config)
    c.seed = seed
    c.model.backbone = backbone
    c.train.progress_bar = False
    if 'export' in c:  # the benchmark exports each system itself (the ensemble as one artifact of all members)
      c.export.enabled = False
    if max_epochs:
      c.train.epochs = min(c.train.epochs, max_epochs)
    config_lib.validate(c)
    out[name] = c
  return out


def run_benchmark(config: ml_collections.ConfigDict, out: str, seeds: int = 3, backbones: Sequence[str] = BACKBONES,
                  ensemble_backbone: str = 'shared_bottom', max_epochs: int = 0, isolate: bool = True,
                  fusion_negatives: int = 200, serving_candidates: int = 100, serving_requests: int = 300,
                  plots: bool = True) -> dict[str, Any]:
  """Trains and evaluates every system for seeds 0..seeds-1; writes report.md/report.json/plots under `out`."""
  t_start = time.time()
  load_start = os.getloadavg()[0]
  config_lib.validate(config)
  if seeds < 1:
    raise errors.ConfigError(f'--seeds={seeds}: use at least 1 (3 gives error bars)')
  if fusion_negatives < 1:
    raise errors.ConfigError(f'--fusion_negatives={fusion_negatives}: the fusion fits rank each validation item '
                             'against sampled unrated items; use at least 1 (200 by default)')
  if serving_requests < 1:
    raise errors.ConfigError(f'--serving_requests={serving_requests}: the serving cost is timed over these '
                             'requests; use at least 1 (300 by default)')
  if max_epochs < 0:
    raise errors.ConfigError(f"--max_epochs={max_epochs}: a cap on the epochs of every run; use 0 (the config's) "
                             'or more')
  unknown = [b for b in backbones if b not in BACKBONES]
  if unknown or not backbones:
    raise errors.ConfigError(f'backbones {list(backbones)}: choose from {", ".join(BACKBONES)}')
  files.output_directory(out, '--out')
  names = [unified_name(b) for b in backbones] + [report_lib.ENSEMBLE]
  per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
  baselines: list[dict[str, Any]] = []
  serving = None
  for seed in range(seeds):
    configs = system_configs(config, seed, backbones, ensemble_backbone, max_epochs)
    seed_dir = os.path.join(out, f'seed{seed}')
    print(f'seed {seed}: training {", ".join(names)}', flush=True)
    scorers = {}
    for name in names:
      c, wd = configs[name], os.path.join(seed_dir, name)
      if name == report_lib.ENSEMBLE:
        ens = fusion.train_ensemble(c, wd, lambda mc, mwd: train_or_load(mc, mwd, isolate), fusion_negatives)
        scorer, exp, test, fused = ens.scorer, ens.exp, ens.summary['test'], ens.summary['fusion']
        costs = [run_cost(fusion.member_workdir(wd, t), ens.member_results[t]) for t, _ in config_lib.ordered(c.tasks)]
      else:
        metrics = train_or_load(c, wd, isolate)
        run = runs_lib.load(wd)
        exp = run.exp
        scorer = NetworkScorer([run.network], exp.encoder, c.eval.batch_size)
        test = metrics['test']
        fused = fusion_weights.evaluate_fusion(scorer, exp, c, fusion_negatives)
        costs = [run_cost(wd, metrics)]
        if name == names[0]:  # the baselines depend only on the split: take them from one run per seed
          baselines.append(metrics['baselines'])
      per_seed[name].append({'test': test, 'fusion': fused,
                             'cost': system_cost(costs, config.train.batch_size, scorer.num_params),
                             'curves': [cst.history for cst in costs],
                             'curve_tasks': [[t for t, _ in config_lib.ordered(c.tasks)]] if name != report_lib.ENSEMBLE else [[t] for t, _ in config_lib.ordered(c.tasks)]})
      if seed == 0:  # serving cost does not depend on the seed: export and time seed 0's systems
        weights = fused['weights']['learned']
        version_dir = export_system(name, scorer, exp, c, weights, os.path.join(out, 'exports', name), test)
        scorers[name] = (scorer, np.asarray([weights[t] for t in scorer.task_names]), version_dir)
    if seed == 0:
      print('timing serving', flush=True)
      serving = time_serving(scorers, exp, serving_candidates, serving_requests)
    del scorers
  report = report_lib.build_report(config, out, names, per_seed, baselines, serving, seeds, isolate, max_epochs,
                        time.time() - t_start)
  report['meta']['load_average'] = {'start': load_start, 'end': os.getloadavg()[0]}
  report['notes'] = report_lib.notes(report, config, isolate, max_epochs)
  if plots:
    report['plots'] = report_lib.write_plots(out, report, per_seed)
  report_lib.write_report(out, report)
  return report


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> Any:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return argparse.Namespace(
      config=errors.define_config_file('config', 'configs/movielens_100k.py', 'Experiment config file.'),
      out=flags.DEFINE_string('out', 'runs/benchmark', 'Output directory: runs, report.md, report.json, plots.'),
      seeds=flags.DEFINE_integer('seeds', 3, 'Seeds per system (config.seed = 0..N-1).'),
      backbones=flags.DEFINE_list('backbones', list(BACKBONES), 'Backbones of the unified model to benchmark.'),
      ensemble_backbone=flags.DEFINE_enum('ensemble_backbone', 'shared_bottom', list(BACKBONES),
                                          'Backbone of every single-task ensemble member.'),
      max_epochs=flags.DEFINE_integer('max_epochs', 0, "Cap on train.epochs for every run (0: the config's)."),
      isolate=flags.DEFINE_bool('isolate', True, 'Train each run in its own process (for its peak memory).'),
      fusion_negatives=flags.DEFINE_integer('fusion_negatives', 200,
                                            'Sampled unrated items per validation list for the fusion fits.'),
      serving_requests=flags.DEFINE_integer('serving_requests', 300, 'Timed requests per system.'),
      plots=flags.DEFINE_bool('plots', True, 'Write the PNG plots (needs matplotlib).'))


def main(argv: Sequence[str], f: Any) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --out=DIR')
  logging.getLogger().setLevel(logging.WARNING)
  with errors.reported():  # bad flags or config values: one line naming the problem and the fix
    report = run_benchmark(f.config.value, f.out.value, seeds=f.seeds.value, backbones=tuple(f.backbones.value),
                           ensemble_backbone=f.ensemble_backbone.value, max_epochs=f.max_epochs.value,
                           isolate=f.isolate.value, fusion_negatives=f.fusion_negatives.value,
                           serving_requests=f.serving_requests.value, plots=f.plots.value)
  print(f'\nwrote {os.path.join(f.out.value, "report.md")} ({report["meta"]["elapsed_sec"] / 60:.1f} min)\n')
  with open(os.path.join(f.out.value, 'report.md')) as fh:
    print(fh.read())


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS), flags_parser=errors.parse_flags)

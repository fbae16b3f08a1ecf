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
import math
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import fusion
from mtl_rec import train_lib

log = logging.getLogger(__name__)

BACKBONES = ('shared_bottom', 'mmoe', 'ple')
ENSEMBLE = 'ensemble'
# Target of the issue: unified <= 40% of the ensemble's parameters and >= 2.5x its serving throughput.
PARAMS_RATIO_TARGET = 0.40
THROUGHPUT_RATIO_TARGET = 2.5
RANKING_KEYS = ('recall@10', 'ndcg@10', 'ndcg@10_graded', 'hr@10_sampled', 'ndcg@10_sampled')


def unified_name(backbone: str) -> str:
  return f'unified_{backbone}'


def metric_mode(key: str) -> str:
  """'min' or 'max' for any metric key of metrics.json (config.METRIC_MODES knows only the early-stopping ones)."""
  if key in config_lib.METRIC_MODES:
    return config_lib.metric_mode(key)
  return 'min' if key.endswith(('_rmse', '_mae', '_logloss')) else 'max'


def _summary(values: Sequence[float | None]) -> dict[str, Any]:
  """mean and std over seeds (sample std, ddof=1; 0 for a single seed); None values (n/a) are left out."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return {'mean': None, 'std': None, 'n': 0, 'values': list(values)}
  return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if v.size > 1 else 0.0, 'n': int(v.size),
          'values': [None if x is None else float(x) for x in values]}


# ---------------------------------------------------------------------------------------------------------------
# Training runs, optionally each in its own process (for its peak memory).


def train_child(config_path: str, workdir: str) -> None:
  """Entry point of the training subprocess: trains, then records the process's peak RSS beside metrics.json."""
  logging.getLogger().setLevel(logging.WARNING)
  with open(config_path) as f:
    config = config_lib.from_json(f.read())
  train_lib.train_and_evaluate(config, workdir)
  # ru_maxrss is in KiB on Linux (bytes on macOS).
  scale = 1 if sys.platform == 'darwin' else 1024
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  with open(os.path.join(workdir, 'resources.json'), 'w') as f:
    json.dump({'peak_rss_bytes': int(peak)}, f)


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


def _train(config: ml_collections.ConfigDict, workdir: str, isolate: bool) -> dict[str, Any]:
  done = os.path.join(workdir, 'metrics.json')
  if os.path.exists(done):  # finished in an earlier invocation
    with open(done) as f:
      return json.load(f)
  t = time.time()
  result = _isolated_train(config, workdir) if isolate else train_lib.train_and_evaluate(config, workdir)
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


def export_system(name: str, scorer: fusion.TaskScorer, config: ml_collections.ConfigDict, weights: dict[str, float],
                  export_root: str, metrics: dict[str, Any]) -> str | None:
  """Writes (or reuses) the system's export with mtl_rec.export: one member per network, fused behind one `score`.

  Returns the version directory, or None when mtl_rec.export is not available (serving is then timed in-process).
  """
  try:
    from mtl_rec import export as export_lib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  versions = [d for d in os.listdir(export_root) if d.isdigit()] if os.path.isdir(export_root) else []
  if versions:  # exported by an earlier invocation of the benchmark
    return os.path.join(export_root, max(versions, key=int))
  members = [export_lib.Member(m.graphdef, m.params, m.specs,
                               name=m.specs[0].name if len(scorer.members) > 1 else 'unified')
             for m in scorer.members]
  return export_lib.write_export(export_root, members, scorer.exp, config, metrics=metrics, fusion_weights=weights,
                                 name=f'{config.name}_{name}', source={'system': name})


def time_serving(systems: dict[str, tuple[fusion.TaskScorer, np.ndarray, str | None]], candidates: int = 100,
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
  exp = next(iter(systems.values()))[0].exp
  rng = np.random.default_rng([seed, 6])
  reqs = []
  for _ in range(requests + warmup):
    u = int(rng.integers(exp.num_users))
    items = rng.choice(exp.num_items, size=min(candidates, exp.num_items), replace=False)
    reqs.append((u, items))
  calls = {}
  for name, (scorer, weights, version_dir) in systems.items():
    cross = scorer.cross_fn()
    w = jnp.asarray(weights, jnp.float32)
    jitted = jax.jit(lambda p, u, i, cross=cross, w=w: cross(p, u, i)[0] @ w)

    def jit_call(u, items, jitted=jitted, params=scorer.params):
      user = {n: v[[u]] for n, v in exp.encoder.user_table.items()}
      item = {n: v[items] for n, v in exp.encoder.item_table.items()}
      return np.asarray(jitted(params, user, item))
    calls[(name, 'jit')] = jit_call
    if version_dir is not None:
      from mtl_rec.serving.loader import ExportedModel  # pylint: disable=g-import-not-at-top
      model = ExportedModel(version_dir, max_batch_rows=max(candidates, 16))
      model_w = np.asarray(weights, np.float32)

      def export_call(u, items, model=model, model_w=model_w):
        n = items.shape[0]
        user = {k: np.repeat(model.user_table[k][u:u + 1], n) for k in model.user_inputs}
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
    prefix = '' if how == 'export' or (name, 'export') not in calls else 'jit_'
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
  for name, backbone in [(unified_name(b), b) for b in backbones] + [(ENSEMBLE, ensemble_backbone)]:
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
    raise ValueError(f'--seeds={seeds}: use at least 1 (3 gives error bars)')
  unknown = [b for b in backbones if b not in BACKBONES]
  if unknown or not backbones:
    raise ValueError(f'backbones {list(backbones)}: choose from {", ".join(BACKBONES)}')
  os.makedirs(out, exist_ok=True)
  names = [unified_name(b) for b in backbones] + [ENSEMBLE]
  per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
  baselines: list[dict[str, Any]] = []
  serving, serving_method = None, 'jit'
  for seed in range(seeds):
    configs = system_configs(config, seed, backbones, ensemble_backbone, max_epochs)
    seed_dir = os.path.join(out, f'seed{seed}')
    print(f'seed {seed}: training {", ".join(names)}', flush=True)
    scorers = {}
    for name in names:
      c, wd = configs[name], os.path.join(seed_dir, name)
      if name == ENSEMBLE:
        ens = fusion.train_ensemble(c, wd, lambda mc, mwd: _train(mc, mwd, isolate), fusion_negatives)
        scorer, test, fused = ens.scorer, ens.summary['test'], ens.summary['fusion']
        costs = [run_cost(fusion.member_workdir(wd, t), ens.member_results[t]) for t in c.tasks]
      else:
        metrics = _train(c, wd, isolate)
        member, exp = fusion.load_member(wd)
        scorer = fusion.TaskScorer([member], exp)
        test = metrics['test']
        fused = fusion.evaluate_fusion(scorer, c, fusion_negatives)
        costs = [run_cost(wd, metrics)]
        if name == names[0]:  # the baselines depend only on the split: take them from one run per seed
          baselines.append(metrics['baselines'])
      per_seed[name].append({'test': test, 'fusion': fused,
                             'cost': system_cost(costs, config.train.batch_size, scorer.num_params),
                             'curves': [cst.history for cst in costs],
                             'curve_tasks': [list(c.tasks)] if name != ENSEMBLE else [[t] for t in c.tasks]})
      if seed == 0:  # serving cost does not depend on the seed: export and time seed 0's systems
        weights = fused['weights']['learned']
        version_dir = export_system(name, scorer, c, weights, os.path.join(out, 'exports', name), test)
        scorers[name] = (scorer, np.asarray([weights[t] for t in scorer.task_names]), version_dir)
    if seed == 0:
      print('timing serving', flush=True)
      serving = time_serving(scorers, serving_candidates, serving_requests)
      serving_method = 'export' if all(v[2] for v in scorers.values()) else 'jit'
    del scorers
  report = build_report(config, out, names, per_seed, baselines, serving, seeds, isolate, max_epochs,
                        time.time() - t_start)
  report['meta']['serving_method'] = serving_method
  report['meta']['load_average'] = {'start': load_start, 'end': os.getloadavg()[0]}
  report['notes'] = _notes(report, config, isolate, max_epochs)
  if plots:
    report['plots'] = write_plots(out, report, per_seed)
  write_report(out, report)
  return report


def _quality_table(names: Sequence[str], per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  keys = [k for k in train_lib.REQUIRED_METRICS if all(k in r['test'] for n in names for r in per_seed[n])]
  extra = sorted({k for n in names for r in per_seed[n] for k in r['test']} - set(keys))
  keys += [k for k in extra if all(k in r['test'] for n in names for r in per_seed[n])]
  return {k: {n: _summary([r['test'][k] for r in per_seed[n]]) for n in names} for k in keys}


def _within(u: dict[str, Any], e: dict[str, Any], mode: str) -> bool:
  """Unified matches or beats the ensemble within the error bars: better mean, or a gap <= std_u + std_e."""
  if u['mean'] is None or e['mean'] is None:
    return False
  better = u['mean'] <= e['mean'] if mode == 'min' else u['mean'] >= e['mean']
  return better or abs(u['mean'] - e['mean']) <= u['std'] + e['std']


def build_report(config: ml_collections.ConfigDict, out: str, names: Sequence[str],
                 per_seed: dict[str, list[dict[str, Any]]], baselines: list[dict[str, Any]],
                 serving: dict[str, dict[str, float]], seeds: int, isolate: bool, max_epochs: int,
                 elapsed: float) -> dict[str, Any]:
  """report.json's content (see write_report for the markdown rendering)."""
  per_task = _quality_table(names, per_seed)
  methods = fusion.FUSION_METHODS
  fused = {n: {m: {'test': {k: _summary([r['fusion']['test'][m][k] for r in per_seed[n]])
                            for k in per_seed[n][0]['fusion']['test'][m]},
                   'valid_ndcg@10_graded': _summary([r['fusion']['valid'][m]['ndcg@10_graded'] for r in per_seed[n]]),
                   'weights': [r['fusion']['weights'][m] for r in per_seed[n]]}
               for m in methods} for n in names}
  base = {b: {k: _summary([s[b][k] for s in baselines]) for k in baselines[0][b]} for b in baselines[0]}
  cost = {}
  for n in names:
    cost[n] = {k: _summary([r['cost'][k] for r in per_seed[n]]) for k in per_seed[n][0]['cost']}
    cost[n].update({k: {'mean': v, 'std': 0.0, 'n': 1, 'values': [v]} for k, v in serving[n].items()})
  ens = ENSEMBLE
  targets = {}
  for n in names:
    if n == ens:
      continue
    quality = {k: _within(per_task[k][n], per_task[k][ens], metric_mode(k)) for k in per_task}
    quality.update({f'fused_ndcg@10_graded_{m}': _within(fused[n][m]['test']['ndcg@10_graded'],
                                                          fused[ens][m]['test']['ndcg@10_graded'], 'max')
                    for m in methods})
    params_ratio = cost[n]['params']['mean'] / cost[ens]['params']['mean']
    tput_ratio = cost[n]['throughput_rps']['mean'] / cost[ens]['throughput_rps']['mean']
    targets[n] = {'quality_within_error_bars': quality, 'all_quality': all(quality.values()),
                  'params_ratio': params_ratio, 'params_met': params_ratio <= PARAMS_RATIO_TARGET,
                  'throughput_ratio': tput_ratio, 'throughput_met': tput_ratio >= THROUGHPUT_RATIO_TARGET}
    targets[n]['met'] = targets[n]['all_quality'] and targets[n]['params_met'] and targets[n]['throughput_met']
  first = per_seed[names[0]][0]
  return {
      'meta': {'config': config.name, 'data': config.data.source, 'split': config.data.split, 'seeds': seeds,
               'systems': list(names), 'max_epochs': max_epochs or int(config.train.epochs),
               'elapsed_sec': elapsed, 'machine': f'{platform.machine()}, {os.cpu_count()} CPUs, '
                                                   f'jax {jax.__version__} on {jax.default_backend()}',
               'serving_method': 'jit', 'isolated_training': isolate, 'fusion_tasks': first['fusion']['tasks'],
               'out': out},
      'per_task': per_task,
      'fused_ranking': fused,
      'cost': cost,
      'baselines': base,
      'targets': targets,
      'notes': [],
  }


def _notes(report: dict[str, Any], config: ml_collections.ConfigDict, isolate: bool, max_epochs: int) -> list[str]:
  """What a reader needs to interpret the numbers: how things were measured and what was capped."""
  load = report['meta']['load_average']
  notes = [f'Timings share the machine with whatever else ran: the 1-minute load average was {load["start"]:.1f} at '
           f'the start and {load["end"]:.1f} at the end on {os.cpu_count()} CPUs; serving numbers are interleaved '
           'across systems, so ratios are more trustworthy than absolute values.']
  if report['meta']['serving_method'] == 'export':
    notes.append('Serving latency/throughput: each system exported with mtl_rec.export (the ensemble as one export '
                 'of its members, the same `score` interface as the unified model) and called through '
                 'mtl_rec.serving.loader.ExportedModel.score_rows with 1 user x 100 candidates (padded to the '
                 'serving batch bucket), no HTTP. Exports are under OUT/exports/.')
  else:
    notes.append('Serving latency/throughput were measured on jitted fused scoring functions in this process: '
                 'mtl_rec.export was not importable.')
  notes.append('Peak memory: ' + ('ru_maxrss of each training subprocess (JAX runtime and data included, so it '
                                  'mostly measures the process, not the model); ' if isolate else
                                  'training ran in-process (--isolate=false), so peak RSS was not measured; ') +
               'the XLA row is the compiled train step\'s arguments + temporaries, summed over the ensemble\'s '
               'members.')
  neg = config.sampling.num_negatives
  notes.append(f'Ensemble members for tasks defined on observed pairs only (like, rating) train without sampled '
               f'negatives on batches of batch_size / (1 + {neg}) observed rows: the same steps per epoch and the '
               'same labels per step as the unified model, without computing rows their loss would mask out.')
  if max_epochs:
    notes.append(f'Epochs were capped at {max_epochs} by --max_epochs (the config says {config.train.epochs}).')
  return notes


# ---------------------------------------------------------------------------------------------------------------
# Rendering.


def _fmt(s: dict[str, Any] | None, digits: int = 4) -> str:
  if s is None or s.get('mean') is None:
    return 'n/a'
  if s['n'] > 1:
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'
  return f'{s["mean"]:.{digits}f}'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  return '\n'.join(lines)


COST_ROWS = (  # (key, label, digits)
    ('params', 'total parameters', 0),
    ('train_wall_time_sec', 'training wall time (s, whole run)', 1),
    ('train_examples_per_sec', 'training examples/s', 0),
    ('train_step_time_ms', 'train step time (ms per unified batch)', 2),
    ('latency_ms_p50', 'serving latency p50 (ms, 1 user x 100 items)', 3),
    ('latency_ms_p99', 'serving latency p99 (ms)', 3),
    ('throughput_rps', 'serving throughput (requests/s)', 0),
    ('throughput_candidates_per_sec', 'serving throughput (candidates/s)', 0),
    ('jit_latency_ms_p50', 'in-process jitted scorer latency p50 (ms, no export)', 3),
    ('jit_throughput_rps', 'in-process jitted scorer throughput (requests/s, no export)', 0),
    ('peak_rss_mb', 'peak memory: training process RSS (MB)', 0),
    ('train_step_device_mb', 'peak memory: train-step arguments + temporaries (MB, XLA)', 2),
)


def render_markdown(report: dict[str, Any]) -> str:
  """report.md from report.json's content."""
  meta, names = report['meta'], report['meta']['systems']
  ens = ENSEMBLE
  out = [f'# Unified multi-task model vs ensemble fusion — {meta["config"]}', '',
         f'Data `{meta["data"]}`, split `{meta["split"]}`, {meta["seeds"]} seed(s) (config.seed = 0..'
         f'{meta["seeds"] - 1}), at most {meta["max_epochs"]} epochs with early stopping. Every cell is mean ± std '
         f'over seeds (sample std). Machine: {meta["machine"]}; benchmark wall time {meta["elapsed_sec"] / 60:.1f} '
         'min. Systems: ' + ', '.join(f'`{n}`' for n in names) + '; the ensemble has one single-task model per task '
         '(tasks: ' + ', '.join(meta['fusion_tasks']) + ').', '']
  base_names = list(report['baselines'])
  out += ['## Per-task test metrics', '',
          'The keys of metrics.json on the test split. Ensemble: each member\'s own task metrics; its ranking rows '
          '(recall/ndcg) come from the member of `eval.ranking_task`. Baselines (same split): ' +
          ', '.join(base_names) + '.', '']
  rows = []
  for k, cells in report['per_task'].items():
    rows.append([f'`{k}`'] + [_fmt(cells[n]) for n in names] +
                [_fmt(report['baselines'][b].get(k)) for b in base_names])
  out += [_table(['metric'] + names + base_names, rows), '']

  out += ['## Fused ranking quality', '',
          'Full-catalog NDCG@10 with graded gains (the held-out rating), ranking every item the user has not rated '
          'in train or validation by the fused score Σ w_t s_t (s = probability for click/like, (rating − 1)/4 for '
          'rating). Weights: **fixed** = config fusion_weight, **learned** = ListNet on validation lists, '
          '**stacking** = logistic meta-model on validation outputs; the same three fits for every system (the '
          'unified model fuses its own heads).', '']
  rows = []
  for n in names:
    for m in fusion.FUSION_METHODS:
      f = report['fused_ranking'][n][m]
      w = f['weights'][0]
      rows.append([f'`{n}`', m, _fmt(f['test']['ndcg@10_graded']), _fmt(f['test']['recall@10']),
                   _fmt(f['valid_ndcg@10_graded']), ', '.join(f'{t} {v:+.2f}' for t, v in w.items())])
  for b in base_names:
    if 'ndcg@10_graded' in report['baselines'][b]:
      rows.append([f'{b} (baseline)', '—', _fmt(report['baselines'][b]['ndcg@10_graded']),
                   _fmt(report['baselines'][b].get('recall@10')), '', ''])
  out += [_table(['system', 'fusion', 'test ndcg@10_graded', 'test recall@10', 'valid ndcg@10_graded',
                  'weights (seed 0, Σ|w| = 1)'], rows), '']

  serving_how = ('the exported `score` artifacts (mtl_rec.export, loaded by mtl_rec.serving.loader, fused with '
                 'the learned weights; the in-process jitted scorers are shown too)'
                 if meta['serving_method'] == 'export' else
                 'jitted fused scoring functions in this process (the export module was not available)')
  out += ['## Cost', '',
          f'Measured side by side in one run. Serving: {serving_how}, one user x 100 candidates per request, one '
          'request in flight, systems interleaved. Training examples/s counts rows of the unified stream (observed '
          'pairs and sampled negatives); the ensemble spends the sum of its members\' step times on them. Peak RSS is '
          'that of each training run\'s own process (the ensemble: its largest member), JAX runtime included.', '']
  rows = []
  for key, label, digits in COST_ROWS:
    cells = [_fmt(report['cost'][n].get(key), digits) for n in names]
    e = report['cost'][ens].get(key, {}).get('mean')
    ratios = []
    for n in names[:-1]:
      u = report['cost'][n].get(key, {}).get('mean')
      ratios.append(f'{u / e:.2f}' if u is not None and e else 'n/a')
    rows.append([label] + cells + [' / '.join(ratios)])
  out += [_table(['cost'] + names + ['unified ÷ ensemble'], rows), '']

  out += ['## Baselines', '', 'Non-learned floors on the same test split (from the unified runs\' metrics.json).', '']
  keys = sorted({k for b in base_names for k in report['baselines'][b]})
  out += [_table(['metric'] + base_names,
                 [[f'`{k}`'] + [_fmt(report['baselines'][b].get(k)) for b in base_names] for k in keys]), '']

  out += ['## Targets', '',
          f'Target: the unified model matches or beats the ensemble on every task within the error bars (better '
          f'mean, or a gap no larger than the sum of the two stds), with ≤ {PARAMS_RATIO_TARGET:.0%} of its '
          f'parameters and ≥ {THROUGHPUT_RATIO_TARGET}× its serving throughput.', '']
  rows = []
  for n, t in report['targets'].items():
    missed = [k for k, ok in t['quality_within_error_bars'].items() if not ok]
    rows.append([f'`{n}`', 'yes' if t['all_quality'] else 'no: ' + ', '.join(f'`{k}`' for k in missed),
                 f'{t["params_ratio"]:.2f} ({"met" if t["params_met"] else "missed"})',
                 f'{t["throughput_ratio"]:.2f}× ({"met" if t["throughput_met"] else "missed"})',
                 '**met**' if t['met'] else '**not met**'])
  out += [_table(['system', 'quality within error bars', 'params ÷ ensemble', 'throughput ÷ ensemble', 'all targets'],
                 rows), '']

  out += ['## Plots', '']
  for key, title in (('quality', 'Quality per task'), ('cost', 'Cost'), ('curves', 'Training curves')):
    if report.get('plots', {}).get(key):
      out += [f'![{title}]({os.path.basename(report["plots"][key])})', '']
  if not report.get('plots'):
    out += ['(plots were not written)', '']
  out += ['## Notes', '']
  out += [f'- {n}' for n in report['notes']] or ['- none']
  return '\n'.join(out) + '\n'


def write_report(out: str, report: dict[str, Any]) -> None:
  with open(os.path.join(out, 'report.json'), 'w') as f:
    json.dump(report, f, indent=2, sort_keys=False, default=fusion._jsonable)  # pylint: disable=protected-access
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(render_markdown(report))


def write_plots(out: str, report: dict[str, Any], per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
  """quality.png (metrics with error bars), cost.png (cost bars), curves.png (seed 0 training losses per task)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = report['meta']['systems']
  colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
  paths = {}

  panels = [(k, report['per_task'][k]) for k in report['per_task']
            if k in train_lib.REQUIRED_METRICS or k == 'ndcg@10_graded']
  panels += [(f'fused ndcg@10_graded ({m})', {n: report['fused_ranking'][n][m]['test']['ndcg@10_graded']
                                              for n in names}) for m in fusion.FUSION_METHODS]
  paths['quality'] = _bar_grid(plt, panels, names, colors, os.path.join(out, 'quality.png'),
                               'Test quality per task (mean ± std over seeds)')
  cost_panels = [(label, {n: report['cost'][n].get(key) for n in names}) for key, label, _ in COST_ROWS
                 if all(report['cost'][n].get(key, {}).get('mean') is not None for n in names)]
  paths['cost'] = _bar_grid(plt, cost_panels, names, colors, os.path.join(out, 'cost.png'), 'Cost')

  tasks = report['meta']['fusion_tasks']
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for n in names:
      run = per_seed[n][0]
      for hist, run_tasks in zip(run['curves'], run['curve_tasks']):
        if task in run_tasks:
          pts = [(r['step'], r[f'loss_{task}']) for r in hist if f'loss_{task}' in r]
          if pts:
            ax.plot(*zip(*pts), label=n, color=colors[n])
    ax.set_title(f'training loss: {task}')
    ax.set_xlabel('step')
    ax.legend(fontsize=7)
  fig.suptitle('Training curves (seed 0)')
  fig.tight_layout()
  paths['curves'] = os.path.join(out, 'curves.png')
  fig.savefig(paths['curves'], dpi=110)
  plt.close(fig)
  return paths


def _bar_grid(plt, panels, names, colors, path: str, title: str) -> str:
  cols = min(4, max(1, len(panels)))
  rows = max(1, math.ceil(len(panels) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis('off')
  for ax, (label, cells) in zip(axes.flat, panels):
    means = [cells[n]['mean'] if cells[n] and cells[n]['mean'] is not None else 0.0 for n in names]
    stds = [cells[n]['std'] if cells[n] and cells[n]['std'] is not None else 0.0 for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[colors[n] for n in names])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace('unified_', 'u:') for n in names], rotation=30, ha='right', fontsize=7)
    ax.set_title(label, fontsize=8)
    lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
    if lo > 0 and (hi - lo) < 0.2 * hi:  # small differences: zoom in instead of starting at 0
      pad = 0.5 * (hi - lo) + 1e-9
      ax.set_ylim(lo - pad, hi + pad)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> Any:
  """The command-line flags (defined only when run as a program, so importing this module defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  return argparse.Namespace(
      config=config_flags.DEFINE_config_file('config', 'configs/movielens_100k.py', 'Experiment config file.'),
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
  try:
    report = run_benchmark(f.config.value, f.out.value, seeds=f.seeds.value, backbones=tuple(f.backbones.value),
                           ensemble_backbone=f.ensemble_backbone.value, max_epochs=f.max_epochs.value,
                           isolate=f.isolate.value, fusion_negatives=f.fusion_negatives.value,
                           serving_requests=f.serving_requests.value, plots=f.plots.value)
  except ValueError as e:  # bad flags or config values: the message names the problem and the fix
    sys.exit(f'error: {e}')
  print(f'\nwrote {os.path.join(f.out.value, "report.md")} ({report["meta"]["elapsed_sec"] / 60:.1f} min)\n')
  with open(os.path.join(f.out.value, 'report.md')) as fh:
    print(fh.read())


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _FLAGS = _define_flags()
  app.run(lambda argv: main(argv, _FLAGS))

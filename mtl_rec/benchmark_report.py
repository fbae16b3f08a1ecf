"""The unified-vs-fusion benchmark's report: per-seed results -> report.json (summaries, targets, notes), report.md
and PNG plots. `mtl_rec.benchmark` runs the systems and measures them; this module only aggregates and renders."""

from __future__ import annotations

import math
import os
import platform
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import files
from mtl_rec import fusion_weights

ENSEMBLE = 'ensemble'
# Target of the issue: unified <= 40% of the ensemble's parameters and >= 2.5x its serving throughput.
PARAMS_RATIO_TARGET = 0.40
THROUGHPUT_RATIO_TARGET = 2.5


def metric_mode(key: str) -> str:
  """'min' or 'max' for any metric key of metrics.json."""
  return config_lib.metric_mode(key)


def summary(values: Sequence[float | None]) -> dict[str, Any]:
  """mean and std over seeds (sample std, ddof=1; 0 for a single seed); None values (n/a) are left out."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return {'mean': None, 'std': None, 'n': 0, 'values': list(values)}
  return {'mean': float(v.mean()), 'std': float(v.std(ddof=1)) if v.size > 1 else 0.0, 'n': int(v.size),
          'values': [None if x is None else float(x) for x in values]}


def _quality_table(names: Sequence[str], per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  first = per_seed[names[0]][0]['test']  # the unified run's order: each task's metrics, then ranking
  keys = [k for k in first if all(k in r['test'] for n in names for r in per_seed[n])]
  return {k: {n: summary([r['test'][k] for r in per_seed[n]]) for n in names} for k in keys}


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
  methods = fusion_weights.FUSION_METHODS
  fused = {n: {m: {'test': {k: summary([r['fusion']['test'][m][k] for r in per_seed[n]])
                            for k in per_seed[n][0]['fusion']['test'][m]},
                   'valid_ndcg@10_graded': summary([r['fusion']['valid'][m]['ndcg@10_graded'] for r in per_seed[n]]),
                   'weights': [r['fusion']['weights'][m] for r in per_seed[n]]}
               for m in methods} for n in names}
  base = {b: {k: summary([s[b][k] for s in baselines]) for k in baselines[0][b]} for b in baselines[0]}
  cost = {}
  for n in names:
    cost[n] = {k: summary([r['cost'][k] for r in per_seed[n]]) for k in per_seed[n][0]['cost']}
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
               'serving_method': 'export', 'isolated_training': isolate, 'fusion_tasks': first['fusion']['tasks'],
               'out': out},
      'per_task': per_task,
      'fused_ranking': fused,
      'cost': cost,
      'baselines': base,
      'targets': targets,
      'notes': [],
  }


def notes(report: dict[str, Any], config: ml_collections.ConfigDict, isolate: bool, max_epochs: int) -> list[str]:
  """What a reader needs to interpret the numbers: how things were measured and what was capped."""
  load = report['meta']['load_average']
  notes = [f'Timings share the machine with whatever else ran: the 1-minute load average was {load["start"]:.1f} at '
           f'the start and {load["end"]:.1f} at the end on {os.cpu_count()} CPUs; serving numbers are interleaved '
           'across systems, so ratios are more trustworthy than absolute values.']
  notes.append('Serving latency/throughput: each system exported with mtl_rec.export (the ensemble as one export '
               'of its members, the same `score` interface as the unified model) and called through '
               'mtl_rec.serving.loader.ExportedModel.score_rows with 1 user x 100 candidates (padded to the '
               'serving batch bucket), no HTTP. Exports are under OUT/exports/.')
  notes.append('Peak memory: ' + ('the peak resident memory (VmHWM) of each training subprocess (JAX runtime '
                                  'and data included, so it mostly measures the process, not the model); '
                                  if isolate else
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


def fmt_summary(s: dict[str, Any] | None, digits: int = 4) -> str:
  if s is None or s.get('mean') is None:
    return 'n/a'
  if s['n'] > 1:
    return f'{s["mean"]:.{digits}f} ± {s["std"]:.{digits}f}'
  return f'{s["mean"]:.{digits}f}'


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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
    rows.append([f'`{k}`'] + [fmt_summary(cells[n]) for n in names] +
                [fmt_summary(report['baselines'][b].get(k)) for b in base_names])
  out += [markdown_table(['metric'] + names + base_names, rows), '']

  out += ['## Fused ranking quality', '',
          'Full-catalog NDCG@10 with graded gains (the held-out rating), ranking every item the user has not rated '
          'in train or validation by the fused score Σ w_t s_t (s = probability for click/like, (rating − 1)/4 for '
          'rating). Weights: **fixed** = config fusion_weight, **learned** = ListNet on validation lists, '
          '**stacking** = logistic meta-model on validation outputs; the same three fits for every system (the '
          'unified model fuses its own heads).', '']
  rows = []
  for n in names:
    for m in fusion_weights.FUSION_METHODS:
      f = report['fused_ranking'][n][m]
      w = f['weights'][0]
      rows.append([f'`{n}`', m, fmt_summary(f['test']['ndcg@10_graded']), fmt_summary(f['test']['recall@10']),
                   fmt_summary(f['valid_ndcg@10_graded']), ', '.join(f'{t} {v:+.2f}' for t, v in w.items())])
  for b in base_names:
    if 'ndcg@10_graded' in report['baselines'][b]:
      rows.append([f'{b} (baseline)', '—', fmt_summary(report['baselines'][b]['ndcg@10_graded']),
                   fmt_summary(report['baselines'][b].get('recall@10')), '', ''])
  out += [markdown_table(['system', 'fusion', 'test ndcg@10_graded', 'test recall@10', 'valid ndcg@10_graded',
                  'weights (seed 0, Σ|w| = 1)'], rows), '']

  serving_how = ('the exported `score` artifacts (mtl_rec.export, loaded by mtl_rec.serving.loader, fused with '
                 'the learned weights; the in-process jitted scorers are shown too)')
  out += ['## Cost', '',
          f'Measured side by side in one run. Serving: {serving_how}, one user x 100 candidates per request, one '
          'request in flight, systems interleaved. Training examples/s counts rows of the unified stream (observed '
          'pairs and sampled negatives); the ensemble spends the sum of its members\' step times on them. Peak RSS is '
          'that of each training run\'s own process (the ensemble: its largest member), JAX runtime included.', '']
  rows = []
  for key, label, digits in COST_ROWS:
    cells = [fmt_summary(report['cost'][n].get(key), digits) for n in names]
    e = report['cost'][ens].get(key, {}).get('mean')
    ratios = []
    for n in names[:-1]:
      u = report['cost'][n].get(key, {}).get('mean')
      ratios.append(f'{u / e:.2f}' if u is not None and e else 'n/a')
    rows.append([label] + cells + [' / '.join(ratios)])
  out += [markdown_table(['cost'] + names + ['unified ÷ ensemble'], rows), '']

  out += ['## Baselines', '', 'Non-learned floors on the same test split (from the unified runs\' metrics.json).', '']
  keys = sorted({k for b in base_names for k in report['baselines'][b]})
  out += [markdown_table(['metric'] + base_names,
                 [[f'`{k}`'] + [fmt_summary(report['baselines'][b].get(k)) for b in base_names] for k in keys]), '']

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
  out += [markdown_table(['system', 'quality within error bars', 'params ÷ ensemble', 'throughput ÷ ensemble', 'all targets'],
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
  files.write_json(os.path.join(out, 'report.json'), report, sort_keys=False)
  files.write_text(os.path.join(out, 'report.md'), render_markdown(report))


def write_plots(out: str, report: dict[str, Any], per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
  """quality.png (metrics with error bars), cost.png (cost bars), curves.png (seed 0 training losses per task)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = report['meta']['systems']
  colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
  paths = {}

  panels = [(k, report['per_task'][k]) for k in report['per_task']
            if not k.startswith(('hit@', 'precision@'))]
  panels += [(f'fused ndcg@10_graded ({m})', {n: report['fused_ranking'][n][m]['test']['ndcg@10_graded']
                                              for n in names}) for m in fusion_weights.FUSION_METHODS]
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



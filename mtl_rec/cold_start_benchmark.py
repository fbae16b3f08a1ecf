"""Cold start: what an item's content features buy when no one has interacted with it yet.

  python -m mtl_rec.cold_start_benchmark --out=runs/cold_start                  # ML-100K, 10% of items cold, 3 seeds
  python -m mtl_rec.cold_start_benchmark --config=configs/shop.py --out=W --cold_items=0.2 --seeds=2

Holds out a seeded share of the items entirely (`data.cold_items`: their training rows move to validation, so the
model never trains on them) and trains the config's model once per variant and seed:
  'ids only'                the item's id is its only feature (a cold item is the out-of-vocabulary row: no content);
  'ids + <some features>'   where the config has text or vector item features beside others: those alone, and the
                            others alone;
  'ids + <every feature>'   the config as it is.
Each run's metrics.json reports the held-out rows of the cold and of the warm items apart ('test_cold_start': AUC
against negatives sampled among the same part's items, Recall/NDCG@K ranking only that part's items), beside
popularity on the same items. The report (report.json, report.md) gives mean ± std over seeds. Finished runs are
reused: re-running with the same --out only trains what is missing.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from typing import Any, Sequence

import ml_collections

from mtl_rec import config as config_lib
from mtl_rec import errors
from mtl_rec import files
from mtl_rec.benchmark import train_or_load
from mtl_rec.benchmark_report import fmt_summary, markdown_table, summary

def variants(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """{variant name: the item features it drops}: ids only; for each text or vector kind among several item
  features, the ids with those alone and the ids with all but those; every item feature."""
  ids = {config.data.log.item_column, config.data.item_table.id_column}
  item = [(n, f) for n, f in config_lib.ordered(config.features) if f.entity == 'item']
  # an item's audience (kind 'history') is not content: a cold item has none
  content = [n for n, f in item if config_lib.feature_column(n, f) not in ids and f.kind != 'history']
  if not content:
    raise errors.ConfigError('the config declares no item feature besides the id: nothing to compare. Declare the '
                             "items' content (config.feature('item', 'title', kind='text', ...))")
  name = lambda kept: 'ids + ' + ', '.join(kept)
  out = {'ids only': content}
  for kind in ('text', 'vector'):
    of_kind = [n for n, f in item if f.kind == kind]
    others = [n for n in content if n not in of_kind]
    if of_kind and others:
      out[name(others)] = of_kind
      out[name(of_kind)] = others
  out[name(content)] = []
  return out


def run_config(config: ml_collections.ConfigDict, drop: Sequence[str], seed: int,
               cold_items: float) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  with c.unlocked():
    for name in drop:
      del c.features[name]
  c.seed = seed
  c.data.cold_items = cold_items
  c.export.enabled = False
  c.train.progress_bar = False
  config_lib.validate(c)
  return c


def build_report(per_run: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """{'variants': {name: {part: {metric: summary}}}, 'popularity': {part: {metric: summary}}} over seeds."""
  def summarize(runs, get):
    parts = get(runs[0])
    return {p: {k: summary([get(r)[p].get(k) for r in runs]) for k in parts[p]} for p in parts}
  first = next(iter(per_run.values()))
  return {'variants': {n: summarize(runs, lambda r: r['test_cold_start']) for n, runs in per_run.items()},
          'popularity': summarize(first, lambda r: r['baselines_cold_start']['popularity']),
          'seeds': len(first)}


def render_markdown(report: dict[str, Any], config: ml_collections.ConfigDict) -> str:
  """One table per part (cold items, warm items): a row per metric, a column per variant and popularity."""
  names = list(report['variants'])
  out = [f'# Cold start: {config.name}, {config.data.cold_items:.0%} of the items cold, {report["seeds"]} seed(s), '
         'mean ± std', '']
  for part, rows in report['variants'][names[0]].items():
    pop = report['popularity'].get(part, {})
    out += [f'## {part.replace("_", " ")}', '',
            markdown_table(['metric'] + names + ['popularity'],
                           [[f'`{k}`'] + [fmt_summary(report['variants'][n][part].get(k)) for n in names] +
                            [fmt_summary(pop.get(k))] for k in rows]), '']
  return '\n'.join(out)


def run(config: ml_collections.ConfigDict, out: str, seeds: int, cold_items: float) -> dict[str, Any]:
  if seeds < 1:
    raise errors.ConfigError(f'--seeds={seeds}: train at least one seed per variant')
  if not 0 < cold_items < 1:
    raise errors.ConfigError(f'--cold_items={cold_items}: the share of items held out must be in (0, 1), e.g. 0.1')
  per_run = {}
  for name, drop in variants(config).items():
    print(f'{name}: ' + (f'without {", ".join(drop)}' if drop else 'every declared feature'), flush=True)
    per_run[name] = [train_or_load(run_config(config, drop, seed, cold_items),
                                   os.path.join(out, re.sub(r'\W+', '_', name), f'seed{seed}'), isolate=False)
                     for seed in range(seeds)]
  report = build_report(per_run)
  report['config'] = {'name': config.name, 'cold_items': cold_items, 'variants': variants(config)}
  config = copy.deepcopy(config)
  config.data.cold_items = cold_items
  files.write_json(os.path.join(out, 'report.json'), report)
  files.write_text(os.path.join(out, 'report.md'), render_markdown(report, config))
  return report


def main(argv: Sequence[str]) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --out=DIR')
  logging.getLogger().setLevel(logging.WARNING)
  with errors.reported():  # bad flags or config values: one line naming the problem and the fix
    run(_FLAGS['config'].value, _FLAGS['out'].value, _FLAGS['seeds'].value, _FLAGS['cold_items'].value)
  with open(os.path.join(_FLAGS['out'].value, 'report.md')) as f:
    print('\n' + f.read())


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  _FLAGS = {
      'config': errors.define_config_file('config', 'configs/movielens_100k.py', 'Experiment config file.'),
      'out': flags.DEFINE_string('out', 'runs/cold_start', 'Output directory: runs, report.json, report.md.'),
      'seeds': flags.DEFINE_integer('seeds', 3, 'Seeds per variant (config.seed = 0..N-1).'),
      'cold_items': flags.DEFINE_float('cold_items', 0.1, 'Share of the items held out entirely (data.cold_items).'),
  }
  app.run(main, flags_parser=errors.parse_flags)

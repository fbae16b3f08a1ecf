"""The ensemble-fusion baseline: one single-task model per task, their scores fused into one ranking score.

The classic alternative to the unified network: for every task of `config.tasks` a separate model with the same
features and the same backbone/tower sizes but its own embeddings, trained by `loop.train_and_evaluate` on the
same split and seed (`member_config` says exactly what changes). Both systems rank items by one fused score

  score(u, i) = sum_t w_t * s_t(u, i),   s_t = p_t for binary heads,
                                         (value - lo) / (hi - lo) for regression and multiclass heads (the
                                         predicted or expected value on the task's scale, e.g. 1-5 stars),

so every task score lives in [0, 1] and the weights are comparable. The unified model fuses its own heads, the
ensemble its members' heads: a `scoring.NetworkScorer` of one network or of one per task hides the difference, as
mtl_rec.export does for serving.

Fusion weights (fixed, learned, stacking) are fitted on the validation split by mtl_rec.fusion_weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Callable

import ml_collections

from mtl_rec import config as config_lib
from mtl_rec import errors
from mtl_rec import files
from mtl_rec import fusion_weights
from mtl_rec import loop
from mtl_rec import runs as runs_lib
from mtl_rec import scoring
from mtl_rec import trainer as trainer_lib
from mtl_rec.experiment import Experiment
from mtl_rec.scoring import Network, NetworkScorer

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------------------------
# Members: one single-task run per task.


def early_stopping_metric(name: str, t: ml_collections.ConfigDict) -> str:
  """The validation metric a single-task member early-stops on: its AUC (binary, thresholded multiclass), class
  accuracy (multiclass) or RMSE (regression)."""
  if t.kind == 'regression':
    return f'{name}_rmse'
  return f'{name}_class_accuracy' if t.kind == 'multiclass' and t.threshold is None else f'{name}_auc'


def member_config(config: ml_collections.ConfigDict, task: str) -> ml_collections.ConfigDict:
  """The config of the ensemble member for `task`: the same experiment reduced to that one task.

  Same data, split, seed, features, model sizes and optimizer. What changes, and why:
    * `tasks` holds only `task`, with loss weight 1; `eval.ranking_task` and `train.early_stopping_metric` name it.
    * ESMM (which couples two tasks) and uncertainty weighting (one task has nothing to balance) are off,
      and so is the end-of-training export (the ensemble exports as one artifact, see benchmark.export_system).
    * A member whose task is defined on observed rows only (like, rating) trains on observed rows: no sampled
      negatives, and a batch of batch_size / (1 + num_negatives) rows, i.e. the observed rows of a unified batch.
      It then takes as many steps per epoch as the unified model and sees the same labels per step, without
      spending compute on rows its loss masks out.
  """
  if task not in config.tasks:
    raise ValueError(f"no task '{task}' in config.tasks ({', '.join(config.tasks)})")
  c = copy.deepcopy(config)
  t = copy.deepcopy(config.tasks[task])
  t.weight = 1.0
  with c.unlocked():
    c.tasks = ml_collections.ConfigDict({task: t})
  c.name = f'{config.name}_{task}'
  c.eval.ranking_task = task
  c.train.early_stopping_metric = early_stopping_metric(task, t)
  c.model.esmm = False
  c.model.loss_weighting = 'static'
  if 'export' in c:  # a member alone serves nothing: the ensemble is exported as one artifact of all members
    c.export.enabled = False
  if not t.rows == 'all' and config.sampling.num_negatives > 0:
    c.sampling.num_negatives = 0
    multiple = trainer_lib.batch_multiple(config)
    rows = config.train.batch_size // (1 + config.sampling.num_negatives)
    c.train.batch_size = max(multiple, rows - rows % multiple)
  config_lib.validate(c)
  return c


def member_workdir(workdir: str, task: str) -> str:
  return os.path.join(workdir, f'member_{task}')


# ---------------------------------------------------------------------------------------------------------------
# The ensemble end to end.


def train_members(config: ml_collections.ConfigDict, workdir: str,
                  train_fn: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None
                  ) -> dict[str, dict[str, Any]]:
  """Trains one member per task (or resumes/skips finished ones) and returns {task: its metrics.json}.

  `train_fn(config, workdir) -> metrics.json's content` defaults to `loop.train_and_evaluate`; the benchmark passes
  one that runs it in a subprocess to measure peak memory.
  """
  train_fn = train_fn or (lambda c, wd: loop.train_and_evaluate(c, wd).metrics)
  results = {}
  for task, _ in config_lib.ordered(config.tasks):
    wd = member_workdir(workdir, task)
    done = os.path.join(wd, 'metrics.json')
    if os.path.exists(done):  # finished earlier: training again would only resume to the same result
      results[task] = files.read_json(done)
      continue
    log.info('ensemble member %s -> %s', task, wd)
    results[task] = train_fn(member_config(config, task), wd)
  return results


def load_members(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[Network], Experiment]:
  """The trained members (best checkpoints), each named by its task, and one experiment that evaluates them all
  (their data, features and evaluation sets agree)."""
  members, exp = [], None
  for task, _ in config_lib.ordered(config.tasks):
    run = runs_lib.load(member_workdir(workdir, task), exp=exp)
    if exp is not None and run.exp is not exp:
      raise errors.Error(f'member {task} was trained on other data, features or another seed; retrain {workdir}')
    members.append(dataclasses.replace(run.network, name=task))
    exp = run.exp
  return members, exp


def member_test_metrics(config: ml_collections.ConfigDict, results: dict[str, dict[str, Any]]) -> dict[str, float]:
  """The ensemble's per-task test metrics: each member's own task metrics, ranking metrics from the member of
  `config.eval.ranking_task` (the same keys as a unified run's metrics.json)."""
  out = {}
  for task, r in results.items():
    out.update({k: v for k, v in r['test'].items() if k.startswith(f'{task}_')})
  ranking = results[config_lib.ranking_task(config)]['test']
  out.update({k: v for k, v in ranking.items() if '@' in k})
  return out


@dataclasses.dataclass
class EnsembleRun:
  """A trained and evaluated ensemble: `summary` is ensemble.json's content; `scorer` serves its fused scores."""

  summary: dict[str, Any]
  scorer: NetworkScorer
  exp: Experiment
  member_results: dict[str, dict[str, Any]]  # {task: the member's metrics.json}


def train_ensemble(config: ml_collections.ConfigDict, workdir: str,
                   train_fn: Callable[[ml_collections.ConfigDict, str], dict[str, Any]] | None = None,
                   num_negatives: int = 200) -> EnsembleRun:
  """Trains the members, fits the fusion weights on validation, evaluates; writes `workdir/ensemble.json`.

  ensemble.json: {'test': per-task test metrics (member_test_metrics), 'members': {task: workdir, params,
  wall_time_sec, best_step}, 'params': total, 'fusion': fusion_weights.evaluate_fusion's result}.
  """
  config_lib.validate(config)
  results = train_members(config, workdir, train_fn)
  members, exp = load_members(config, workdir)
  scorer = NetworkScorer(members, exp.encoder, config.eval.batch_size)
  summary = {
      'test': member_test_metrics(config, results),
      'members': {t: {'workdir': member_workdir(workdir, t), 'params': scoring.count_params(m.params),
                      'wall_time_sec': results[t].get('wall_time_sec'), 'best_step': results[t].get('best_step')}
                  for t, m in zip(config.tasks, members)},
      'params': scorer.num_params,
      'fusion': fusion_weights.evaluate_fusion(scorer, exp, config, num_negatives),
  }
  files.write_json(os.path.join(workdir, 'ensemble.json'), summary)
  return EnsembleRun(summary, scorer, exp, results)


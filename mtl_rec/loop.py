"""`train_and_evaluate(config, workdir)`: the training loop, from data to the evaluated best checkpoint.

The loop reads top to bottom: build the experiment and the trainer, start (fresh, resumed or warm-started), then
epochs of steps with periodic actions (logging, checkpointing, the preemption check), validation and early stopping
at each epoch end, and finally the best checkpoint evaluated on validation and test. It returns the run; exporting it
is the caller's business (train.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtl_rec import config as config_lib
from mtl_rec import distributed
from mtl_rec import errors
from mtl_rec import evaluation
from mtl_rec import experiment as experiment_lib
from mtl_rec import files
from mtl_rec import fusion_weights
from mtl_rec import sharding as sharding_lib
from mtl_rec import trainer as trainer_lib
from mtl_rec import warm_start
from mtl_rec.checkpoint import Checkpointer
from mtl_rec.data import splits as splits_lib
from mtl_rec.runs import Run
from mtl_rec.scoring import Network, NetworkScorer

log = logging.getLogger(__name__)


COMBINED_FLOOR = 0.01  # 'combined': relative improvements are over max(|first value|, this)


@dataclasses.dataclass
class EarlyStopping:
  """Model selection and early stopping on one validation metric, evaluated at every epoch end.

  The metric 'combined' weighs several metrics (`components`) alike: its value is the mean of their relative
  improvements over their first evaluated values (`reference`), sign-corrected so that higher is better.
  """

  metric: str
  mode: str  # 'min' or 'max': which direction is better
  patience: int  # epochs without improvement before stopping; 0 = never stop early
  components: tuple[str, ...] = ()  # 'combined': the metrics it weighs
  reference: dict[str, float] | None = None  # 'combined': their first evaluated values
  best_value: float | None = None
  best_step: int | None = None
  bad_epochs: int = 0
  evaluated_epochs: int = 0
  stopped: bool = False

  STATE = ('best_value', 'best_step', 'bad_epochs', 'evaluated_epochs', 'stopped', 'reference')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'EarlyStopping':
    metric = config_lib.early_stopping_metric(config)
    if metric == config_lib.COMBINED:
      return cls(metric, 'max', int(config.train.patience), tuple(config_lib.combined_metrics(config)))
    return cls(metric, config_lib.metric_mode(metric), int(config.train.patience))

  @property
  def needed(self) -> tuple[str, ...]:
    """The validation metrics the criterion reads."""
    return self.components or (self.metric,)

  def value(self, valid: dict[str, float]) -> float:
    """The criterion's value for a validation's metrics (the first call of 'combined' sets its reference: 0)."""
    if not self.components:
      return float(valid[self.metric])
    if self.reference is None:
      self.reference = {m: float(valid[m]) for m in self.components}
    sign = lambda m: -1.0 if config_lib.metric_mode(m) == 'min' else 1.0
    # a reference near 0 (Recall@K after one epoch on a small set) would make one metric outweigh all others
    return float(np.mean([sign(m) * (valid[m] - self.reference[m]) / max(abs(self.reference[m]), COMBINED_FLOOR)
                          for m in self.components]))

  def update(self, value: float, step: int, epoch: int) -> bool:
    """Records epoch `epoch`'s (0-based) validation value at `step`; True if it is the best so far."""
    improved = self.best_value is None or (value < self.best_value if self.mode == 'min' else value > self.best_value)
    if improved:
      self.best_value, self.best_step, self.bad_epochs = float(value), step, 0
    else:
      self.bad_epochs += 1
    self.evaluated_epochs = epoch + 1
    if self.patience and self.bad_epochs >= self.patience:
      self.stopped = True
    return improved

  def state(self) -> dict[str, Any]:
    """What a checkpoint stores (JSON)."""
    return {k: getattr(self, k) for k in self.STATE}

  def restore(self, state: dict[str, Any]) -> None:
    for k in self.STATE:
      if k in state:
        setattr(self, k, state[k])


class Preemption:
  """SIGTERM (how preemption arrives) sets a flag; the loop saves a checkpoint and exits cleanly."""

  def __init__(self):
    self.requested = False  # this process got SIGTERM
    self.stop = False  # every process agreed to stop after the current step
    self._previous = None

  def check(self, sync_point: bool) -> bool:
    """Whether to stop now. With several processes the flags are combined only at sync points (which every process
    reaches at the same step): a process that stopped alone would leave the others hanging in a collective."""
    if jax.process_count() == 1:
      self.stop = self.requested
    elif sync_point and not self.stop:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.stop = bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
    return self.stop

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Writer:
  """history.jsonl + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = distributed.is_lead()
    self.history_path = os.path.join(workdir, 'history.jsonl')
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.history_path):  # drop entries past the checkpoint we resume from
      with open(self.history_path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      files.write_text(self.history_path, ''.join(kept))
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def scalars(self, step: int, values: dict[str, float], prefix: str = '', history: bool = False) -> None:
    if not self.enabled:
      return
    for k, v in values.items():
      self.tb.add_scalar(f'{prefix}{k}', v, step)
    if history:
      with open(self.history_path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class ReportProgress:
  """Periodic action: every `every_steps` steps and at each epoch end, the mean of the steps' metrics since the
  last report (summed on the device, fetched only then) goes to history.jsonl, TensorBoard and the progress bar."""

  def __init__(self, every_steps: int, steps_per_epoch: int, batch_size: int, writer: Writer, pbar: Any):
    self.every_steps, self.steps_per_epoch, self.batch_size = every_steps, steps_per_epoch, batch_size
    self.writer, self.pbar = writer, pbar
    self.sums, self.n = None, 0
    self.restart_clock()

  def restart_clock(self) -> None:
    """examples/s measures training: the clock restarts after evaluation."""
    self.t = time.time()

  def state(self) -> dict[str, Any]:
    """The steps summed since the last report (checkpoint meta): a resumed run's next report averages the same
    steps as an uninterrupted run's, those before the checkpoint included."""
    sums = {} if self.n == 0 else {k: float(v) for k, v in jax.device_get(self.sums).items()}
    return {'n': self.n, 'sums': sums}

  def restore(self, state: dict[str, Any] | None) -> None:
    if state and state['n']:  # float32 sums, exactly as they were on the device
      self.sums = {k: jnp.float32(v) for k, v in state['sums'].items()}
      self.n = int(state['n'])

  def __call__(self, step: int, epoch: int, metrics: dict[str, jax.Array]) -> None:
    self.sums = metrics if self.n == 0 else jax.tree.map(jnp.add, self.sums, metrics)
    self.n += 1
    if step % self.every_steps == 0 or step % self.steps_per_epoch == 0:
      values = {k: float(v) / self.n for k, v in jax.device_get(self.sums).items()}
      values['examples_per_sec'] = self.n * self.batch_size / max(time.time() - self.t, 1e-9)
      values['epoch'] = epoch
      self.writer.scalars(step, values, 'train/', history=True)
      if self.pbar is not None:
        self.pbar.set_postfix(loss=f'{values["loss"]:.4f}', ex_s=f'{values["examples_per_sec"]:,.0f}')
      self.n = 0
      self.restart_clock()
    if self.pbar is not None:
      self.pbar.update(1)


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: metrics.json's content, and the run (best parameters, on the mesh) unless
  the run was preempted (then metrics is {'preempted': True, 'step': S})."""

  metrics: dict[str, Any]
  run: Run | None


def network_scorer(trainer: trainer_lib.Trainer, exp: experiment_lib.Experiment, params: Any) -> NetworkScorer:
  """The scorer of the model being trained: its parameters on the mesh, predicted by the trainer's eval step."""
  return NetworkScorer([Network(trainer.graphdef, params, exp.specs)], exp.encoder, exp.config.eval.batch_size,
                       trainer.batch_sharding, predict=lambda params, batch: trainer.eval_step(params[0], batch))


def _start(trainer: trainer_lib.Trainer, exp: experiment_lib.Experiment, ckpt: Checkpointer,
           stopping: EarlyStopping, init_from: str | None) -> tuple[Any, dict[str, Any]]:
  """(the state to train from, its checkpoint's meta): the latest checkpoint (resume), else a warm start from
  `init_from`, else fresh (meta {})."""
  state, meta = trainer.init_state, {}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    _check_resumable(exp.config, meta.get('config'), int(state['step']), ckpt)
    stopping.restore(meta)
    log.info('resumed from checkpoint at step %d', int(state['step']))
  elif init_from:  # only a fresh run warm-starts: a resumed one continues from its own checkpoint
    params = warm_start.init_from_checkpoint(init_from, state['params'], trainer.state_shardings['params'],
                                             exp.encoder)
    state = {**state, 'params': params}
    if 'ema' in state:  # the average starts from the warm-started parameters, not the random ones
      state['ema'] = trainer_lib.copy_params(params, trainer.state_shardings['params'])
  return state, meta


# What a run is, beyond its model's shapes (which the checkpoint's restore checks): a rerun in its workdir with
# another value of these would continue (or re-evaluate and re-export) the checkpoint's weights with other data,
# vocabularies, splits or losses. The rest may change on a resume: how long to train (train.epochs,
# schedule_epochs), logging and checkpoint cadence, the mesh, evaluation and export settings, reader threads.
RUN_DEFINING = ('seed', 'data', 'features', 'tasks', 'sampling', 'model', 'optimizer', 'train.batch_size',
                'train.grad_groups', 'train.ema_decay', 'train.early_stopping_metric')
RESUME_FREE = ('data.stream.threads', 'data.stream.prefetch')


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  return {k: v for key, value in tree.items() for k, v in _flat(value, f'{prefix}.{key}' if prefix else key).items()}


def _check_resumable(config: ml_collections.ConfigDict, saved: dict[str, Any] | None, step: int,
                     ckpt: Checkpointer) -> None:
  """A ConfigError naming the fields where `config` differs from the config the checkpoint at `step` was trained
  with (RUN_DEFINING), before anything in the workdir is rewritten."""
  if saved is None:
    return
  def flat(tree: dict[str, Any]) -> dict[str, Any]:
    out = _flat(json.loads(json.dumps(tree, default=str)))
    for section in ('features', 'tasks'):  # `position` counts declarations process-wide: only their order counts
      names = sorted((v, k.split('.')[1]) for k, v in out.items() if k.startswith(section + '.') and
                     k.endswith('.position'))
      out = {k: v for k, v in out.items() if not (k.startswith(section + '.') and k.endswith('.position'))}
      out[f'{section} (their order)'] = [name for _, name in names]
    return out
  now, then = flat(config.to_dict()), flat(saved)
  defaults = flat(config_lib.base_config().to_dict())
  old = lambda k: then[k] if k in then else defaults.get(k)  # a field newer than the checkpoint: its default then
  defining = lambda k: (any(k == p or k.startswith(p + '.') or k.startswith(p + ' ') for p in RUN_DEFINING) and
                        not any(k == p or k.startswith(p + '.') for p in RESUME_FREE))
  changed = sorted(k for k in set(now) | set(then) if defining(k) and now.get(k) != old(k))
  if changed:
    shown = '; '.join(f'config.{k} is {now.get(k)!r} here, {old(k)!r} there' for k in changed[:3])
    more = f' (and {len(changed) - 3} more)' if len(changed) > 3 else ''
    raise errors.ConfigError(
        f'this workdir holds a run trained with another config (checkpoint at step {step} under '
        f'{os.path.dirname(str(ckpt.latest.directory))}): {shown}{more}. Resuming would continue or re-export its '
        'weights with other data, features or losses: train in a new --workdir, or rerun with the config that run '
        'was trained with (its config.json)')


def _resumed_input(exp: experiment_lib.Experiment, ckpt: Checkpointer, step: int, spe: int) -> Any:
  """The streaming reader restored from the checkpoint at `step` (Grain's handler), checked against the step."""
  epoch = step // spe
  batches = ckpt.restore_input(step, exp.stream.epoch(epoch, step % spe))
  if batches is None:
    log.warning('the checkpoint at step %d has no reader state: the stream restarts from its step', step)
    return None
  if batches.epoch * spe + batches.batch != step:
    raise errors.Error(f'the checkpoint at step {step} holds the reader at epoch {batches.epoch}, batch '
                       f'{batches.batch}, which is not that step ({spe} steps an epoch): the data changed since the '
                       'checkpoint; resume with the same files and config, or start a new workdir')
  log.info('reader resumed at epoch %d, batch %d', batches.epoch, batches.batch)
  return batches


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, init_from: str | None = None) -> TrainResult:
  """Trains with early stopping on validation, evaluates the best checkpoint on test, writes the run directory.

  Re-running with the same workdir resumes from the latest checkpoint. `init_from` (a run's workdir or one of its
  checkpoint step directories) warm-starts a fresh run from trained weights (see warm_start).
  """
  config_lib.validate(config)
  t0 = time.time()
  exp = experiment_lib.build(config, workdir=workdir)  # every data check passes before anything is trained
  ds = exp.data
  n = exp.counts
  log.info('data: %s (%s): %d log rows, %d users, %d items; split %s: train %d / valid %d / test %d%s (%.1fs)',
           ds.name, ds.source, n.get('log', ds.num_rows), exp.num_users, exp.num_items, config.data.split,
           n['train'], n['valid'], n['test'], f'; held in memory: {n["sampled"]}' if 'sampled' in n else '',
           time.time() - t0)
  spe = exp.stream.steps_per_epoch
  total_steps = spe * config.train.epochs
  schedule_steps = spe * (config.train.schedule_epochs or config.train.epochs)
  trainer = trainer_lib.make_trainer(config, exp.encoder.specs, exp.specs, schedule_steps)
  ckpt = Checkpointer(workdir, config.train.keep_checkpoints)
  stopping = EarlyStopping.from_config(config)
  state, meta = _start(trainer, exp, ckpt, stopping, init_from)
  start_step = int(state['step'])

  # Only now, with the config checked against any checkpoint already in workdir (a resumed run's model must fit
  # it), the run's description is (re)written: a rerun that fails those checks leaves a finished run as it was.
  os.makedirs(workdir, exist_ok=True)
  lead = distributed.is_lead()
  if lead:
    files.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
    labels = [s.label for s in exp.specs if not s.implicit]
    columns = [ds.user_column, ds.item_column] + list(dict.fromkeys(labels)) + (
        [ds.timestamp_column] if ds.timestamp_column else [])
    if 'sampled' not in exp.counts:  # a streamed log is not written again
      splits_lib.write_csv(ds, exp.split, columns, os.path.join(workdir, 'splits'))
  warm_start.save_features(exp.encoder, workdir)

  streaming = getattr(exp.stream, 'local', False)  # data.reader='stream': each process reads its own rows
  example = next(exp.stream.epoch(0))  # global shapes (a streamed batch holds this process's rows only)
  if streaming and jax.process_count() > 1:
    example = jax.tree.map(lambda x: np.concatenate([x] * jax.process_count()), example)
  report = trainer_lib.memory_report(trainer, state, example)
  log.info('mesh %s; memory: %s', dict(trainer.mesh.shape), report)
  if lead:
    print(f'mesh {dict(trainer.mesh.shape)}  params/device {max(report["params_bytes_per_device"].values()):,} B  '
          f'opt state/device {max(report["opt_state_bytes_per_device"].values()):,} B  '
          f'step temp {report.get("step_temp_size_in_bytes", 0):,} B', flush=True)

  writer = Writer(workdir, start_step)
  pbar = None
  if lead and config.train.progress_bar:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    pbar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True)
  progress = ReportProgress(config.train.log_every_steps, spe, config.train.batch_size, writer, pbar)
  progress.restore(meta.get('progress'))
  place = sharding_lib.local_batch if streaming else sharding_lib.global_batch
  # the reader's position, saved beside the state: where the next batch starts
  save = lambda step, state, best=False: ckpt.save(step, state, {**stopping.state(), 'config': config.to_dict(),
                                                                  'progress': progress.state()},
                                                   best=best,
                                                   input_state=exp.stream.state_at(step) if streaming else None)

  step, preempted = start_step, False
  resumed = _resumed_input(exp, ckpt, start_step, spe) if streaming and start_step else None
  with Preemption() as preemption:
    for epoch in range(step // spe, config.train.epochs):
      if stopping.stopped:
        break
      if resumed is not None and resumed.epoch == epoch:  # the reader as the checkpoint left it
        batches = resumed
      else:
        batches = exp.stream.epoch(epoch, start_step=step - epoch * spe)
      resumed = None
      for batch in batches:
        state, metrics = trainer.train_step(state, place(batch, trainer.batch_sharding))
        step += 1
        progress(step, epoch, metrics)
        if step % config.train.checkpoint_every_steps == 0 and step % spe:  # epoch ends save below
          save(step, state)
        if preemption.check(sync_point=step % config.train.log_every_steps == 0):
          break
      if preemption.stop and step % spe:
        preempted = True
        break
      # End of epoch: validate, early-stopping bookkeeping, checkpoint (latest, and best if improved).
      scorer = network_scorer(trainer, exp, trainer_lib.model_params(state))
      valid = evaluation.pointwise_metrics(scorer, exp, exp.valid)
      if any(m not in valid for m in stopping.needed):
        valid.update(evaluation.ranking_metrics(scorer, scorer.weights(config_lib.ranking_task(config)), exp,
                                                exp.split.valid, exp.split.train))
      value = stopping.value(valid)
      writer.scalars(step, {**valid, **({stopping.metric: value} if stopping.components else {})}, 'valid/')
      improved = stopping.update(value, step, epoch)
      log.info('epoch %d step %d: valid %s=%.4f (best %.4f at step %s)', epoch + 1, step, stopping.metric,
               value, stopping.best_value, stopping.best_step)
      if pbar is not None:
        pbar.write(f'epoch {epoch + 1}: valid ' + ' '.join(f'{k}={v:.4f}' for k, v in sorted(valid.items())))
      save(step, state, best=improved)
      progress.restart_clock()
      if preemption.check(sync_point=True):
        preempted = True
        break
    if preempted:
      save(step, state)
  if pbar is not None:
    pbar.close()
  ckpt.wait()
  if preempted:
    writer.close()
    ckpt.close()
    msg = f'SIGTERM: saved a checkpoint at step {step}; re-run the same command to resume.'
    log.warning(msg)
    if lead:
      print(msg, flush=True)
    return TrainResult({'preempted': True, 'step': step}, None)

  best = ckpt.restore_best(state)
  params = trainer_lib.model_params(best[0] if best is not None else state)
  best_step = stopping.best_step if best is not None else step
  scorer = network_scorer(trainer, exp, params)
  result = {
      'best_step': int(best_step),
      # how best_step was chosen: the validation criterion, its direction and best value ('combined': what it weighs)
      'model_selection': {'metric': stopping.metric, 'mode': stopping.mode, 'best_value': stopping.best_value,
                          **({'components': list(stopping.components), 'reference': stopping.reference}
                             if stopping.components else {})},
      'valid': evaluation.full_metrics(scorer, exp, 'valid'),
      'test': evaluation.full_metrics(scorer, exp, 'test'),
      # cold-start splits: the held-out rows of the cold items (users) and of the others, apart; popularity beside
      **({'test_cold_start': evaluation.cold_start_metrics(scorer, exp, 'test'),
          'baselines_cold_start': {'popularity': evaluation.cold_start_metrics(evaluation.popularity(exp), exp,
                                                                               'test')}} if exp.split.cold else {}),
      'baselines': evaluation.baseline_metrics(exp),
      # what the export serves by default: fusion weights chosen on validation (export.default_fusion)
      **({'default_fusion': fusion_weights.select_default(scorer, exp, config)}
         if config.export.enabled and config.export.default_fusion == 'validation' else {}),
      'steps': step,
      # rows of the log in each set ('sampled': what a streamed run held in memory and evaluated on)
      'data': {'name': ds.name, 'source': ds.source, 'split': config.data.split, 'reader': config.data.reader,
               **exp.counts},
      'memory': report,
      'wall_time_sec': time.time() - t0,
  }
  if lead:
    files.write_json(os.path.join(workdir, 'metrics.json'), result)
  writer.scalars(best_step, result['test'], 'test/')
  writer.close()
  ckpt.close()
  return TrainResult(result, Run(config, exp, Network(trainer.graphdef, params, exp.specs), int(best_step)))

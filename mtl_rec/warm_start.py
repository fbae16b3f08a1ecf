"""Warm start (the feedback loop): a new run on new interactions starts from an earlier run's weights.

A run writes its feature rules and vocabularies (`W/features.json`, `W/vocab.npz`); a later run maps every row of
its own tables to the old run's row for the same raw value, and copies those rows from the old checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_rec import checkpoint as checkpoint_lib
from mtl_rec import distributed
from mtl_rec import errors
from mtl_rec import files
from mtl_rec import trees
from mtl_rec.encoding import OOV_ROW, Vocab
from mtl_rec.features import FeatureEncoder

log = logging.getLogger(__name__)

RULES_FILE = 'features.json'
VOCAB_FILE = 'vocab.npz'


def save_features(encoder: FeatureEncoder, workdir: str) -> None:
  """Writes what maps raw values to table rows (every feature's rule and the vocabularies) into the run directory:
  a later run warm-started from this one finds the old row of every id and value it shares with it."""
  if not distributed.is_lead():
    return
  files.write_json(os.path.join(workdir, RULES_FILE), {s.name: dict(s.encoding) for s in encoder.specs})
  files.savez(os.path.join(workdir, VOCAB_FILE), **{name: v.values() for name, v in encoder.vocabs.items()})


def row_sources(old_run_dir: str, encoder: FeatureEncoder) -> dict[str, np.ndarray]:
  """For every feature table of `encoder`: the old run's row for each new row, or -1 (no old row: keep the fresh
  init). Known raw ids and values keep their trained rows wherever vocabularies moved them; the OOV row keeps its
  meaning; padding rows, values the old run never saw and features whose rule changed are -1."""
  rules_path, vocab_path = os.path.join(old_run_dir, RULES_FILE), os.path.join(old_run_dir, VOCAB_FILE)
  if not (os.path.exists(rules_path) and os.path.exists(vocab_path)):
    raise errors.Error(f'{old_run_dir} has no {RULES_FILE} and {VOCAB_FILE}: --init_from needs a run trained by this '
                       'version of train.py')
  old_rules = files.read_json(rules_path)
  with np.load(vocab_path) as f:
    old_vocabs = {k: Vocab.declared(f[k]) for k in f.files}  # saved in row order
  out = {}
  for spec in encoder.specs:
    rule, old = dict(spec.encoding), old_rules.get(spec.name)
    src = np.full(spec.vocab_size, -1, np.int64)
    if spec.kind == 'history':  # no table of its own: it pools the id table of its `of` feature, mapped as that one
      out[spec.name] = src
      continue
    same_rule = old is not None and {k: v for k, v in old.items() if k != 'vocab'} == {
        k: v for k, v in rule.items() if k != 'vocab'}
    if same_rule and 'vocab' in rule:  # rows of the same values, wherever the vocabularies put them
      vocab = encoder.vocabs[rule['vocab']]
      offset = 0 if rule['kind'] == 'vocab' else 1  # multi-valued tables have no OOV row
      keys = vocab.values()
      old_rows = old_vocabs[old['vocab']].lookup(keys).astype(np.int64) - offset if keys.size else keys
      if offset == 0:
        src[OOV_ROW] = OOV_ROW
      found = old_rows >= (1 - offset)
      src[1 - offset:1 - offset + keys.size] = np.where(found, old_rows, -1)
    elif same_rule and rule['kind'] in ('bucket', 'hash', 'multi', 'text'):  # the same rule: rows mean the same
      src[:] = np.arange(spec.vocab_size)
    out[spec.name] = src
  return out


def warm_start_params(params: Any, old_params: Any, sources: dict[str, np.ndarray], shardings: Any) -> Any:
  """New parameters from old ones (a tree shaped like `params`): rows of feature tables (embeddings and id biases)
  gathered through `sources` (-1: the row of `params`, the fresh init), every other parameter copied. `params` is
  donated."""
  def table_of(path) -> str | None:
    keys = trees.path_parts(path)
    return keys[-1] if ('embeddings' in keys or 'id_biases' in keys) and keys[-1] in sources else None

  flat_new, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [table_of(path) for path, _ in flat_new]
  srcs = [None if name is None else sources[name].astype(np.int32) for name in names]

  def merge(news, olds, srcs):
    out = []
    for name, new, old, src in zip(names, news, olds, srcs):
      if name is None:
        out.append(old)
      else:
        keep = (src >= 0).reshape((-1,) + (1,) * (new.ndim - 1))
        out.append(jnp.where(keep, jnp.take(old, jnp.clip(src, 0, old.shape[0] - 1), axis=0), new))
    return out

  merged = jax.jit(merge, out_shardings=jax.tree.leaves(shardings), donate_argnums=0)(
      [x for _, x in flat_new], jax.tree.leaves(old_params), srcs)
  return jax.tree_util.tree_unflatten(treedef, merged)


def init_from_checkpoint(init_from: str, params: Any, param_shardings: Any, encoder: FeatureEncoder) -> Any:
  """Parameters for a new run from `init_from` (a run's workdir or one of its step directories): ids and feature
  values the old run knew keep their trained rows, new ones their fresh init in `params` (placed as
  `param_shardings`); dense weights are copied. The optimizer state is not taken over. Raises ValueError if the model
  configs differ beyond table sizes."""
  run_dir, step_dir = checkpoint_lib.find_checkpoint(init_from)
  sources = row_sources(run_dir, encoder)
  saved = trees.leaves_by_path(checkpoint_lib.params_metadata(step_dir))
  mesh = next(iter(jax.tree.leaves(param_shardings))).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def target(path, new, sharding):
    old = saved.get(trees.path_parts(path))
    name = trees.path_name(path)
    if old is None:
      raise errors.Error(f'parameter {name} is not in the --init_from checkpoint {step_dir}: warm start needs the same '
                         'model config (backbone, tasks, features); only the data may change')
    is_table = trees.path_parts(path)[-1] in sources and old.ndim == new.ndim
    if (old.shape[1:] != new.shape[1:]) if is_table else (old.shape != new.shape):
      raise errors.Error(f'parameter {name} has shape {old.shape} in the --init_from checkpoint and {new.shape} here: '
                         'warm start needs the same model config (embed_dim, layer widths)')
    # Old tables are read row-sharded like the new ones where their row count allows, else replicated.
    ok = all(d is None or old.shape[i] % mesh.shape[d] == 0 for i, d in enumerate(sharding.spec))
    return jax.ShapeDtypeStruct(old.shape, old.dtype, sharding=sharding if ok else replicated)
  old_params = checkpoint_lib.restore_params(step_dir, jax.tree_util.tree_map_with_path(target, params,
                                                                                        param_shardings))
  kept = {name: int((sources[name] >= 0).sum()) for name in ('user_id', 'item_id') if name in sources}
  log.info('warm start from %s: rows kept from it %s', step_dir, kept)
  return warm_start_params(params, old_params, sources, param_shardings)

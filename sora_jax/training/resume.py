"""What a re-run on an existing workdir may change: anything but the shapes of what its checkpoints
hold. Checked from the run's config.json alone (abstract shapes, no checkpoint read, nothing
written), so a mistaken command is refused before it can touch the run.

config.json is written by train.py only once a run has started; a resume that changes allowed keys
(total_steps, the learning rate, logging, ...) keeps the previous file as config.step_<N>.json.
"""

import json
import os

import jax
import ml_collections
from flax import nnx

from sora_jax.config import schema
from sora_jax.training import state as state_lib


def has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def _flat(d, prefix=''):
  for key, value in d.items():
    if isinstance(value, dict):
      yield from _flat(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def config_diff(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict:
  """{dotted key: (old, new)} of the keys whose values differ (as config.json stores them)."""
  a = dict(_flat(json.loads(old.to_json())))
  b = dict(_flat(json.loads(new.to_json())))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def checkpoint_shapes(config) -> dict:
  """{array path: (shape, dtype)} of what a checkpoint of `config`'s run holds (no memory used)."""
  tx, _ = state_lib.make_optimizer(config)
  _, abstract = nnx.eval_shape(lambda: state_lib._init(config, tx))  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_flatten_with_path(state_lib.checkpointed(abstract))[0]
  return {_name(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def _name(path) -> str:
  parts = (str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)
  return '/'.join(p for p in parts if p != 'value')


def model_shapes(config) -> dict:
  """{parameter path: shape} of `config`'s whole model (a LoRA run's base and adapters together)."""
  tx, _ = state_lib.make_optimizer(config)
  _, abstract = nnx.eval_shape(lambda: state_lib._init(config, tx))  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_flatten_with_path(state_lib.model_params(abstract))[0]
  return {_name(p): tuple(x.shape) for p, x in leaves}


def check_init_from(config) -> None:
  """A config.init_from workdir must hold this model's architecture (ValueError naming the keys that
  differ), checked from its config.json before anything loads or compiles."""
  path = os.path.join(config.init_from, 'config.json') if config.init_from else ''
  if not path or not os.path.exists(path):
    return
  with open(path) as f:
    if 'model' not in json.load(f):
      return  # a diffusers folder, not a sora_jax workdir: its importer checks it
  base = schema.load_config(config.init_from)
  ours = {k: v for k, v in model_shapes(config).items()
          if not k.endswith(('lora_a', 'lora_b'))}
  theirs = model_shapes(base)
  if ours == theirs:
    return
  arrays = [f'{k} {theirs[k]} -> {ours[k]}' for k in theirs if k in ours and theirs[k] != ours[k]]
  arrays += [f'{k} missing' for k in theirs if k not in ours]
  arrays += [f'{k} not in it' for k in ours if k not in theirs]
  keys = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in config_diff(base, config).items()
                   if k.startswith('model.'))
  raise ValueError(f'config.init_from={config.init_from!r} is another architecture: {keys or "?"};'
                   f' parameters that differ: {"; ".join(arrays[:3])}.')


def check(config, workdir: str) -> None:
  """Raises ValueError, before anything is written, when `workdir` holds checkpoints that `config`
  cannot resume: the keys that differ from the run's config.json and the first arrays that would not
  fit, and how to start a new run instead. A new run's config.init_from is checked likewise."""
  if not has_checkpoints(workdir):
    check_init_from(config)
  if not has_checkpoints(workdir) or not os.path.exists(os.path.join(workdir, 'config.json')):
    return
  saved = schema.load_config(workdir)
  diff = config_diff(saved, config)
  if not diff:
    return
  old, new = checkpoint_shapes(saved), checkpoint_shapes(config)
  if old == new:
    return
  arrays = [f'{k} {old[k][0]} {old[k][1]} -> {new[k][0]} {new[k][1]}'
            for k in old if k in new and old[k] != new[k]][:3]
  arrays += [f'{k} missing' for k in old if k not in new][:2]
  arrays += [f'{k} not in the checkpoints' for k in new if k not in old][:2]
  keys = ', '.join(f'{k}: {a!r} -> {b!r}' for k, b in [(k, v[1]) for k, v in diff.items()]
                   for a in [diff[k][0]])
  raise ValueError(
      f'{workdir!r} holds checkpoints of another model or optimizer state: config keys that differ'
      f' from its config.json: {keys}; arrays that would not fit: {"; ".join(arrays)}. Nothing was'
      ' written. To train this config, use a new --workdir (add --config.init_from='
      f'{workdir} to start from this run\'s weights); to resume this run, drop those overrides.')


def write_config(config, workdir: str, step: int) -> None:
  """config.json once the run has started; on a resume that changed allowed keys, the previous
  file is kept as config.step_<step>.json. Process 0 only."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    if not config_diff(schema.load_config(workdir), config):
      return
    os.replace(path, os.path.join(workdir, f'config.step_{step}.json'))
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json(indent=2))
  os.replace(path + '.tmp', path)

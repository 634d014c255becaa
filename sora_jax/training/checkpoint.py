"""Orbax checkpoints of the train state together with the Grain iterator (exact resume).

A checkpoint is a Composite of three items: 'state' (params, EMA, optimizer, step, RNG), 'dataset'
(each process's Grain iterator state) and 'layout' ({'process_count'}: how many processes wrote
'dataset', which decides whether a resume can take the iterator states as they are); a LoRA run's
also 'base' (training/state.py `base_record`: which frozen base its adapters apply to).
"""

import glob
import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

# Orbax splits every replicated array into one slice per replica so that hosts share the writing
# ("replica-parallel"); each slice is an eager device op. Below this size per slice that costs more
# than it saves (a tiny model on 8 CPU devices: ~5 s per save, most of a test's training run), so
# smaller slices are written whole by replica 0; large arrays on a pod stay replica-parallel.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_registered = False


def _register_array_handler():
  """Once per process, when the first manager is made (not at import: importing has no effects)."""
  global _registered
  if not _registered:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
    _registered = True


def quiet_orbax_logs():
  """Orbax logs every save phase at INFO; keep the console for the progress line."""
  absl_logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.WARNING or 'orbax' not in r.pathname)


def manager(workdir: str, config=None, *, read_only: bool = False) -> ocp.CheckpointManager:
  _register_array_handler()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if config is None else config.keep_checkpoints,
      enable_async_checkpointing=True, read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                               options=options, item_names=('state', 'dataset', 'layout', 'base'))


def save(mngr, step: int, state, iterator, *, force: bool = False, base: dict | None = None):
  """Async save: returns once device buffers are copied, so the next step may donate them."""
  items = dict(state=ocp.args.StandardSave(state), dataset=grain.checkpoint.CheckpointSave(iterator),
               layout=ocp.args.JsonSave({'process_count': jax.process_count()}))
  if base is not None:
    items['base'] = ocp.args.JsonSave(base)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


def saved_base(mngr, step: int | None = None) -> dict | None:
  """The 'base' record of a LoRA run's checkpoint (None for a full fine-tuning run)."""
  step = resolve_step(mngr, step)
  if not os.path.isdir(os.path.join(str(mngr.directory), str(step), 'base')):
    return None
  return dict(mngr.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))['base'])


def resolve_step(mngr, step: int | None = None) -> int:
  """`step`, or the latest, after checking that the checkpoint exists."""
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {mngr.directory}.')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {mngr.directory}; have {steps}.')
  return step


def restore(mngr, abstract_state, iterator=None, step: int | None = None):
  """Restores onto the shardings carried by `abstract_state` (any mesh); also the iterator if given."""
  step = resolve_step(mngr, step)
  args = dict(state=ocp.args.StandardRestore(abstract_state))
  if iterator is not None:
    args['dataset'] = grain.checkpoint.CheckpointRestore(iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**args))
  return restored['state']


def restore_params(mngr, abstract_params, key: str = 'ema', step: int | None = None):
  """(state[key], step) of a checkpoint: one parameter tree ('ema' or 'params'), restored onto the
  shardings carried by `abstract_params` (any mesh). A partial restore: the other trees (the
  optimizer moments, the other parameter copy) are not read, so inference and `init_from` hold 4
  bytes per float32 parameter instead of the whole train state's 16."""
  step = resolve_step(mngr, step)
  item = {key: abstract_params, 'step': jax.ShapeDtypeStruct((), 'int32')}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  restore_args['step'] = ocp.RestoreArgs(restore_type=int)  # a host scalar, on no mesh
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))['state']
  return restored[key], int(restored['step'])


def saved_process_count(mngr, step: int | None = None) -> int | None:
  """How many processes wrote the data iterator state of a checkpoint (default: the latest)."""
  step = resolve_step(mngr, step)
  if os.path.isdir(os.path.join(str(mngr.directory), str(step), 'layout')):
    layout = mngr.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))['layout']
    return int(layout['process_count'])
  # Checkpoints written before the 'layout' item: count Grain's per-process state files.
  names = glob.glob(os.path.join(str(mngr.directory), str(step), 'dataset', 'process_*-of-*.json'))
  counts = {int(re.search(r'-of-(\d+)\.json$', n).group(1)) for n in names}
  return counts.pop() if len(counts) == 1 else None

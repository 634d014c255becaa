"""Orbax checkpoints of the train state together with the Grain iterator (exact resume).

A checkpoint is a Composite of three items: 'state' (params, EMA, optimizer, step, RNG), 'dataset'
(each process's Grain iterator state) and 'layout' ({'process_count'}: how many processes wrote
'dataset', which decides whether a resume can take the iterator states as they are); a LoRA run's
also 'base' (training/state.py `base_record`: which frozen base its adapters apply to); and
'checksums' (one per array of 'state', checked on restore: Orbax detects a truncated array file but
reads overwritten bytes as they are).

Faults: a save that fails (disk full, no permission) is logged and tried again at the next
checkpoint step, by every process alike (`Saver`); a checkpoint that does not restore is skipped
for the newest one that does, and set aside as <step>.damaged-<time> (`restore_newest`). Orbax
writes a checkpoint into <step>.orbax-checkpoint-tmp and renames it to <step> once complete (on GCS:
a commit marker), so a partial save is never listed as a step.
"""

import dataclasses
import glob
import logging
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

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
      enable_async_checkpointing=True, read_only=read_only, create=not read_only,
      cleanup_tmp_directories=not read_only)  # partial saves of a run that died mid-save
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
      item_names=('state', 'dataset', 'layout', 'base', 'checksums'))


def save(mngr, step: int, state, iterator, *, force: bool = False, base: dict | None = None):
  """Async save: returns once device buffers are copied, so the next step may donate them."""
  items = dict(state=ocp.args.StandardSave(state), dataset=_IteratorSave(iterator),
               layout=ocp.args.JsonSave({'process_count': jax.process_count()}),
               checksums=ocp.args.JsonSave(checksums(state)))
  if base is not None:
    items['base'] = ocp.args.JsonSave(base)
  mngr.save(step, args=ocp.args.Composite(**items), force=force)


@jax.jit
def _fingerprints(tree):
  """Per array: the sum of its elements' bits times (2 * flat index + 1), mod 2^32. Odd weights are
  invertible mod 2^32, so a change of any one element changes it; one read of the state, on device,
  whatever its sharding (no reshape)."""
  def one(x):
    x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for d in range(x.ndim):
      index = index * x.shape[d] + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d)
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)
  return jax.tree.map(one, tree)


_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def checksums(tree) -> dict[str, int]:
  """{tree path: fingerprint} of the arrays in `tree` (other leaves, e.g. host ints, skipped)."""
  arrays = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, jax.Array)}
  return {k: int(v) for k, v in jax.device_get(_fingerprints(arrays)).items()}


class DamagedCheckpoint(ValueError):
  """A checkpoint that does not restore: files missing, truncated or overwritten."""


def _verify(saved: dict | None, restored, step: int):
  """Raises DamagedCheckpoint if an array of `restored` differs from its checksum at save time
  (checkpoints written before checksums existed have none: nothing to check)."""
  if saved is None:
    return
  differ = sorted(k for k, v in checksums(restored).items() if k in saved and saved[k] != v)
  if differ:
    raise DamagedCheckpoint(f'step {step}: {len(differ)} array(s) differ from what was saved'
                            f' ({", ".join(differ[:3])}{", ..." if len(differ) > 3 else ""})')


def _has_item(mngr, step: int, item: str) -> bool:
  return os.path.isdir(os.path.join(str(mngr.directory), str(step), item))


def _short(error: BaseException, limit: int = 300) -> str:
  """An exception as one short line (TensorStore's messages carry their whole JSON spec: dropped)."""
  text = ' '.join(str(error).split()).split(' See full TensorStore details')[0]
  return f'{type(error).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


class SaveFailedElsewhere(RuntimeError):
  """This process wrote its part of a checkpoint save; another process could not write its own."""


class _IteratorHandler(grain.checkpoint.CheckpointHandler):
  """Grain's handler, whose save every process agrees on. Each process writes its own iterator file
  in the save's blocking part; a process whose write failed would leave the save while the others
  go on into Orbax's next barrier (a device collective) and wait there for ever, the failed one
  training on into the next step's collectives. Instead the processes allgather their outcomes
  and all fail the save together, the others with SaveFailedElsewhere naming the process."""

  def save(self, directory, item=None, args=None):
    try:
      super().save(directory, item, args)
      error = None
    except Exception as e:  # pylint: disable=broad-except  # whatever the disk raises
      error = e
    failed = []
    if jax.process_count() > 1:  # every process, at the same point of every save
      ok = np.asarray(multihost_utils.process_allgather(np.array(error is None)), bool)
      failed = [int(i) for i in np.flatnonzero(~ok.reshape(-1))]
    if error is not None:
      raise error
    if failed:
      raise SaveFailedElsewhere(f'process(es) {", ".join(map(str, failed))} of'
                                f' {jax.process_count()} could not write the data-iterator state')


@ocp.args.register_with_handler(_IteratorHandler, for_save=True)
@dataclasses.dataclass
class _IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_IteratorHandler, for_restore=True)
@dataclasses.dataclass
class _IteratorRestore(ocp.args.CheckpointArgs):
  """Orbax wants a handler's restore arguments too; restores go through Grain's handler itself
  (`_restore_iterator`)."""
  item: Any


class SaveFailed(RuntimeError):
  """config.max_failed_saves checkpoint saves in a row failed, or the run's last one did."""


class Saver:
  """`save` that a failed save does not stop: the error is logged, the partial folder removed (it
  takes the space a disk-full retry needs) and training goes on, trying again at the next
  checkpoint step; `max_failed` failures in a row raise SaveFailed. An async save's failure (the
  array files are written in the background) surfaces when it is awaited: at the next save, or at
  `finish`.

  Several processes: a failure in a save's blocking part (each process's data-iterator file) is
  agreed on (`_IteratorHandler`): all processes count the step failed, retry and stop together. A
  background write that fails on some processes only fails on all at Orbax's own barriers
  (key-value store, with a timeout: AsyncOptions.timeout_secs, 20 min from the save's start):
  training goes on meanwhile; the next save waits for that timeout, then every process counts the
  step failed (tests/test_faults.py, with the timeout cut short)."""

  def __init__(self, mngr, max_failed: int):
    self.mngr, self.max_failed = mngr, max_failed
    self.failed = []  # steps whose saves failed since the last good one
    self.in_flight = None

  def save(self, step: int, state, iterator, *, force: bool = False, base: dict | None = None):
    self._settle()
    try:
      save(self.mngr, step, state, iterator, force=force, base=base)
      self.in_flight = step
    except Exception as e:  # pylint: disable=broad-except  # TensorStore's are ValueErrors
      self._failed(step, e)

  def latest(self) -> str:
    """The newest complete checkpoint, in words (after the one in flight is written or fails)."""
    self._settle(stop=False)
    step = self.mngr.latest_step()
    return 'none' if step is None else f'step {step} in {self.mngr.directory}'

  def finish(self):
    """Waits for the last save; SaveFailed if it failed (no later checkpoint step tries again)."""
    self._settle()
    if self.failed:
      raise SaveFailed(f'The checkpoint of step {self.failed[-1]}, the last of this run, could not'
                       f' be saved (see the error above). The newest checkpoint: {self.latest()}.'
                       ' Free space or fix the permissions there, then run the same command again.')

  def _settle(self, stop: bool = True):
    step, self.in_flight = self.in_flight, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e, stop=stop)
    else:
      if step is not None:
        self.failed = []

  def _failed(self, step, error, stop: bool = True):
    self.failed.append(step)
    absl_logging.error('Saving the checkpoint of step %s failed (%d in a row; config.'
                       'max_failed_saves=%d): %s.%s', step, len(self.failed), self.max_failed,
                       _short(error), '' if len(self.failed) >= self.max_failed else
                       ' Training goes on; the next checkpoint step tries again.')
    if jax.process_index() == 0:
      for path in glob.glob(os.path.join(str(self.mngr.directory),
                                         f'{step}{ocp.path.step.TMP_DIR_SUFFIX}*')):
        shutil.rmtree(path, ignore_errors=True)
    if stop and len(self.failed) >= self.max_failed:
      raise SaveFailed(
          f'{len(self.failed)} checkpoint saves in a row failed (steps'
          f' {", ".join(map(str, self.failed))}; config.max_failed_saves={self.max_failed}), the'
          f' last with {_short(error)}. The newest checkpoint: {self.latest()}. Free space or fix the'
          ' permissions there, then run the same command again to resume from it.') from error


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
  """Restores onto the shardings carried by `abstract_state` (any mesh); also the iterator if given.
  DamagedCheckpoint if an array differs from its checksum."""
  step = resolve_step(mngr, step)
  args = dict(state=ocp.args.StandardRestore(abstract_state))
  if _has_item(mngr, step, 'checksums'):
    args['checksums'] = ocp.args.JsonRestore()
  restored = mngr.restore(step, args=ocp.args.Composite(**args))
  _verify(restored.get('checksums'), restored['state'], step)
  if iterator is not None:
    _restore_iterator(mngr, step, iterator)
  return restored['state']


def _restore_iterator(mngr, step: int, iterator):
  """Grain's handler itself, not through the manager: each process reads its own file, so one may
  fail where the others do not, and the manager's closing barrier (a device collective) would then
  pair with another collective. Without it, the processes agree on the outcome and fail together."""
  try:
    grain.checkpoint.CheckpointHandler().restore(
        epath.Path(str(mngr.directory)) / str(step) / 'dataset',
        args=grain.checkpoint.CheckpointRestore(iterator))
    error = None
  except Exception as e:  # pylint: disable=broad-except  # whatever the damage raises
    error = e
  if not _everywhere(error is None):
    raise error or DamagedCheckpoint(
        f'step {step}: the data-iterator state of another process does not restore')


def restore_newest(mngr, abstract_state, iterator=None):
  """(state, whether `iterator` was restored) from the newest checkpoint that restores (a resume).
  Newer ones that do not are set aside (`_newest`). Grain's iterator state is per process: it is
  restored only from a checkpoint written by as many processes (else the caller re-derives it)."""
  def one(step):
    same_layout = saved_process_count(mngr, step) == jax.process_count()
    return restore(mngr, abstract_state, iterator if same_layout else None, step), same_layout
  return _newest(mngr, one, set_aside=True)


def restore_params(mngr, abstract_params, key: str = 'ema', step: int | None = None):
  """(state[key], step) of a checkpoint: one parameter tree ('ema' or 'params'), restored onto the
  shardings carried by `abstract_params` (any mesh). A partial restore: the other trees (the
  optimizer moments, the other parameter copy) are not read, so inference and `init_from` hold 4
  bytes per float32 parameter instead of the whole train state's 16.

  Without `step`, the newest checkpoint that restores (a reader leaves damaged ones where they are:
  the workdir is the training run's); a `step` that does not restore is a DamagedCheckpoint."""
  def one(step):
    item = {key: abstract_params, 'step': jax.ShapeDtypeStruct((), 'int32')}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    restore_args['step'] = ocp.RestoreArgs(restore_type=int)  # a host scalar, on no mesh
    args = dict(state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                             partial_restore=True))
    if _has_item(mngr, step, 'checksums'):
      args['checksums'] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    _verify(restored.get('checksums'), restored['state'], step)
    return restored['state'][key], int(restored['state']['step'])
  if step is None:
    return _newest(mngr, one, set_aside=False)
  step = resolve_step(mngr, step)
  try:
    return one(step)
  except Exception as e:  # pylint: disable=broad-except  # whatever the damage raises
    others = [s for s in mngr.all_steps() if s != step]
    raise DamagedCheckpoint(
        f'Checkpoint step {step} in {mngr.directory} does not restore ({_short(e)}); its other'
        f' steps: {others or "none"}.') from e


def _newest(mngr, restore_one, *, set_aside: bool):
  """restore_one(step) of the newest step for which it works. The newer steps that failed are
  damaged (the same run wrote them all) and are named in a warning and, with `set_aside`, renamed
  <step>.damaged-<time> (kept for inspection, no longer a step to Orbax). When no step restores,
  nothing is renamed: that is another config or a bug, not damage; the newest step's error is
  raised. Several processes: damage to the shared files (metadata, checksums, arrays every process
  reads) fails on all alike, and the per-process iterator files are agreed on; a damaged array
  shard that only some processes read still stops the run (Orbax's restore ends in a barrier)."""
  resolve_step(mngr)  # FileNotFoundError when there is none
  steps = sorted(mngr.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      result = restore_one(step)
      break
    except Exception as e:  # pylint: disable=broad-except  # whatever the damage raises
      errors.append((step, e))
  else:
    raise errors[0][1]
  for bad, error in errors:
    where = _set_aside(mngr, bad) if set_aside else os.path.join(str(mngr.directory), str(bad))
    absl_logging.warning('Checkpoint step %d does not restore (%s); restored step %d instead. The'
                         ' damaged one is kept as %s.', bad, _short(error), step, where)
  return result


def _everywhere(ok: bool) -> bool:
  """Whether `ok` on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _set_aside(mngr, step: int) -> str:
  """Renames checkpoint `step` to <step>.damaged-<time>, outside what Orbax lists as steps."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  if jax.process_count() > 1:  # one name for all
    stamp = multihost_utils.broadcast_one_to_all(np.array(int(time.time()))).item()
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))
  path = os.path.join(str(mngr.directory), str(step))
  target = f'{path}.damaged-{stamp}'
  if jax.process_index() == 0:
    os.rename(path, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'sora_jax_set_aside_{step}')
  mngr.reload()
  return target


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

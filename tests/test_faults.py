"""Faults a long run survives (README, Training: the faults table), injected: non-finite steps (a
NaN batch, an overflow), failed checkpoint saves (an injected ENOSPC; a full tmpfs where the test may
mount one; a read-only folder where the test is not root), a damaged newest checkpoint (array data,
metadata, data-iterator state; truncated or overwritten). Tiny configs; the whole module takes
~2 min on 2 CPU cores, most of it compiling."""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import grain._src.python.checkpoint.handler as grain_handler
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import pipeline
from sora_jax import cli, train
from sora_jax.config import geometry, validation
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import restore
from sora_jax.parallel import sharding
from sora_jax.training import checkpoint
from sora_jax.training import state as state_lib
from sora_jax.training import update

sys.path.insert(0, os.path.dirname(__file__))
import programs  # noqa: E402
import test_multihost as mh  # noqa: E402
from conftest import tiny_config  # noqa: E402

TIMING = ('steps_per_second', 'tflops_per_device', 'mfu')
manifest, env = mh.manifest, mh.env  # test_multihost's fixtures, for the 2-process test


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def listing(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


# ---- Non-finite steps.

@pytest.mark.parametrize('fault,lora', [('nan', False), ('overflow', False), ('nan', True)])
def test_a_nonfinite_step_changes_no_weights(fault, lora):
  config = tiny_config()
  config.lora.rank = 4 if lora else 0  # the base of this state is its random init: enough here
  mesh = sharding.make_mesh(geometry.resolve_mesh_shape(config, 1), jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, _ = state_lib.init(config, mesh)
  step = jax.jit(update.make_train_step(graphdef, config, tx, schedule))
  batch = next(pipeline.train_iterator(config))
  good = dict(batch, video=batch['video'].astype(np.float32) / 127.5 - 1)  # one program for both
  state, m = step(state, good)  # moments and EMA away from their init
  assert int(m['nonfinite']) == 0
  bad = dict(good, video=np.full_like(good['video'], np.nan if fault == 'nan' else 3e38))
  after, m = step(state, bad)
  assert int(m['nonfinite']) == 1
  assert not (np.isfinite(float(m['loss'])) and np.isfinite(float(m['grad_norm'])))
  for key in ('params', 'ema', 'opt_state') + (('frozen',) if lora else ()):
    assert bits(after[key]) == bits(state[key]), key
  assert int(after['step']) == int(state['step']) + 1  # its batch is consumed


def nan_batches_from(call: int, monkeypatch):
  """The train loop's batches become NaN from its `call`-th on (after encode_batch, on device)."""
  encode, calls = frozen_lib.Frozen.encode_batch, []

  def encode_batch(self, batch, batch_sharding):
    batch = encode(self, batch, batch_sharding)
    calls.append(1)
    if len(calls) >= call:
      batch = dict(batch, video=batch['video'].astype(jnp.float32) * jnp.nan)
    return batch
  monkeypatch.setattr(frozen_lib.Frozen, 'encode_batch', encode_batch)


def test_nonfinite_steps_in_a_row_stop_the_run_without_saving(tmp_path, monkeypatch):
  config = tiny_config()
  config.optim.max_nonfinite_steps = 2
  workdir = str(tmp_path)
  nan_batches_from(3, monkeypatch)
  with pytest.raises(FloatingPointError, match=r'Steps 3-4 .*stopped at step 4 without saving\. The'
                     r' last good checkpoint: step 2 in'):
    train.train(config, workdir)
  assert listing(workdir) == ['2']
  rows = read_metrics(workdir)
  assert [(r['step'], r['nonfinite_steps']) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]
  mngr = checkpoint.manager(workdir, read_only=True)
  _, abstract, _ = state_lib.shardings(config, sharding.make_mesh(
      validation.validate(config, jax.device_count())))
  state = checkpoint.restore(mngr, state_lib.checkpointed(abstract))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_an_overflowing_learning_rate_stops_the_run(tmp_path):
  # The measurement: learning_rate=1e12 trained to the end on NaN weights. At 1e30 the
  # second update (warm-up: the first is at 0) makes the weights ~1e29; every later forward pass
  # overflows.
  config = tiny_config()
  config.optim.learning_rate, config.optim.max_nonfinite_steps = 1e30, 2
  with pytest.raises(FloatingPointError, match='Steps 3-4 .*last good checkpoint: step 2 in'):
    train.train(config, str(tmp_path))
  assert listing(str(tmp_path)) == ['2']


# ---- Failed saves.

def tiny_state(config):
  mesh = sharding.make_mesh(validation.validate(config, jax.device_count()))
  _, state, _ = state_lib.init(config, mesh)
  data = pipeline.train_iterator(config, process_index=0, process_count=1, data_parallel=8)
  return state_lib.checkpointed(state), data


@pytest.fixture
def failing_saves(monkeypatch):
  """The data-iterator item's save (written in a save's blocking part, after Orbax has made the
  step's tmp folder) raises ENOSPC while `failing_saves[0]` is True."""
  failing, save = [True], grain_handler.CheckpointHandler.save

  def maybe_fail(self, *args, **kwargs):
    if failing[0]:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(self, *args, **kwargs)
  monkeypatch.setattr(grain_handler.CheckpointHandler, 'save', maybe_fail)
  return failing


def test_a_failed_save_is_retried_and_too_many_in_a_row_stop(tmp_path, failing_saves):
  config = tiny_config()
  state, data = tiny_state(config)
  workdir = str(tmp_path)
  saver = checkpoint.Saver(checkpoint.manager(workdir, config), max_failed=2)
  for step, fails in ((2, False), (4, True), (6, False), (8, True)):
    failing_saves[0] = fails
    saver.save(step, state, data)
  saver.latest()
  assert listing(workdir) == ['2', '6']  # the partial folders of 4 and 8 are gone
  with pytest.raises(checkpoint.SaveFailed, match=r'2 checkpoint saves in a row failed \(steps 8,'
                     r' 10; config.max_failed_saves=2\), the last with OSError: \[Errno 28\] No space'
                     r' left on device\. The newest checkpoint: step 6 in'):
    saver.save(10, state, data)
  assert listing(workdir) == ['2', '6']
  # The run's last save gets no later try: a failure there is an error at once.
  saver = checkpoint.Saver(checkpoint.manager(workdir, config), max_failed=3)
  saver.save(12, state, data)
  with pytest.raises(checkpoint.SaveFailed, match='step 12, the last of this run, could not be'
                     ' saved.*The newest checkpoint: step 6 in'):
    saver.finish()


def test_a_run_whose_saves_fail_trains_on_then_stops(tmp_path, failing_saves):
  config = tiny_config()
  config.max_failed_saves = 3
  workdir = str(tmp_path)
  with pytest.raises(checkpoint.SaveFailed, match=r'3 checkpoint saves in a row failed \(steps 2,'
                     r' 4, 6;.*The newest checkpoint: none'):
    train.train(config, workdir)
  assert listing(workdir) == []
  assert [r['step'] for r in read_metrics(workdir)] == list(range(1, 7))  # trained to the end


@pytest.fixture
def small_tmpfs(tmp_path):
  """A `size` tmpfs at tmp_path/fs, where this test may mount one (root with CAP_SYS_ADMIN)."""
  mounted = []

  def mount(size: int) -> str:
    path = str(tmp_path / 'fs')
    os.makedirs(path)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                      capture_output=True).returncode:
      pytest.skip('cannot mount a tmpfs here')
    mounted.append(path)
    return path
  yield mount
  for path in mounted:
    subprocess.run(['umount', path], check=True)


def test_a_full_disk_fails_the_async_write_and_leaves_the_last_good_checkpoint(tmp_path,
                                                                                small_tmpfs):
  config = tiny_config()
  state, data = tiny_state(config)
  saver = checkpoint.Saver(checkpoint.manager(str(tmp_path / 'probe'), config), max_failed=2)
  saver.save(2, state, data)
  saver.finish()
  size = sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / 'probe/**'), recursive=True)
             if os.path.isfile(f))
  workdir = small_tmpfs(size * 3 // 2)  # room for one checkpoint, not two
  saver = checkpoint.Saver(checkpoint.manager(workdir, config), max_failed=2)
  saver.save(2, state, data)
  saver.save(4, state, data)  # its arrays are written in the background: ENOSPC surfaces later
  with pytest.raises(checkpoint.SaveFailed, match=r'steps 4, 6;.*RESOURCE_EXHAUSTED.*The newest'
                     ' checkpoint: step 2 in'):
    saver.save(6, state, data)
    saver.finish()
  assert listing(workdir) == ['2']
  mngr = checkpoint.manager(workdir, config)
  restored, _ = checkpoint.restore_newest(mngr, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), data)
  assert bits(restored) == bits(state)


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_checkpoint_folder_fails_saves_without_stopping(tmp_path):
  config = tiny_config()
  state, data = tiny_state(config)
  workdir = str(tmp_path)
  saver = checkpoint.Saver(checkpoint.manager(workdir, config), max_failed=2)
  saver.save(2, state, data)
  saver.latest()
  os.chmod(tmp_path / 'checkpoints', 0o555)
  try:
    saver.save(4, state, data)
    with pytest.raises(checkpoint.SaveFailed, match='steps 4, 6;.*The newest checkpoint: step 2'):
      saver.save(6, state, data)
      saver.finish()
  finally:
    os.chmod(tmp_path / 'checkpoints', 0o755)
  assert listing(workdir) == ['2']


# ---- A damaged newest checkpoint.

def array_files(step_dir: str) -> list[str]:
  return glob.glob(os.path.join(step_dir, 'state/ocdbt.process_0/d/*'))


def damage(step_dir: str, part: str, how: str):
  """Truncates to half, or overwrites 64 bytes in the middle of (XOR 0xff), one file of a step."""
  damage_file({'arrays': lambda: max(array_files(step_dir), key=os.path.getsize),
               'metadata': lambda: os.path.join(step_dir, 'state/_METADATA'),
               'dataset': lambda: os.path.join(step_dir, 'dataset/process_0-of-1.json')}[part](),
              how)


def damage_file(path: str, how: str):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    if how == 'truncate':
      f.truncate(size // 2)
    else:
      f.seek(size // 2)
      chunk = f.read(64)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xff for b in chunk))


DAMAGE = [(part, how) for part in ('arrays', 'metadata', 'dataset')
          for how in ('truncate', 'corrupt')]


@pytest.fixture
def damaged(tiny_run, tmp_path):
  """damaged(part, how): a copy of the tiny run (checkpoints 2, 4, 6) with step 6 damaged."""
  def make(part, how):
    workdir = str(tmp_path / 'run')
    shutil.copytree(tiny_run[1], workdir)
    damage(os.path.join(workdir, 'checkpoints', '6'), part, how)
    return workdir
  return make


@pytest.mark.parametrize('part,how', DAMAGE)
def test_restore_falls_back_past_a_damaged_checkpoint_and_sets_it_aside(damaged, part, how):
  config = tiny_config()
  workdir = damaged(part, how)
  files = sorted(os.path.relpath(f, os.path.join(workdir, 'checkpoints', '6'))
                 for f in glob.glob(os.path.join(workdir, 'checkpoints', '6', '**'), recursive=True))
  _, abstract, _ = state_lib.shardings(config, sharding.make_mesh(
      validation.validate(config, jax.device_count())))
  data = pipeline.train_iterator(config, process_index=0, process_count=1, data_parallel=8)
  mngr = checkpoint.manager(workdir, config)
  state, same_layout = checkpoint.restore_newest(mngr, state_lib.checkpointed(abstract), data)
  assert int(state['step']) == 4 and same_layout and mngr.latest_step() == 4
  names = listing(workdir)
  assert names[:2] == ['2', '4'] and len(names) == 3 and names[2].startswith('6.damaged-')
  kept = os.path.join(workdir, 'checkpoints', names[2])  # kept whole, for inspection
  assert sorted(os.path.relpath(f, kept) for f in glob.glob(kept + '/**', recursive=True)) == files


@pytest.mark.parametrize('part,how', DAMAGE)
def test_a_resume_past_a_damaged_checkpoint_is_exact(tiny_run, damaged, part, how):
  workdir = damaged(part, how)
  train.train(tiny_config(), workdir)  # from step 4: steps 5 and 6 again, the same batches
  assert read_metrics(workdir) == read_metrics(tiny_run[1])
  names = listing(workdir)
  assert names[:3] == ['2', '4', '6'] and names[3].startswith('6.damaged-')


def test_sampling_falls_back_but_a_named_damaged_step_is_one_clear_error(damaged):
  workdir = damaged('dataset', 'corrupt')  # sampling reads no iterator state: this one is fine
  assert restore.load(workdir)[-1] == 6
  for path in array_files(os.path.join(workdir, 'checkpoints', '6')):  # the EMA's too
    damage_file(path, 'corrupt')
  before = listing(workdir)
  *_, step = restore.load(workdir)
  assert step == 4 and listing(workdir) == before  # readers leave the training run's files alone
  with pytest.raises(cli.UserError, match=r'^Checkpoint step 6 in \S+ does not restore \(Damaged'
                     r'Checkpoint: step 6: \d+ array\(s\) differ from what was saved .*\); its other'
                     r' steps: \[2, 4\]\.$') as e:
    restore.load(workdir, step=6)
  assert '\n' not in str(e.value)


def test_sample_and_evaluate_name_a_damaged_step(damaged, tmp_path):
  workdir = damaged('metadata', 'truncate')
  for program, args in (('sora_jax.sample', ['--prompt=a red circle', f'--output_dir={tmp_path}']),
                        ('sora_jax.evaluate', [f'--output={tmp_path / "eval.json"}'])):
    out = programs.run(program, f'--workdir={workdir}', '--checkpoint_step=6', '--num_steps=2',
                       *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1].startswith(
        f'{program}: error: Checkpoint step 6 in {workdir}/checkpoints does not restore'
        ' (JSONDecodeError'), out.stderr[-3000:]


# ---- Two processes.

@pytest.mark.slow  # three 2-process launches, ~2 min
def test_two_processes_fall_back_together_and_stop_together(manifest, env, tmp_path):
  workdir = str(tmp_path / 'run')
  args = mh.train_args(manifest, workdir)
  mh.run(2, 2, args, env, tmp_path / 'first.log')  # checkpoints 3 and 6
  first = mh.numbers(mh.read_metrics(workdir))
  # Only process 1's iterator state is damaged: process 0 alone would restore step 6.
  damage_file(os.path.join(workdir, 'checkpoints', '6', 'dataset', 'process_1-of-2.json'),
              'truncate')
  mh.run(2, 2, args, env, tmp_path / 'resumed.log')
  assert mh.numbers(mh.read_metrics(workdir)) == first
  names = listing(workdir)
  assert names[:2] == ['3', '6'] and len(names) == 3 and names[2].startswith('6.damaged-')

  overflow = str(tmp_path / 'overflow')
  with open(tmp_path / 'overflow.log', 'w') as log:
    launcher = mh.launch(2, 2, mh.train_args(manifest, overflow, '--config.optim.learning_rate=1e30',
                                             '--config.optim.max_nonfinite_steps=2'), env, log)
    assert launcher.wait(mh.TIMEOUT) != 0
  log = open(tmp_path / 'overflow.log').read()
  assert 'FloatingPointError: Steps 3-4 all had a non-finite loss' in log, log[-5000:]
  assert listing(overflow) == ['3']

"""Faults a long run survives (README, Training: the faults table), injected: non-finite steps (a
NaN batch, an overflow), failed checkpoint saves (an injected ENOSPC; a full tmpfs where the test may
mount one; a read-only folder where the test is not root), a damaged newest checkpoint (array data,
metadata, data-iterator state; truncated or overwritten), training samples over their time budget;
on 2 processes also saves that fail on one or on both. Tiny configs; the whole module takes ~2 min
on 2 CPU cores, most of it compiling (the 2-process tests are `slow`)."""

import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import grain._src.python.checkpoint.handler as grain_handler
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import pipeline
from sora_jax import train
from sora_jax.common import video_io
from sora_jax.config import geometry, validation
from sora_jax.evaluation import previews
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
  """Truncates to half, or overwrites the second half of (XOR 0xff), one file of a step."""
  damage_file({'arrays': lambda: max(array_files(step_dir), key=os.path.getsize),
               'metadata': lambda: os.path.join(step_dir, 'state/_METADATA'),
               'dataset': lambda: os.path.join(step_dir, 'dataset/process_0-of-1.json')}[part](),
              how)


def damage_file(path: str, how: str):
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    if how == 'truncate':
      f.truncate(size // 2)
    else:  # the whole second half: 64 bytes there sometimes hit nothing a reader uses
      f.seek(size // 2)
      chunk = f.read()
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
  # Where the writer put the flipped bytes decides whether TensorStore cannot read a chunk or reads
  # other values (the checksums differ): either way one line naming the step, without TensorStore's spec.
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r'^Checkpoint step 6 in \S+ does not restore \('
                     r'(DamagedCheckpoint: step 6: \d+ array\(s\) differ from what was saved .*'
                     r'|\w+: Encountered error while reading array index: [^<]*)'
                     r'\); its other steps: \[2, 4\]\.$') as e:
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


# ---- Training samples within a time budget.

def samples_of(workdir: str, step: int) -> list[dict]:
  with open(os.path.join(workdir, 'samples', f'step_{step}', 'samples.json')) as f:
    return json.load(f)['samples']


SIXTEEN_PROMPTS = tuple(previews.sample_prompts(2)) + tuple(
    f'a {c} square moving {d}' for c in ('red', 'green', 'blue', 'yellow', 'white', 'purple', 'orange')
    for d in ('left', 'right'))


def test_a_sampling_budget_stops_after_one_batch_and_the_run_goes_on(tiny_run, tmp_path, caplog):
  config = tiny_config()  # 8 devices, batch 8: previews in batches of 8
  config.sample_every_steps = 3
  config.sample.prompts = SIXTEEN_PROMPTS  # two batches
  config.sample.max_seconds = 1e-9  # runs out during the first
  workdir = str(tmp_path)
  with caplog.at_level('WARNING'):
    train.train(config, workdir)
  warned = [r.getMessage() for r in caplog.records if 'config.sample.max_seconds' in r.getMessage()]
  assert len(warned) == 2 and all('8 of the 16 videos were made' in w for w in warned), warned
  assert read_metrics(workdir) == read_metrics(tiny_run[1])  # trained on, as without samples
  assert listing(workdir) == ['2', '4', '6']
  for step in (3, 6):
    assert [s['prompt'] for s in samples_of(workdir, step)] == list(SIXTEEN_PROMPTS[:8])
  # Batched by 8 or all at once, a video's noise is its own: tiny_run's two are these two.
  for ours, theirs in zip(samples_of(workdir, 6), samples_of(tiny_run[1], 6), strict=False):
    assert ours['prompt'] == theirs['prompt']
    np.testing.assert_array_equal(video_io.read_video(ours['path']),
                                  video_io.read_video(theirs['path']))


def test_the_sampling_budget_is_validated():
  config = tiny_config()
  for bad in (-1.0, float('nan')):
    config.sample.max_seconds = bad
    with pytest.raises(ValueError, match=r'config.sample.max_seconds=.* must be >= 0'):
      validation.validate(config, jax.device_count())


# ---- Two processes: samples within a budget, failed saves.

# sora_jax.train with faults injected by environment variables, run by launch/local.sh as each
# process of a 2-process job. FAIL_SAVES="3:0,1": step 3's data-iterator write raises ENOSPC on
# processes 0 and 1 (in the save's blocking part, as a full disk would). FAIL_WRITES="3:1": step 3's
# background writes fail on process 1 (as array files on a full disk would), with Orbax's barrier
# timeout cut to BARRIER_TIMEOUT seconds. STOPPED_CLOCK="1": the sampling budget's clock stands
# still on process 1 (alone, it would sample on past the budget).
FAULTY_TRAIN = r"""
import errno, os, re, runpy
import grain._src.python.checkpoint.handler as grain_handler
import orbax.checkpoint.options as orbax_options
from orbax.checkpoint._src.checkpointers import async_checkpointer
process = int(os.environ['JAX_PROCESS_ID'])
step_of = lambda path: int(re.match(r'\d+', os.path.basename(str(path))).group())
if os.environ.get('FAIL_SAVES'):
  steps, processes = ({int(s) for s in part.split(',')}
                      for part in os.environ['FAIL_SAVES'].split(':'))
  save = grain_handler.CheckpointHandler.save

  def maybe_fail(self, directory, *args, **kwargs):
    if step_of(os.path.dirname(str(directory))) in steps and process in processes:
      raise OSError(errno.ENOSPC, 'No space left on device (injected)')
    return save(self, directory, *args, **kwargs)
  grain_handler.CheckpointHandler.save = maybe_fail
if os.environ.get('FAIL_WRITES'):
  write_steps, write_processes = ({int(s) for s in part.split(',')}
                                  for part in os.environ['FAIL_WRITES'].split(':'))
  defaults = orbax_options.AsyncOptions.__init__.__defaults__
  orbax_options.AsyncOptions.__init__.__defaults__ = (int(os.environ['BARRIER_TIMEOUT']),
                                                      *defaults[1:])
  start_save = async_checkpointer.AsyncCheckpointer._save

  class Failing:  # a commit future, awaited in the background thread
    def result(self, timeout=None):
      raise OSError(errno.ENOSPC, 'No space left on device (injected, background)')

  async def failing_save(self, tmpdir, *args, **kwargs):
    ops = await start_save(self, tmpdir, *args, **kwargs)
    if step_of(tmpdir.get_final()) in write_steps and process in write_processes:
      ops = [*ops, Failing()]
    return ops
  async_checkpointer.AsyncCheckpointer._save = failing_save
if str(process) in os.environ.get('STOPPED_CLOCK', '').split(','):
  from sora_jax.evaluation import previews
  previews.time = type('Stopped', (), {'perf_counter': staticmethod(lambda: 0.0)})
runpy.run_module('sora_jax.train', run_name='__main__', alter_sys=True)
"""
STALL = 300  # s: a 2-process run here takes ~1.5 min; one that waits in a collective never ends


def run_faulty(manifest, env, tmp_path, name: str, *flags, **faults) -> str:
  """A 2 x 2-device run of tests/multihost_config.py with `faults` (FAULTY_TRAIN's variables) in
  tmp_path/name; its log. Fails the test if it exits non-zero or stalls (then killed)."""
  script = tmp_path / 'faulty_train.py'
  script.write_text(FAULTY_TRAIN)
  args = [sys.executable, str(script), f'--config={mh.CONFIG}',
          f'--config.data.manifest={manifest}', f'--workdir={tmp_path / name}', *flags]
  with open(tmp_path / f'{name}.log', 'w') as log:
    launcher = mh.launch(2, 2, args, dict(env, **faults), log)
    try:
      rc = launcher.wait(STALL)
    except subprocess.TimeoutExpired:
      os.killpg(launcher.pid, signal.SIGKILL)  # local.sh and both processes
      launcher.wait()
      rc = 'a stall'
  text = open(tmp_path / f'{name}.log').read()
  assert rc == 0, f'{name}: {rc}\n{text[-5000:]}'
  return text


def losses_by_process(log: str) -> dict[int, list]:
  """{process: [(step, loss), ...]} from the progress lines each process prints."""
  out = {}
  for p, step, loss in re.findall(r'^\[(\d)\] .*\] step (\d+)/\d+ +loss (\S+)', log, re.M):
    out.setdefault(int(p), []).append((int(step), loss))
  return out


@pytest.mark.slow  # one 2-process launch, ~1.5 min
def test_two_processes_sample_within_a_budget_together(manifest, env, tmp_path):
  log = run_faulty(manifest, env, tmp_path, 'run', '--config.sample_every_steps=3',
                   '--config.sample.max_seconds=1e-9',
                   f'--config.sample.prompts={SIXTEEN_PROMPTS!r}', STOPPED_CLOCK='1')
  for p in (0, 1):  # process 1's own clock never runs out: it follows process 0's decision
    warned = re.findall(rf'^\[{p}\] W.*config.sample.max_seconds=1e-09 ran out.*', log, re.M)
    assert len(warned) == 2, log[-5000:]
    assert all('8 of the 16 videos were made' in w for w in warned), warned
  losses = losses_by_process(log)
  assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 7))
  assert [len(samples_of(str(tmp_path / 'run'), step)) for step in (3, 6)] == [8, 8]
  assert listing(str(tmp_path / 'run')) == ['3', '6']


@pytest.mark.slow  # three 2-process launches, ~3 min
def test_two_processes_fail_a_save_together_and_retry(manifest, env, tmp_path):
  """Step 3's save fails on both processes; on process 1 only (which used to leave process 0 in
  Orbax's next barrier, a device collective, for ever); in process 1's background writes only
  (process 0 fails it at Orbax's barrier timeout, cut to 30 s here). Both processes log it, train
  on, save step 6 and finish; the three runs' logged numbers and checkpoints are the same."""
  enospc = re.escape('OSError: [Errno 28] No space left on device (injected')
  # {run: (faults, what process 0 logs as the cause, what process 1 logs), regular expressions}
  runs = {'both': ({'FAIL_SAVES': '3:0,1'}, enospc, enospc),
          'one': ({'FAIL_SAVES': '3:1'},
                  re.escape('SaveFailedElsewhere: process(es) 1 of 2 could not write'), enospc),
          # Which error a process meets first varies: one of Orbax's barriers timing out (any),
          # or on process 1 its own.
          'background': ({'FAIL_WRITES': '3:1', 'BARRIER_TIMEOUT': '30'}, '[Tt]imed out',
                         f'[Tt]imed out|{enospc}')}
  for name, (faults, *causes) in runs.items():
    log = run_faulty(manifest, env, tmp_path, name, **faults)
    for p in (0, 1):
      failed = re.findall(rf'^\[{p}\] E.*Saving the checkpoint of step 3 failed \(1 in a row.*',
                          log, re.M)
      assert len(failed) == 1 and 'the next checkpoint step tries again' in failed[0], log[-5000:]
      assert re.search(causes[p], failed[0]), failed[0]
    if name == 'background':
      assert re.search(rf'^\[1\] {enospc}, background\)', log, re.M), log[-5000:]
    losses = losses_by_process(log)
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 7))
    assert listing(str(tmp_path / name)) == ['6']  # no partial folder of step 3 left
  numbers = [mh.numbers(mh.read_metrics(str(tmp_path / name))) for name in runs]
  assert numbers[1:] == numbers[:1] * 2
  for item in ('checksums/metadata', 'dataset/process_0-of-2.json', 'dataset/process_1-of-2.json'):
    saved = [open(tmp_path / name / 'checkpoints' / '6' / item).read() for name in runs]
    assert saved[1:] == saved[:1] * 2, item

"""Nothing a user does on the command line can damage a run (issue 18, part 0): a re-run whose config
does not fit the workdir's checkpoints is refused before anything is written; config.json is written
only once a run has started; a failed start in a new workdir leaves nothing behind."""

import json
import os
import re
import shutil

import programs
import pytest
from conftest import tiny_config

from sora_jax import train
from sora_jax.training import resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'tests', 'multihost_config.py')


def _files(workdir) -> dict:
  """{relative path: bytes} of every file under `workdir`."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_another_architecture_is_refused_before_anything_is_written(tiny_run, tmp_path):
  _, base = tiny_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(base, workdir)
  before = _files(workdir)
  config = tiny_config()
  config.model.depth += 2
  config.batch_size *= 2  # allowed on its own; named among the differences
  with pytest.raises(ValueError, match=r"batch_size: 8 -> 16, model\.depth: 2 -> 4; arrays that"
                     r" would not fit: ema/dit/blocks/.* \(2, .*-> \(4, .*Nothing was written.*"
                     r"new --workdir"):
    train.train(config, workdir)
  assert _files(workdir) == before
  config = tiny_config()
  config.optim.mu_dtype = 'bfloat16'  # the optimizer state's dtype: also what checkpoints hold
  with pytest.raises(ValueError, match=r'optim\.mu_dtype'):
    train.train(config, workdir)
  assert _files(workdir) == before


def test_a_resume_that_changes_allowed_keys_keeps_the_previous_config(tiny_run, tmp_path):
  _, base = tiny_run
  workdir = tmp_path / 'run'
  shutil.copytree(base, workdir)
  previous = (workdir / 'config.json').read_text()
  config = tiny_config()
  config.total_steps = 8
  config.optim.learning_rate *= 0.5
  assert resume.config_diff(tiny_config(), config).keys() == {'total_steps', 'optim.learning_rate'}
  state = train.train(config, str(workdir))
  assert int(state['step']) == 8
  assert (workdir / 'config.step_6.json').read_text() == previous
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == 8
  # The same command again: nothing to train, nothing renamed.
  train.train(config, str(workdir))
  assert sorted(p.name for p in workdir.glob('config*.json')) == ['config.json',
                                                                   'config.step_6.json']


def test_a_failed_start_in_a_new_workdir_leaves_nothing(tiny_run, tmp_path):
  _, base = tiny_run
  config = tiny_config()
  config.model.width = 96  # not the base run's architecture: refused before anything is written
  config.init_from = base
  with pytest.raises(ValueError, match=r"is another architecture: model\.width: 48 -> 96;"
                     r" parameters that differ: .*\(2, 48, 48\) -> \(2, 96, 96\)"):
    train.train(config, str(tmp_path / 'new'))
  assert not (tmp_path / 'new').exists()
  # A failure once set-up has begun (here: the compile of the train step).
  config = tiny_config()
  config.init_from = base
  (tmp_path / 'mine').mkdir()  # an empty folder the user made: as new
  for workdir in (tmp_path / 'new', tmp_path / 'mine'):
    with pytest.MonkeyPatch.context() as m:
      m.setattr(train.steps, 'BucketSteps', _fail)
      with pytest.raises(RuntimeError, match='compile failed'):
        train.train(config, str(workdir))
    assert not workdir.exists()


def _fail(*_, **__):
  raise RuntimeError('compile failed')


def test_the_cli_refuses_a_mismatched_resume_in_one_line(tmp_path):
  workdir = str(tmp_path / 'run')
  out = programs.run('sora_jax.train', f'--config={CONFIG}', f'--workdir={workdir}',
                     '--config.total_steps=3', cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  before = _files(workdir)
  out = programs.run('sora_jax.train', f'--config={CONFIG}', f'--workdir={workdir}',
                     '--config.total_steps=3', '--config.model.depth=3', cwd=ROOT)
  assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith('sora_jax.train: error: ')]
  assert len(errors) == 1 and 'model.depth: 1 -> 3' in errors[0], out.stderr[-3000:]
  assert _files(workdir) == before
  out = programs.run('sora_jax.sample', f'--workdir={workdir}', '--prompt=a red circle moving left',
                     f'--output_dir={tmp_path / "out"}', '--num_steps=1', cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]  # the run is intact


INJECT = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from data_pipelines import shapes
from sora_jax import train
read = shapes.ShapesSource.__getitem__
count = [0]
def failing(self, i):  # a decode error in the loader's read threads after some batches
  count[0] += 1
  if count[0] > 40:
    raise SystemError('injected decode failure')
  return read(self, i)
shapes.ShapesSource.__getitem__ = failing
config = tiny_config()
config.total_steps = 20
train.train(config, {workdir!r})
'''


def test_a_data_loader_failure_ends_on_its_own_error_and_keeps_the_saves(tmp_path):
  """The loader's first error is the last thing printed (not Orbax's "cannot schedule new futures
  after shutdown" from a save cut off at exit), and the save in flight is completed."""
  workdir = tmp_path / 'run'
  (tmp_path / 'inject_loader_error.py').write_text(
      INJECT.format(tests=os.path.dirname(__file__), workdir=str(workdir)))
  out = programs.run('inject_loader_error', cwd=str(tmp_path))
  assert out.returncode == 1
  errors = [l for l in out.stderr.splitlines() if re.match(r'^[A-Za-z.]*(Error|Exception): ', l)]
  assert errors[-1] == 'SystemError: injected decode failure', out.stderr[-3000:]
  assert 'cannot schedule new futures' not in out.stderr
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and saved[-1] >= 4, saved

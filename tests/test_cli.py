"""A user's mistake at a program ends in one line on stderr and exit status 2: no traceback, no --help."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import programs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')


@pytest.fixture
def run_dir(tiny_run):
  return tiny_run[1]  # a trained workdir: checkpoints 2, 4, 6 (shared; nothing here writes to it)


def user_error(program, *args, cwd=None) -> str:
  """Runs `python -m sora_jax.PROGRAM ARGS` (a process of its own: tests/programs.py), expecting a
  one-line user error; returns its message."""
  out = programs.run(f'sora_jax.{program}', *args, cwd=cwd or ROOT, timeout=120)
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert 'Traceback' not in out.stderr and 'flags:' not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith(f'sora_jax.{program}: error: ')]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0].split(': error: ', 1)[1]


def test_train_flag_and_config_mistakes(tmp_path):
  demo = os.path.join(CONFIGS, 'demo.py')
  work = f'--workdir={tmp_path / "run"}'
  assert user_error('train', f'--config={demo}', work, '--config.optim.learning_rat=1e-3') == (
      '--config: unknown key \'learning_rat\' Did you mean "learning_rate" instead of'
      ' "learning_rat"?')
  assert 'invalid literal' in user_error('train', f'--config={demo}', work,
                                         '--config.batch_size=many')
  assert 'nope.py' in user_error('train', f'--config={CONFIGS}/nope.py', work)
  assert user_error('train', f'--config={demo}') == '--workdir required (--helpshort lists the flags).'
  message = user_error('train', f'--config={demo}', work, '--config.mesh.data=3')
  assert 'data*fsdp*tensor*context = 3' in message and 'xla_force_host_platform_device_count' in message
  assert 'num_heads=5' in user_error('train', f'--config={demo}', work, '--config.model.num_heads=5')
  assert not os.path.exists(tmp_path / 'run')  # a refused start writes nothing


def test_configs_load_from_any_directory(tmp_path):
  for name in ('demo_conditioned.py', 'demo_upscale.py'):  # they build on demo.py by path
    message = user_error('train', f'--config={CONFIGS}/{name}', f'--workdir={tmp_path}/r',
                         '--config.optim.learning_rat=1', cwd=str(tmp_path))
    assert message.startswith("--config: unknown key 'learning_rat'"), message


def test_sample_and_evaluate_refusals(run_dir, tmp_path):
  out = f'--output_dir={tmp_path}'
  assert user_error('sample', f'--workdir={tmp_path}', '--prompt=a', out) == (
      f"{tmp_path}/config.json not found: is '{tmp_path}' a training workdir?")
  assert user_error('sample', f'--workdir={run_dir}', '--prompt=a') == (
      '--output_dir required (--helpshort lists the flags).')
  sample = lambda *a: user_error('sample', f'--workdir={run_dir}', '--prompt=a', out, *a)
  assert sample('--num_frames=-5') == '--num_frames=-5 is below the training clip of 4.'
  assert 'trained without conditioning' in sample('--num_frames=12')
  assert 'trained without conditioning' in sample(f'--image={tmp_path}/x.png')
  assert sample('--edit_strength=1.5') == '--edit_strength=1.5 must be in (0, 1].'
  assert sample('--checkpoint_step=7') == (
      f'No checkpoint for step 7 in {run_dir}/checkpoints; have [2, 4, 6].')
  assert 'two numbers' in sample('--guidance_interval=0.1')
  evaluate = lambda *a: user_error('evaluate', f'--workdir={run_dir}', f'--output={tmp_path}/e.json',
                                   *a)
  assert evaluate('--checkpoint_step=7').startswith('No checkpoint for step 7')
  assert evaluate('--conditioned=sideways').startswith("Unknown conditioned protocol(s) ['sideways']")
  assert not os.listdir(tmp_path)  # nothing written

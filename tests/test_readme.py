"""README.md's command blocks run as written, in order, on a fresh copy of the repository.

Each ```bash block is taken as is; only the run lengths shrink (short-run overrides appended to
every train / sample / evaluate command, so each is the same program on the same data, for a few
steps) and the installs are skipped (this environment is the installed project). What a user brings
is put where the README says: a tiny random Wan 2.1 pipeline folder stands in for the released one.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import test_latent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_SHORT = ('--config.log_every_steps=1 --config.checkpoint_every_steps=2'
               ' --config.sample_every_steps=0 --config.optim.warmup_steps=1'
               ' --config.num_train_samples=2 --config.sample.num_steps=2'
               ' --config.eval.num_videos=8 --config.eval.batch_size=8 --config.eval.num_timesteps=2'
               ' --config.eval.samples_per_prompt=1')
# The tiny stand-in Wan folder's dimensions (tests/fixtures/gen_wan_*.py) at a 5 x 32 x 32 clip.
WAN_TINY = ('--config.model.wan.num_attention_heads=2 --config.model.wan.attention_head_dim=16'
            ' --config.model.wan.ffn_dim=64 --config.model.wan.num_layers=2'
            ' --config.model.wan.freq_dim=32 --config.model.dtype=float32 --config.model.remat=none'
            ' --config.data.num_frames=5 --config.data.height=32 --config.data.width=32'
            ' --config.data.fps=8 --config.text.max_length=16 --config.diffusion.shift_base_tokens=8'
            ' --config.batch_size=8 --config.mesh.context=1')
SAMPLE_SHORT = '--num_steps=2'


def bash_blocks(text: str) -> list[str]:
  return re.findall(r'```bash\n(.*?)```', text, flags=re.S)


def shorten(command: str) -> str:
  """One logical command (continuation lines joined) with the short-run overrides."""
  parts = [p for p in command.split(' && ') if not p.strip().startswith('pip install')]
  if not parts or parts == ['pytest']:
    return ''
  command = ' && '.join(parts)
  if 'sora_jax.train' in command:
    steps = re.search(r'--config\.total_steps=(\d+)', command)
    if steps:  # keep ratios between consecutive runs (a resume to 2x the steps)
      command = command.replace(steps.group(0),
                                f'--config.total_steps={max(2, int(steps.group(1)) // 100)}')
    else:
      command += ' --config.total_steps=3'
    command += ' ' + TRAIN_SHORT
  if 'sora_jax.compile' in command:  # the real architecture, two of its layers, train step only
    return command + ' --count_flops=false --programs=train --config.model.wan.num_layers=2'
  if 'wan2_1_t2v_1_3b' in command and ('sora_jax.' in command or 'data_pipelines.' in command):
    command += ' ' + WAN_TINY
  if 'sora_jax.sample' in command or 'sora_jax.evaluate' in command:
    command += ' ' + SAMPLE_SHORT
  return command


def readme_script(text: str) -> str:
  lines = []
  for block in bash_blocks(text):
    joined = re.sub(r'\s*\\\n\s*', ' ', block)
    # A multi-line `python -c "..."` stays one command: split only outside double quotes.
    command = ''
    for line in joined.splitlines(keepends=True):
      command += line
      if command.count('"') % 2 == 0:
        lines.append(shorten(command.strip()))
        command = ''
  return 'set -euxo pipefail\n' + '\n'.join(l for l in lines if l) + '\n'


def test_shorten_rewrites_only_run_lengths():
  script = readme_script('```bash\npip install -e . && python -m sora_jax.train --config=c.py \\\n'
                         '    --workdir=w --config.total_steps=5000\n```\n'
                         '```bash\npip install -e ".[test]" && pytest\n```\n')
  assert script.splitlines()[1] == (f'python -m sora_jax.train --config=c.py --workdir=w'
                                    f' --config.total_steps=50 {TRAIN_SHORT}')
  assert len(script.splitlines()) == 2  # the test command is not run by itself


@pytest.mark.slow  # ~20 minutes: every command of the README, each a few steps
def test_readme_commands_run_in_order(tmp_path):
  repo = tmp_path / 'repo'
  files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
  for name in files:  # the working tree as a fresh clone would have it
    if os.path.isfile(os.path.join(ROOT, name)):
      os.makedirs(repo / os.path.dirname(name), exist_ok=True)
      shutil.copy(os.path.join(ROOT, name), repo / name)
  with open(repo / 'README.md') as f:
    script = readme_script(f.read())
  test_latent.wan_pipeline(repo / 'Wan2.1-T2V-1.3B-Diffusers')  # where the README expects it
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env['PYTHONPATH'] = str(repo)  # the copy's code, not the checkout the venv points to
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env['PATH']  # `python`: this one
  out = subprocess.run(['bash', '-c', script], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=3600)
  assert out.returncode == 0, out.stderr[-6000:]
  for path in ('runs/demo/checkpoints', 'runs/demo/eval.json', 'out/samples.json',
               'out/i2v/samples.json', 'out/long/samples.json', 'out/x2/samples.json',
               'runs/demo_latent/checkpoints', 'runs/wan13b_cached/checkpoints', 'inspect.json',
               'prepared/index.json', 'runs/mine_tfds/checkpoints', 'runs/mh/checkpoints/4'):
    assert (repo / path).exists(), path

"""LoRA runs of Wan out to the torch tools and back: sora_jax.export (--format=lora / diffusers),
--config.lora.init_from and sample --lora, on one tiny LoRA run of configs/wan2_1_t2v_1_3b_lora.py
over the tiny random Wan pipeline folder (test_latent.wan_pipeline)."""

import json
import os
import shutil

import numpy as np
import programs
import pytest
import test_latent
from flax import nnx

from sora_jax import train
from sora_jax.config import schema, validation
from sora_jax.inference import restore
from sora_jax.interop import wan_lora, wan_transformer
from sora_jax.parallel import sharding
from sora_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_CONFIG = os.path.join(ROOT, 'configs', 'wan2_1_t2v_1_3b_lora.py')
OTHER_WAN_LORA = os.path.join(ROOT, 'tests', 'fixtures', 'wan_lora_comfy.safetensors')  # 6 out ch.


def lora_config(path):
  """configs/wan2_1_t2v_1_3b_lora.py on the tiny pipeline at `path`, at its dimensions (the
  overrides of test_latent.wan_config)."""
  c = test_latent.tiny_wan(
      schema.config_file(LORA_CONFIG, 'wan2_1_t2v_1_3b_lora.py').get_config(path))
  c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 3, 1, 3
  c.mesh.data, c.mesh.fsdp, c.mesh.context = 2, -1, 1
  c.optim.warmup_steps = 1
  c.sample.num_steps, c.num_train_samples, c.sample_every_steps = 1, 1, 0
  return c


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """(config, workdir): 3 steps of rank-4 adapters (alpha 8: scale 2, so alpha is carried) on a
  float32 base, at a rate that moves them well away from the base."""
  root = tmp_path_factory.mktemp('export')
  config = lora_config(test_latent.wan_pipeline(root / 'Wan-tiny'))
  config.lora.rank, config.lora.alpha, config.lora.base_dtype = 4, 8.0, ''
  config.optim.learning_rate = 3e-2
  workdir = str(root / 'lora_run')
  train.train(config, workdir)
  return config, workdir


def export(*args):
  out = programs.run('sora_jax.export', *args, cwd=ROOT, timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def user_error(program, *args) -> str:
  """The one-line message of a user's mistake (tests/test_cli.py's convention: exit status 2)."""
  out = programs.run(f'sora_jax.{program}', *args, cwd=ROOT, timeout=120)
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith(f'sora_jax.{program}: error: ')]
  assert len(errors) == 1, out.stderr[-3000:]
  return errors[0].split(': error: ', 1)[1]


def dit_flat(params):
  return {p[1:]: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params) if p[0] == 'dit'}


def assert_adapters_equal(x, y):
  assert x.keys() == y.keys()
  for module in x:
    for part in ('lora_a', 'lora_b'):
      np.testing.assert_array_equal(x[module][part], y[module][part], err_msg=f'{module} {part}')


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_lora_config_is_the_1_3b_config_with_adapters(tmp_path):
  path = test_latent.wan_pipeline(tmp_path / 'Wan-tiny')
  config = schema.config_file(LORA_CONFIG, 'wan2_1_t2v_1_3b_lora.py').get_config(path)
  assert (config.lora.rank, config.lora.alpha, config.lora.base_dtype) == (32, 32.0, 'bfloat16')
  assert config.optim.learning_rate == 1e-4 and config.init_from == path
  assert config.sample.prompts and config.sample_every_steps > 0
  assert config.text.path == path and config.model.family == 'wan'
  validation.validate(lora_config(path).copy_and_resolve_references(), 8)
  # Without the folder: the released architecture, enough to compile ahead of time (one example
  # over 4 chips of context parallelism).
  validation.validate(schema.config_file(LORA_CONFIG, 'wan2_1_t2v_1_3b_lora.py').get_config(), 4,
                      weights=False)


def test_export_lora_sample_lora_and_init_from(lora_run, tmp_path):
  config, workdir = lora_run
  path = str(tmp_path / 'out' / 'adapters.safetensors')
  export(f'--workdir={workdir}', f'--output={path}', '--format=lora')

  # The file holds exactly the run's EMA adapters, with its rank and alpha.
  adapters, rank, alpha = wan_lora.import_lora(path, state_lib.wan_config(config))
  assert (rank, alpha) == (4, 8.0)
  _, mesh, graphdef, params, _ = restore.load(workdir)
  _, ema = wan_lora.split_adapters(dit_flat(params))
  assert_adapters_equal(adapters, ema)

  # What sample --lora does, on the base alone: the LoRA run's model, to float32 rounding.
  base_config = config.copy_and_resolve_references()
  base_config.lora.rank = 0
  base_graphdef, _ = restore.abstract_params(base_config, mesh)
  base = nnx.split_state(params, nnx.LoRAParam, nnx.Param)[1]
  with_file = restore.merge_lora(base, adapters, alpha / rank)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
  context = rng.standard_normal((2, 16, 32)).astype(np.float32)
  t = np.array([0.3, 0.9], np.float32)
  forward = lambda g, p: nnx.merge(g, p).dit(latents, t, context)
  want = forward(graphdef, params)
  lora_effect, err = rel_l2(forward(base_graphdef, base), want), rel_l2(
      forward(base_graphdef, with_file), want)
  print(f'adapters change the output by {lora_effect:.2e}; the merged file matches to {err:.2e}')
  assert lora_effect > 1e-2 and err < 1e-5

  # init_from: a new run's adapters (and EMA) are the file's, bit for bit.
  new = config.copy_and_resolve_references()
  new.lora.init_from = path
  state_mesh = sharding.make_mesh(validation.validate(new, 8))
  _, state, state_sh = state_lib.init(new, state_mesh)
  state = state_lib.init_from(new, state, state_sh)
  for key in ('params', 'ema'):
    assert_adapters_equal(wan_lora.split_adapters(dit_flat(state[key]))[1], adapters)
  # With config.lora.alpha = 0 (scale 1) the file's alpha / rank = 2 is folded into lora_b.
  new.lora.alpha = 0.0
  _, state, _ = state_lib.init(new, state_mesh)
  folded = wan_lora.split_adapters(dit_flat(state_lib.init_from(new, state, state_sh)['params']))[1]
  assert_adapters_equal(folded, {m: {'lora_a': a['lora_a'], 'lora_b': 2 * a['lora_b']}
                                 for m, a in adapters.items()})

  # The CLI end to end, at half strength on top of the run's own adapters.
  out = programs.run('sora_jax.sample', f'--workdir={workdir}', f'--lora={path}',
                     '--lora_scale=0.5', '--num_steps=1', '--prompt=a cat',
                     f'--output_dir={tmp_path / "samples"}', cwd=ROOT, timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'samples' / 'samples.json') as f:
    assert len(json.load(f)['samples']) == 1


def test_lora_init_from_mismatches_are_named(lora_run, tmp_path):
  config, _ = lora_run
  path = str(tmp_path / 'a.safetensors')
  adapters = {('blocks', 'attn1', 'to_q'): {
      'lora_a': np.ones((2, 32, 4), np.float32), 'lora_b': np.ones((2, 4, 32), np.float32)},
      ('proj_out',): {'lora_a': np.ones((32, 4), np.float32),
                      'lora_b': np.ones((4, 16), np.float32)}}
  wan_lora.export_lora(adapters, 4, 8.0, path)
  c = config.copy_and_resolve_references()
  c.lora.init_from = path
  c.lora.rank = 8
  with pytest.raises(ValueError, match=r'has rank 4; config.lora.rank=8: set --config.lora.rank=4'):
    state_lib.lora_file(c)
  c.lora.rank, c.lora.alpha = 4, 4.0
  with pytest.raises(ValueError, match=r'has alpha 8; config.lora.alpha=4'):
    state_lib.lora_file(c)
  c.lora.alpha = 8.0
  with pytest.raises(ValueError, match=r'adapts 1 module\(s\) this run does not .*: proj_out$'):
    state_lib.lora_file(c)
  c.lora.targets = r'proj_out|blocks/attn1/to_q'
  assert state_lib.lora_file(c)[1:] == (4, 8.0)


def test_diffusers_export_is_the_merged_model_and_resume_ignores_init_from(lora_run, tmp_path):
  config, workdir = lora_run
  folder = str(tmp_path / 'merged')
  export(f'--workdir={workdir}', f'--output={folder}', '--format=diffusers')
  _, _, _, params, _ = restore.load(workdir)
  base, adapters = wan_lora.split_adapters(dit_flat(params))
  want = wan_lora.merge(base, adapters, 4, 8.0)
  loaded = wan_transformer.load_wan_transformer(folder).model
  got = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(loaded))}
  assert got.keys() == want.keys()
  for p, v in want.items():
    np.testing.assert_array_equal(got[p], v, err_msg='/'.join(p))

  # A resumed run takes its adapters from its checkpoint, whatever lora.init_from says.
  other = str(tmp_path / 'other.safetensors')
  wan_lora.export_lora({m: {'lora_a': a['lora_a'], 'lora_b': a['lora_b'] + 1}
                        for m, a in adapters.items()}, 4, 8.0, other)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  c = config.copy_and_resolve_references()
  c.lora.init_from = other
  c.sample_every_steps = c.total_steps  # samples were written at the end already
  state = train.train(c, resumed)
  _, _, _, raw, _ = restore.load(workdir, use_ema=False)
  assert_adapters_equal(wan_lora.split_adapters(dit_flat(state['params']))[1],
                        wan_lora.split_adapters(dit_flat(raw))[1])


def test_export_and_sample_lora_errors(lora_run, tmp_path):
  config, workdir = lora_run
  dit_run, full_run, no_checkpoint = (tmp_path / n for n in ('dit', 'full', 'empty'))
  for run, c in ((dit_run, schema.base_config()), (full_run, lora_config(config.init_from)),
                 (no_checkpoint, config)):
    if run == full_run:
      c.lora.rank = 0
    os.makedirs(run)
    with open(run / 'config.json', 'w') as f:
      f.write(c.to_json())
  out = str(tmp_path / 'x.safetensors')
  assert "model.family='dit' run" in user_error(
      'export', f'--workdir={dit_run}', f'--output={out}', '--format=lora')
  assert 'full fine-tuning run (config.lora.rank=0)' in user_error(
      'export', f'--workdir={full_run}', f'--output={out}', '--format=lora')
  assert 'config.json not found' in user_error(
      'export', f'--workdir={tmp_path / "nowhere"}', f'--output={out}', '--format=diffusers')
  assert 'No checkpoint in' in user_error(
      'export', f'--workdir={no_checkpoint}', f'--output={out}', '--format=lora')
  assert 'No checkpoint for step 7' in user_error(
      'export', f'--workdir={workdir}', f'--output={out}', '--format=lora', '--checkpoint_step=7')
  assert 'exists: --format=diffusers writes a new folder' in user_error(
      'export', f'--workdir={workdir}', f'--output={dit_run}', '--format=diffusers')
  sample = ('--prompt=a cat', f'--output_dir={tmp_path}')
  assert "for Wan 2.1 models (model.family='wan'); this run is model.family='dit'" in user_error(
      'sample', f'--workdir={dit_run}', f'--lora={OTHER_WAN_LORA}', *sample)
  message = user_error('sample', f'--workdir={workdir}', f'--lora={OTHER_WAN_LORA}', *sample)
  assert 'does not fit this Wan model' in message and 'proj_out' in message, message

"""Cascaded super-resolution (sora_jax/inference/upscale.py): resampling, config checks, train -> chain."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import train
from sora_jax.common import video_io
from sora_jax.config import validation
from sora_jax.diffusion import cascade
from sora_jax.evaluation import suite
from sora_jax.inference import upscale

sys.path.insert(0, os.path.dirname(__file__))
import programs  # noqa: E402


def up_config():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.upscale.factor = 2  # 16x16 -> 32x32
  c.data.height = c.data.width = 32
  c.model.patch_size = (2, 8, 8)
  c.diffusion.prediction = 'x0'  # config.upscale.residual
  return c


def test_downsample_and_upsample():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 6, 3))
  up_nearest = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
  np.testing.assert_allclose(cascade.downsample(up_nearest, 2), x, rtol=1e-6, atol=1e-6)
  assert cascade.upsample(x, 2).shape == (2, 3, 8, 12, 3)
  np.testing.assert_allclose(cascade.upsample(jnp.full((1, 2, 3, 3), 0.5), 2), 0.5, rtol=1e-6)
  # Noise level 0 is the upsampled clip; 1 is the noise.
  noise = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 8, 12, 3))
  c = up_config()
  cond, base = cascade.condition(x, c, 0.0, noise)
  np.testing.assert_allclose(cond, cascade.upsample(x, 2))
  np.testing.assert_allclose(base, cascade.upsample(x, 2))
  cond, base = cascade.condition(x, c, jnp.asarray([1.0, 1.0]), noise)
  np.testing.assert_allclose(cond, noise)
  np.testing.assert_allclose(base, cascade.upsample(x, 2))  # the residual base stays clean
  c.upscale.residual = False
  assert cascade.condition(x, c, 0.5, noise)[1] is None


@pytest.mark.parametrize('change, message', [
    (dict(factor=5), 'divisible by config.upscale.factor=5'),
    (dict(noise_aug=1.5), 'noise_aug=1.5'),
    (dict(factor=0), 'factor=0'),
    (dict(residual=True, prediction='velocity'), 'needs config.diffusion.prediction="x0"'),
])
def test_config_validation(change, message):
  c = up_config()
  for k, v in change.items():
    (c.diffusion if k == 'prediction' else c.upscale)[k] = v
  with pytest.raises(ValueError, match=message):
    validation.validate(c, 1)
  c = up_config()
  c.condition.mix = (('none', 0.5), ('first', 0.5))
  with pytest.raises(ValueError, match='without given frames'):
    validation.validate(c, 1)


@pytest.fixture(scope='module')
def runs(tiny_run, tmp_path_factory):
  """A tiny base model at 16x16 (conftest's shared tiny_run) and a tiny upscaler 16x16 -> 32x32, a
  few steps each."""
  up_dir = str(tmp_path_factory.mktemp('up'))
  train.train(up_config(), up_dir)
  return tiny_run[1], up_dir


def test_upscaler_trains_and_writes_comparison_samples(runs):
  _, up_dir = runs
  import glob  # pylint: disable=g-import-not-at-top
  videos = sorted(glob.glob(f'{up_dir}/samples/step_6/*.mp4'))
  assert videos
  # bilinear | upscaled | real, side by side at 32x32 each.
  assert video_io.read_video(videos[0]).shape == (4, 32, 96, 3)


def test_sample_chains_the_upscaler(runs, tmp_path):
  base_dir, up_dir = runs
  out = programs.run(
      'sora_jax.sample', f'--workdir={base_dir}', f'--upscale_workdir={up_dir}',
      f'--output_dir={tmp_path}', '--num_steps=2', '--prompt=a red circle moving left',
      '--prompt=a blue square moving up')
  assert out.returncode == 0, out.stderr[-3000:]
  samples = json.loads((tmp_path / 'samples.json').read_text())['samples']
  assert len(samples) == 2
  assert video_io.read_video(samples[0]['path']).shape == (4, 32, 32, 3)
  # A base model of the wrong size, and an upscaler given as --workdir, are refused before loading.
  bad = programs.run('sora_jax.sample', f'--workdir={up_dir}', f'--upscale_workdir={up_dir}',
                     f'--output_dir={tmp_path}', '--prompt=x', timeout=120)
  assert bad.returncode != 0 and 'is an upscaler' in bad.stderr


def test_upscaler_matches_input_size(runs):
  _, up_dir = runs
  u = upscale.Upscaler(up_dir)
  u.check_input(4, 16, 16)
  with pytest.raises(ValueError, match='upscales 16x16 videos'):
    u.check_input(4, 32, 32)
  # Any length: clips of the upscaler's 4 frames, the last one padded.
  low = np.zeros((1, 6, 16, 16, 3), np.uint8)
  assert u(low, ['a red circle moving left']).shape == (1, 6, 32, 32, 3)
  # --upscale_noise: the input's noise level replaces the run's config.upscale.sample_noise.
  low = np.random.default_rng(0).integers(0, 256, (1, 4, 16, 16, 3), np.uint8)
  same = [upscale.Upscaler(up_dir, noise=n, num_steps=2)(low, ['a red circle moving left'])
          for n in (0.05, 0.05, 0.6)]
  assert np.array_equal(same[0], same[1]) and not np.array_equal(same[0], same[2])
  with pytest.raises(ValueError, match='upscale_noise=1.0'):
    upscale.Upscaler(up_dir, noise=1.0)


def test_evaluate_upscaler_reports_psnr_against_bilinear(runs, tmp_path):
  base_dir, up_dir = runs
  r = suite.evaluate(up_dir, str(tmp_path / 'eval.json'), num_steps=2)
  for split in ('seen', 'held_out'):
    u = r[split]['upscaling']
    assert u['num_videos'] == 8 and set(u['psnr_db']) == {'upscaled', 'bilinear'}
    assert 5 < u['psnr_db']['bilinear'] < 60
  chained = suite.evaluate(base_dir, str(tmp_path / 'chain.json'), num_steps=2,
                              upscale_workdir=up_dir, flow_loss=False)
  assert chained['seen']['adherence']['num_videos'] > 0
  assert chained['upscale_noise'] == 0.05 and r['upscale_noise'] == 0.05  # the config's default
  assert 0 <= chained['seen']['adherence']['stray_fraction'] < 1

"""Latent diffusion end to end: a VAE trained by the train loop, a DiT trained in its latent space, and
a Wan pipeline folder (transformer + VAE + umT5) fine-tuned with configs/wan2_1_t2v_1_3b.py."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import pipeline
from sora_jax import train
from sora_jax.common import video_io
from sora_jax.config import geometry, validation
from sora_jax.evaluation import suite
from sora_jax.inference import frame_inputs
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import restore, sampling
from sora_jax.parallel import sharding
from sora_jax.training import factory
from sora_jax.training import state as state_lib

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def vae_config():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.model.family = 'vae'
  c.data.num_frames, c.data.height, c.data.width = 5, 16, 16
  c.vae.base_dim, c.vae.z_dim, c.vae.dim_mult, c.vae.num_res_blocks = 8, 4, (1, 2), 1
  c.vae.temperal_downsample = (True,)  # 2x temporal, 2x spatial: 5x16x16 -> 3x8x8x4
  c.total_steps, c.checkpoint_every_steps = 4, 4
  c.optim.learning_rate = 1e-3
  return c


@pytest.fixture(scope='module')
def vae_run(tmp_path_factory):
  config = vae_config()
  workdir = str(tmp_path_factory.mktemp('vae'))
  train.train(config, workdir)
  return config, workdir


def test_vae_trains_with_the_train_loop(vae_run):
  config, workdir = vae_run
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r['loss']) for r in rows)
  # Reconstructions are written next to their inputs (stacked vertically).
  with open(os.path.join(workdir, 'samples', 'step_4', 'samples.json')) as f:
    path = json.load(f)['samples'][0]['path']
  assert video_io.read_video(path).shape == (5, 32, 16, 3)
  result = suite.evaluate(workdir, os.path.join(workdir, 'eval.json'))
  for split in ('seen', 'held_out'):
    rec = result[split]['reconstruction']
    assert rec['num_videos'] == config.eval.num_videos and 0 < rec['psnr_db'] < 100


def latent_dit_config(vae_dir):
  """A tiny DiT in the tiny VAE's latent space: 5x16x16 pixels -> 3x8x8 latents, 1x2x2 patches."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.autoencoder = vae_dir
  config.data.num_frames, config.data.height, config.data.width = 5, 16, 16
  config.model.patch_size = (1, 2, 2)
  return config


def test_latent_dit_trains_and_samples(vae_run, tmp_path):
  _, vae_dir = vae_run
  config = latent_dit_config(vae_dir)
  assert geometry.model_clip_shape(config) == (3, 8, 8)
  workdir = str(tmp_path / 'dit')
  train.train(config, workdir)
  assert os.path.exists(os.path.join(vae_dir, 'latent_stats.json'))
  with open(os.path.join(workdir, 'samples', f'step_{config.total_steps}', 'samples.json')) as f:
    path = json.load(f)['samples'][0]['path']
  assert video_io.read_video(path).shape == (5, 16, 16, 3)  # decoded back to pixels
  # Latents the model trains on are normalised per channel.
  f = frozen_lib.Frozen(config)
  clips = pipeline.eval_batches(config, 'train', 8, 8)[0]['video']
  z = np.asarray(f.encode_batch({'video': jnp.asarray(clips)})['video'])
  assert z.shape == (8, 3, 8, 8, 4)
  assert abs(z.mean()) < 0.5 and 0.5 < z.std() < 2.0


def test_autoencoder_config_errors(vae_run):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  _, vae_dir = vae_run
  config = tiny_config()
  config.autoencoder = vae_dir
  config.data.num_frames = 4  # 2x temporal causal VAE needs 1 + 2k frames
  with pytest.raises(ValueError, match=r'config\.data\.num_frames'):
    validation.validate(config, 8)
  config.data.num_frames, config.model.patch_size = 5, (2, 2, 2)  # 3 latent frames
  with pytest.raises(ValueError, match='latent clip'):
    validation.validate(config, 8)
  config.autoencoder = os.path.join(FIXTURES, 'umt5_tiny')
  with pytest.raises(ValueError, match='temperal_downsample'):
    validation.validate(config, 8)


def wan_pipeline(root, transformer=os.path.join(FIXTURES, 'wan_transformer_tiny_t2v'), *,
                 transformer_2=None, model_index=None, vae='wan_vae_tiny'):
  """A diffusers WanPipeline folder of tiny random parts (what a user downloads, in miniature):
  `transformer` (and an A14B pipeline's `transformer_2`, and its `model_index.json`), the fixture
  `vae` and the tiny umT5."""
  shutil.copytree(transformer, root / 'transformer')
  if transformer_2:
    shutil.copytree(transformer_2, root / 'transformer_2')
  if model_index:
    shutil.copy(model_index, root / 'model_index.json')
  shutil.copytree(os.path.join(FIXTURES, vae), root / 'vae')
  os.makedirs(root / 'text_encoder')
  os.makedirs(root / 'tokenizer')
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(os.path.join(FIXTURES, 'umt5_tiny', name), root / 'text_encoder')
  shutil.copy(os.path.join(FIXTURES, 'umt5_tiny', 'spiece.model'), root / 'tokenizer')
  return str(root)


def tiny_wan(c):
  """A Wan config at the tiny fixture transformer's dims; 5 frames of 32x32 -> 2x4x4 latents -> 8
  tokens."""
  c.model.wan.num_attention_heads, c.model.wan.attention_head_dim = 2, 16
  c.model.wan.ffn_dim, c.model.wan.num_layers, c.model.wan.freq_dim = 64, 2, 32
  c.model.dtype, c.model.remat = 'float32', 'none'
  c.data.num_frames, c.data.height, c.data.width, c.data.fps = 5, 32, 32, 8
  c.text.max_length = 16
  c.diffusion.shift_base_tokens = 8
  return c


def wan_config(path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'wan_cfg', os.path.join(os.path.dirname(FIXTURES), '..', 'configs', 'wan2_1_t2v_1_3b.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = tiny_wan(module.get_config(path))
  c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 2, 1, 2
  c.mesh.data, c.mesh.fsdp, c.mesh.context = 2, -1, 1
  c.optim.warmup_steps = 1
  c.sample.num_steps, c.num_train_samples = 2, 2
  c.eval.num_videos, c.eval.batch_size, c.eval.num_timesteps = 8, 8, 2
  return c


def test_wan_configs_carry_the_released_architectures():
  """Without a weights folder the Wan configs describe the released models (shipped config.json
  files), so `sora_jax.compile` needs no download."""
  def load(name):
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(FIXTURES), '..', 'configs', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()

  counts = {}
  for name in ('wan2_1_t2v_1_3b', 'wan2_1_t2v_14b'):
    config = load(name)
    assert not config.init_from
    # umT5-XXL width and Wan-VAE geometry from the architecture folders' config.json files.
    assert factory.text_width(config) == 4096
    assert geometry.model_clip_shape(config) == (21, 60, 104)
    abstract = nnx.eval_shape(lambda: factory.build(config, nnx.Rngs(0)))
    counts[name] = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert counts['wan2_1_t2v_1_3b'] == 1_418_996_800  # diffusers' Wan2.1-T2V-1.3B transformer
  assert 14.0e9 < counts['wan2_1_t2v_14b'] < 14.5e9, counts  # Wan2.1-T2V-14B: "14B"


@pytest.mark.slow  # ~30 s; the Wan parts' parity tests run in CI
def test_wan_pipeline_finetunes_and_samples(tmp_path):
  path = wan_pipeline(tmp_path / 'Wan-tiny')
  config = wan_config(path)
  mesh = sharding.make_mesh(validation.validate(config, 8))
  # init_from: the state's transformer is the checkpoint's, bit for bit in what it computes.
  graphdef, state, state_sh = state_lib.init(config, mesh)
  state = state_lib.init_from(config, state, state_sh)
  from sora_jax.interop import \
      wan_transformer  # pylint: disable=g-import-not-at-top
  reference = wan_transformer.load_wan_transformer(path)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
  context = rng.standard_normal((2, 16, 32)).astype(np.float32)
  ours = nnx.merge(graphdef, state['params']).dit(latents, jnp.array([0.3, 0.9]), context)
  np.testing.assert_allclose(ours, reference(latents, jnp.array([300.0, 900.0]), context),
                             rtol=1e-4, atol=1e-4)
  # Fine-tune (frozen umT5 + Wan-VAE latents) and sample.
  workdir = str(tmp_path / 'run')
  train.train(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert all(np.isfinite(json.loads(line)['loss']) for line in f)
  with open(os.path.join(workdir, 'samples', 'step_2', 'samples.json')) as f:
    path0 = json.load(f)['samples'][0]['path']
  assert video_io.read_video(path0).shape == (5, 32, 32, 3)
  # Only the transformer is trained: no umT5 / VAE weights in the train state.
  _, _, params, _ = restore.load(workdir)[1:]
  assert set(nnx.to_pure_dict(params)) == {'dit'}


def test_conditioning_through_the_autoencoder(vae_run, tmp_path):
  """Image-to-video and sliding windows in latent space: the image is a one-latent-frame condition."""
  _, vae_dir = vae_run
  config = latent_dit_config(vae_dir)
  config.condition.mix = (('none', 0.5), ('first', 0.25), ('first_k', 0.25))
  config.condition.max_frames = 1
  workdir = str(tmp_path / 'dit')
  train.train(config, workdir)
  image = np.zeros((16, 16, 3), np.uint8)
  image[4:12, 4:12, 0] = 255
  video_io.write_mp4(str(tmp_path / 'first.mp4'), image[None])
  # The given latent frame comes out exactly as encoded.
  clip, given_pix, given = frame_inputs.cli_inputs(config, image=str(tmp_path / 'first.mp4'))
  assert given.tolist() == [1, 0, 0] and given_pix.tolist() == [1, 0, 0, 0, 0]
  config, mesh, graphdef, params, _ = restore.load(workdir)
  f = frozen_lib.Frozen(config)
  latents = np.asarray(f.encode(jnp.asarray(clip[None])))
  generate = sampling.make_generate(graphdef, config, frozen=f, num_steps=2, guidance_scale=2.0)
  with jax.set_mesh(mesh):
    out = sampling.generate_videos(generate, params, ['a red square moving left'], config=config,
                                   mesh=mesh, seed=0, batch_size=1, frozen=f, video=latents[0],
                                   given=given, decode=False)
  np.testing.assert_array_equal(out[0, 0], latents[0, 0])
  assert np.abs(out[0, 1:] - latents[0, 1:]).max() > 0
  # CLI: image-to-video of 13 pixel frames = 7 latent frames by windows of 3 overlapping by 1.
  res = subprocess.run(
      [sys.executable, '-m', 'sora_jax.sample', f'--workdir={workdir}', f'--output_dir={tmp_path}',
       '--num_steps=2', '--num_frames=13', '--overlap=1', f'--image={tmp_path / "first.mp4"}',
       '--prompt=a red square moving left'], capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(tmp_path / 'samples.json') as fh:
    path = json.load(fh)['samples'][0]['path']
  assert video_io.read_video(path).shape == (13, 16, 16, 3)

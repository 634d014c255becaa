"""Wan 2.2 VAE (is_residual, patch_size 2): parity with diffusers' AutoencoderKLWan (fixture from
tests/fixtures/gen_wan22_vae.py), chunked == full-sequence, tiling, the name table, config errors,
and that Wan 2.1 folders load as before."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sora_jax.config import geometry
from sora_jax.interop import wan_vae
from sora_jax.models import vae

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
MODEL_DIR = os.path.join(FIXTURES, 'wan22_vae_tiny')
WAN21_DIR = os.path.join(FIXTURES, 'wan_vae_tiny')

# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json, less its 48 + 48 latent statistics.
TI2V_5B = dict(_class_name='AutoencoderKLWan', attn_scales=[], base_dim=160, clip_output=False,
               decoder_base_dim=256, dim_mult=[1, 2, 4, 4], dropout=0.0, in_channels=12,
               is_residual=True, latents_mean=None, latents_std=None, num_res_blocks=2,
               out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
               temperal_downsample=[False, True, True], z_dim=48)


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(os.path.join(FIXTURES, 'wan22_vae_tiny_io.npz')))


@pytest.fixture(scope='module')
def loaded():
  return wan_vae.load_wan_vae(MODEL_DIR)


def test_parity_with_diffusers(loaded, ref):
  assert ref['video'].shape == (1, 9, 32, 48, 3) and ref['video_mean'].shape == (1, 3, 2, 3, 8)
  assert (loaded.spatial_factor, loaded.temporal_factor) == (16, 4)
  video_mean, image_mean = loaded.encode(ref['video']), loaded.encode(ref['image'])
  decoded = loaded.decode(ref['latents'])
  errors = {
      'video_mean': rel_l2(video_mean, ref['video_mean']),
      'image_mean': rel_l2(image_mean, ref['image_mean']),
      # diffusers' decode(z).sample is the clamp of decoded_raw (asserted by the generator).
      'decoded': rel_l2(decoded, np.clip(ref['decoded_raw'], -1, 1)),
  }
  print('Wan 2.2 rel L2 vs diffusers:', errors)
  assert max(errors.values()) < 1e-4, errors
  assert decoded.shape == (1, 9, 32, 48, 3)
  # Causal: an image is the video's first frame, in the same latent space.
  np.testing.assert_allclose(loaded.encode(ref['video'][:, :1]), video_mean[:, :1], atol=1e-5)


def test_chunked_equals_full_sequence(loaded, ref):
  mean_f, _ = jax.jit(lambda m, x: m.encode(x, chunked=False))(loaded.model,
                                                               jnp.asarray(ref['video']))
  mean_c = loaded.encode(ref['video'])  # chunked: first frame, then a scan over 4-frame chunks
  out_f = jax.jit(lambda m, z: m.decode(z, chunked=False, clamp=False))(
      loaded.model, jnp.asarray(ref['latents']))
  out_c = loaded.decode(ref['latents'])  # chunked: one latent frame per scan step (clamped)
  errors = {'mean chunked vs full': rel_l2(mean_c, mean_f),
            'mean full vs diffusers': rel_l2(mean_f, ref['video_mean']),
            'decode chunked vs full': rel_l2(out_c, jnp.clip(out_f, -1, 1)),
            'decode full vs diffusers (unclamped)': rel_l2(out_f, ref['decoded_raw'])}
  print('Wan 2.2 full-sequence rel L2:', errors)
  assert errors['mean chunked vs full'] < 1e-5 and errors['decode chunked vs full'] < 1e-5
  assert max(errors.values()) < 1e-4, errors


def test_spatial_tiling_parity(ref):
  tiled = wan_vae.load_wan_vae(MODEL_DIR)
  tiled.enable_tiling(16, 16, 8, 8)  # as the fixture: encode tiles count patchified pixels
  image_mean_tiled = tiled.encode(ref['image'])
  tiled.enable_tiling(32, 32, 16, 16)  # decode: 2-latent tiles every 1, 8 patchified px blends
  decoded_tiled = tiled.decode(ref['latents'][:, :1])
  errors = {'image_mean_tiled': rel_l2(image_mean_tiled, ref['image_mean_tiled']),
            'decoded_tiled': rel_l2(decoded_tiled, ref['decoded_tiled'])}
  assert rel_l2(ref['image_mean_tiled'], ref['image_mean']) > 1e-2  # tiling changes the result
  print('Wan 2.2 tiled rel L2 vs diffusers:', errors)
  assert max(errors.values()) < 1e-4, errors
  # The model's own tiled paths (all tiles in one program) agree with the wrapper's.
  m = tiled.model
  np.testing.assert_allclose(m.decode_tiled(jnp.asarray(ref['latents'][:, :1]), tile=(32, 32),
                                            stride=(16, 16)), decoded_tiled, atol=1e-5)


def test_patchify_roundtrip_and_layout():
  x = jnp.arange(2 * 1 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 1, 4, 6, 3)
  p = vae.patchify(x, 2)
  assert p.shape == (2, 1, 2, 3, 12)
  np.testing.assert_array_equal(vae.unpatchify(p, 2), x)
  # diffusers' channel order: c * 4 + (column offset) * 2 + (row offset).
  np.testing.assert_array_equal(p[0, 0, 0, 0, 4 * 1 + 2 * 1 + 0], x[0, 0, 0, 1, 1])
  np.testing.assert_array_equal(p[0, 0, 0, 0, 4 * 2 + 2 * 0 + 1], x[0, 0, 1, 0, 2])


def test_ti2v_5b_config_builds():
  """The released TI2V-5B config (clip_output included) builds: 48 latent channels at 1/16."""
  kwargs = vae.config_from_dict(TI2V_5B)
  model = nnx.eval_shape(lambda: vae.CausalVAE(**kwargs, rngs=nnx.Rngs(0)))
  assert (model.spatial_factor, model.temporal_factor, model.video_channels) == (16, 4, 3)
  video = jax.ShapeDtypeStruct((1, 5, 32, 32, 3), jnp.float32)
  mean = jax.eval_shape(lambda m, v: m.encode(v, chunked=False)[0], model, video)
  assert mean.shape == (1, 2, 2, 2, 48)
  table = {wan_vae.diffusers_key(k) for k, _ in nnx.to_flat_state(nnx.state(model))}
  for key in ('encoder.down_blocks.1.downsampler.time_conv.weight',
              'encoder.down_blocks.0.downsampler.resample.1.weight',
              'decoder.up_blocks.0.upsampler.time_conv.weight',
              'decoder.up_blocks.2.upsampler.resample.1.weight',
              'decoder.up_blocks.3.resnets.2.conv2.weight'):
    assert key in table, key
  assert not any('avg_shortcut' in k or 'upsamplers' in k for k in table)
  # diffusers 0.42.1 builds this config (meta device) with 196 tensors, 704,688,668 parameters.
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert (len(table), sum(x.size for x in leaves)) == (196, 704_688_668)


def test_config_errors():
  residual = {**TI2V_5B, 'base_dim': 8, 'decoder_base_dim': 8}
  build = lambda c: nnx.eval_shape(
      lambda: vae.CausalVAE(**vae.config_from_dict(c), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='AvgDown3D shortcut'):
    build({**residual, 'dim_mult': [1, 2, 2, 4]})  # last stage 16 -> 32 channels, no downsample
  with pytest.raises(ValueError, match='in_channels=3 is not a multiple of patch_size'):
    build({**residual, 'in_channels': 3})
  with pytest.raises(ValueError, match='scale_factor_spatial=8 disagrees'):
    build({**residual, 'scale_factor_spatial': 8})
  with pytest.raises(ValueError, match='Unknown AutoencoderKLWan config fields'):
    build({**residual, 'no_such_field': 1})


def test_name_table_errors(tmp_path):
  shutil.copy(os.path.join(MODEL_DIR, 'config.json'), tmp_path)
  tensors = load_file(os.path.join(MODEL_DIR, wan_vae.WEIGHTS_NAME))
  del tensors['decoder.up_blocks.1.upsampler.time_conv.bias']
  tensors['encoder.down_blocks.1.avg_shortcut.weight'] = np.zeros(3, np.float32)
  save_file(tensors, str(tmp_path / wan_vae.WEIGHTS_NAME))
  with pytest.raises(ValueError, match=r'missing keys \(1\): decoder.up_blocks.1.upsampler.'
                                       r'time_conv.bias.*unexpected keys \(1\): encoder.'
                                       r'down_blocks.1.avg_shortcut.weight'):
    wan_vae.load_wan_vae(str(tmp_path))


def test_latent_statistics(loaded, ref):
  config = json.load(open(os.path.join(MODEL_DIR, 'config.json')))
  mean, std = loaded.model.latent_stats()
  assert mean.shape == std.shape == (8,)
  np.testing.assert_allclose(loaded.normalize_latents(ref['video_mean']),
                             (ref['video_mean'] - np.array(config['latents_mean']))
                             / np.array(config['latents_std']), rtol=1e-6, atol=1e-6)


def test_wan21_folder_loads_as_before():
  ref = dict(np.load(os.path.join(FIXTURES, 'wan_vae_tiny_io.npz')))
  v21 = wan_vae.load_wan_vae(WAN21_DIR)
  assert (v21.spatial_factor, v21.model.patch_size, v21.model.video_channels) == (8, 1, 3)
  assert not hasattr(v21.model.encoder.down_blocks[0], 'downsampler')  # Wan 2.1 blocks
  assert rel_l2(v21.encode(ref['image']), ref['image_mean']) < 1e-4


def test_autoencoder_geometry():
  """The pipelines' latent geometry (config.autoencoder) counts patch_size: Wan 2.2 is x16."""
  assert geometry.autoencoder_geometry(MODEL_DIR) == dict(temporal=4, spatial=16, z_dim=8)
  assert geometry.autoencoder_geometry(WAN21_DIR) == dict(temporal=4, spatial=8, z_dim=4)

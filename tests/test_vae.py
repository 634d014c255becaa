"""Wan 2.1 causal VAE: parity with diffusers' AutoencoderKLWan (fixture from
tests/fixtures/gen_wan_vae.py), chunked == full-sequence, causality, tiling, loading errors, and a
short training run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from data_pipelines import shapes
from sora_jax.interop import wan_vae
from sora_jax.models import vae
from sora_jax.parallel import sharding

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
MODEL_DIR = os.path.join(FIXTURES, 'wan_vae_tiny')
TINY = dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latents_mean=None,
            latents_std=None)


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(os.path.join(FIXTURES, 'wan_vae_tiny_io.npz')))


@pytest.fixture(scope='module')
def loaded():
  return wan_vae.load_wan_vae(MODEL_DIR)


@pytest.fixture(scope='module')
def full():
  """Full-sequence (non-chunked) encode mean / unclamped decode, jitted once for the module."""
  encode = jax.jit(lambda m, x: m.encode(x, chunked=False))
  decode = jax.jit(lambda m, z: m.decode(z, chunked=False, clamp=False))
  return encode, decode


def test_parity_with_diffusers(loaded, ref):
  assert ref['video'].shape == (1, 9, 16, 24, 3) and ref['video_mean'].shape == (1, 3, 2, 3, 4)
  errors = {
      'video_mean': rel_l2(loaded.encode(ref['video']), ref['video_mean']),
      'image_mean': rel_l2(loaded.encode(ref['image']), ref['image_mean']),
      'decoded': rel_l2(loaded.decode(ref['latents']), ref['decoded']),
  }
  print('rel L2 vs diffusers:', errors)
  assert max(errors.values()) < 1e-4, errors
  assert loaded.decode(ref['latents']).shape == (1, 9, 16, 24, 3)


def test_chunked_equals_full_sequence(loaded, ref, full):
  encode, decode = full
  mean_f, _ = encode(loaded.model, jnp.asarray(ref['video']))
  mean_c = loaded.encode(ref['video'])  # chunked: first frame, then a scan over 4-frame chunks
  assert rel_l2(mean_f, mean_c) < 1e-5 and rel_l2(mean_f, ref['video_mean']) < 1e-4
  out_f = decode(loaded.model, jnp.asarray(ref['latents']))
  out_c = loaded.decode(ref['latents'])  # chunked: one latent frame per scan step (clamped)
  assert rel_l2(jnp.clip(out_f, -1, 1), out_c) < 1e-5
  assert rel_l2(out_f, ref['decoded_raw']) < 1e-4


def test_spatial_tiling_parity(ref):
  tiled = wan_vae.load_wan_vae(MODEL_DIR)
  tiled.enable_tiling(16, 16, 8, 8)  # as the fixture: 2x3 tiles, 1-latent / 8-pixel blends
  errors = {'image_mean_tiled': rel_l2(tiled.encode(ref['image']), ref['image_mean_tiled']),
            'decoded_tiled': rel_l2(tiled.decode(ref['latents'][:, :1]), ref['decoded_tiled'])}
  assert rel_l2(ref['image_mean_tiled'], ref['image_mean']) > 1e-2  # tiling changes the result
  print('tiled rel L2 vs diffusers:', errors)
  assert max(errors.values()) < 1e-4, errors


def test_image_is_one_latent_frame_and_time_is_causal(loaded, ref, full):
  video = jnp.asarray(ref['video'])
  mean = loaded.encode(video)
  image_mean = loaded.encode(video[:, :1])
  assert image_mean.shape == (1, 1, 2, 3, 4)
  # The first latent frame sees only frame 0: an image is a 1-frame video in the same latent space.
  np.testing.assert_allclose(image_mean[:, 0], mean[:, 0], atol=1e-5)
  # Changing frames 5..8 leaves latent frames 0 (frame 0) and 1 (frames 1..4) untouched.
  changed = loaded.encode(video.at[:, 5:].set(0.0))
  np.testing.assert_allclose(changed[:, :2], mean[:, :2], atol=1e-5)
  assert float(jnp.abs(changed[:, 2] - mean[:, 2]).max()) > 1e-3
  # Decoding: 1 latent frame -> 1 frame; video frame 0 depends only on latent frame 0.
  z = jnp.asarray(ref['latents'])
  first = loaded.decode(z[:, :1])
  assert first.shape == (1, 1, 16, 24, 3)
  np.testing.assert_allclose(first[:, 0], loaded.decode(z)[:, 0], atol=1e-5)


def test_shapes_and_bad_lengths():
  model = nnx.eval_shape(lambda: vae.CausalVAE(**TINY, rngs=nnx.Rngs(0)))
  shape = lambda f, *a: jax.eval_shape(f, model, *a).shape  # model as an argument: it is abstract
  video = jax.ShapeDtypeStruct((2, 17, 16, 32, 3), jnp.float32)
  z = jax.ShapeDtypeStruct((2, 5, 2, 4, 4), jnp.float32)
  for chunked in (True, False):
    assert shape(lambda m, v: m.encode(v, chunked=chunked)[0], video) == (2, 5, 2, 4, 4)
    assert shape(lambda m, z: m.decode(z, chunked=chunked), z) == (2, 17, 16, 32, 3)
  encode = lambda m, v: m.encode(v)
  with pytest.raises(ValueError, match='1 \\+ 4k'):
    shape(encode, jax.ShapeDtypeStruct((1, 4, 16, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match='multiples of 8'):
    shape(encode, jax.ShapeDtypeStruct((1, 5, 12, 16, 3), jnp.float32))
  with pytest.raises(ValueError, match='latents'):
    shape(lambda m, z: m.decode(z), jax.ShapeDtypeStruct((1, 2, 2, 2, 3), jnp.float32))


def test_latent_normalisation(loaded, ref):
  z = jnp.asarray(ref['video_mean'])
  mean, std = np.array([0.1, -0.2, 0.3, -0.4]), np.array([1.5, 0.5, 2.0, 1.0])  # fixture config
  np.testing.assert_allclose(loaded.normalize_latents(z), (ref['video_mean'] - mean) / std,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loaded.denormalize_latents(loaded.normalize_latents(z)), z, atol=1e-6)
  with pytest.raises(ValueError, match='latents_mean'):
    nnx.eval_shape(lambda: vae.CausalVAE(**TINY, rngs=nnx.Rngs(0))).normalize_latents(z)


def test_sharding_axis_names_resolve():
  model = nnx.eval_shape(lambda: vae.CausalVAE(**TINY, rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  specs = [sharding.logical_to_spec(tuple(s)) for s in leaves]
  assert any(('fsdp', 'context') in s for s in specs) and any(all(a is None for a in s) for s in specs)
  # Loading onto a mesh places each parameter by its logical names as it is read.
  n = jax.device_count()  # 8 fake CPU devices under tests/conftest.py
  mesh = sharding.make_mesh(dict(data=1, fsdp=n, tensor=1, context=1))
  config = vae.config_from_dict(wan_vae.load_config(MODEL_DIR))
  abstract = nnx.eval_shape(lambda: vae.CausalVAE(**config, rngs=nnx.Rngs(0)))
  placed = wan_vae.load_vae_params(MODEL_DIR, abstract, mesh=mesh)
  kernel = placed.decoder.mid_block.resnets[0].conv1.kernel[...]  # [3, 3, 3, 16, 16]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, None,
                                                           ('fsdp', 'context'))
  assert len(kernel.addressable_shards) == n


def test_load_bf16_and_parent_folder(tmp_path, loaded, ref):
  folder = tmp_path / 'pipeline' / 'vae'
  folder.mkdir(parents=True)
  shutil.copy(os.path.join(MODEL_DIR, 'config.json'), folder)
  tensors = load_file(os.path.join(MODEL_DIR, wan_vae.WEIGHTS_NAME))
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
            str(folder / wan_vae.WEIGHTS_NAME))
  # bf16 file, float32 parameters: the loaded values are the bf16-rounded float32 ones.
  f32 = wan_vae.load_wan_vae(str(tmp_path / 'pipeline'))  # the parent folder, with vae/
  for a, b in zip(jax.tree.leaves(nnx.state(f32.model)), jax.tree.leaves(nnx.state(loaded.model))):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=1e-30)
  # bf16 parameters and compute run end to end (tolerance: bf16 rounding, not parity).
  bf16 = wan_vae.load_wan_vae(str(folder), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert bf16.model.encoder.conv_in.kernel[...].dtype == jnp.bfloat16
  assert rel_l2(bf16.decode(ref['latents']), ref['decoded']) < 5e-2


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='No Wan VAE'):
    wan_vae.load_wan_vae(str(tmp_path))
  shutil.copy(os.path.join(MODEL_DIR, 'config.json'), tmp_path)
  with pytest.raises(FileNotFoundError, match='No weights'):
    wan_vae.load_wan_vae(str(tmp_path))
  tensors = load_file(os.path.join(MODEL_DIR, wan_vae.WEIGHTS_NAME))
  tensors['decoder.extra.weight'] = np.zeros(3, np.float32)
  del tensors['encoder.conv_in.bias']
  save_file(tensors, str(tmp_path / wan_vae.WEIGHTS_NAME))
  with pytest.raises(ValueError, match=r'missing keys \(1\): encoder.conv_in.bias.*unexpected '
                                       r'keys \(1\): decoder.extra.weight'):
    wan_vae.load_wan_vae(str(tmp_path))
  config = json.load(open(os.path.join(MODEL_DIR, 'config.json')))
  json.dump({**config, 'base_dim': 16}, open(tmp_path / 'config.json', 'w'))
  tensors = load_file(os.path.join(MODEL_DIR, wan_vae.WEIGHTS_NAME))
  save_file(tensors, str(tmp_path / wan_vae.WEIGHTS_NAME))
  with pytest.raises(ValueError, match='Shape mismatch'):
    wan_vae.load_wan_vae(str(tmp_path))
  json.dump({**config, 'no_such_field': 1}, open(tmp_path / 'config.json', 'w'))
  with pytest.raises(ValueError, match='Unknown AutoencoderKLWan config fields'):
    wan_vae.load_wan_vae(str(tmp_path))


def test_training_reduces_loss(loaded):
  rng = np.random.default_rng(0)
  clips = np.stack([shapes.render_clip(c, s, d, num_frames=5, height=16, width=16, rng=rng)
                    for c, s, d in (('red', 'circle', 'right'), ('blue', 'square', 'down'))])
  video = jnp.asarray(clips, jnp.float32) / 127.5 - 1.0
  # Start from the fixture's random weights: a random init compiles one RNG kernel per parameter
  # shape (~15 s on a busy 2-core CPU), loading is instant.
  graphdef, params = nnx.split(loaded.model)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(p):
      return vae.vae_loss(nnx.merge(graphdef, p), video, key, kl_weight=1e-6, l1_weight=1.0,
                          l2_weight=1.0)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  losses = []
  for i in range(30):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
    losses.append(float(metrics['loss']))
  print('vae loss', losses[0], '->', losses[-1], 'psnr', float(metrics['psnr']))
  assert all(np.isfinite(losses)) and float(metrics['kl']) > 0
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses

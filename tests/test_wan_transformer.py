"""Wan 2.1 transformer: parity with diffusers' WanTransformer3DModel on tiny random checkpoints.

Fixtures: tests/fixtures/gen_wan_transformer.py (run with the torch reference venv; see its header).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sora_jax.interop import safetensors_io
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import wan
from sora_jax.parallel import sharding

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TINY = os.path.join(FIXTURES, 'wan_transformer_tiny')
TINY_BF16 = os.path.join(FIXTURES, 'wan_transformer_tiny_bf16')  # pipeline folder, sharded bf16


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def io():
  return dict(np.load(os.path.join(FIXTURES, 'wan_transformer_tiny_io.npz')))


@pytest.fixture(scope='module')
def tiny():
  return wt.load_wan_transformer(TINY)


def test_matches_diffusers(tiny, io):
  out = tiny(io['latents'], io['timesteps'], io['text'])
  assert out.shape == io['out'].shape == (2, 3, 4, 6, 6) and out.dtype == jnp.float32
  err = rel_l2(out, io['out'])
  print(f'wan transformer rel L2 vs diffusers: {err:.2e}')
  assert err < 1e-4


def test_per_frame_timesteps_match_diffusers(tiny, io):
  # diffusers gets per-token timesteps [B, N] (Wan 2.2 style), constant within each latent frame.
  err = rel_l2(tiny(io['latents'], io['frame_timesteps'], io['text']), io['out_frame_t'])
  print(f'per-frame timesteps rel L2: {err:.2e}')
  assert err < 1e-4


def test_bf16_sharded_checkpoint_in_pipeline_folder(io):
  assert os.path.isfile(os.path.join(TINY_BF16, 'transformer', wt.WEIGHTS_NAME + '.index.json'))
  f = wt.load_wan_transformer(TINY_BF16)  # parent folder: finds transformer/
  assert f.model.blocks.attn1.to_q.kernel.dtype == jnp.float32  # bf16 file, float32 params
  err = rel_l2(f(io['latents'], io['timesteps'], io['text']), io['out_bf16_weights'])
  print(f'bf16 sharded checkpoint rel L2: {err:.2e}')
  assert err < 1e-4


def test_raw_safetensors_reader_matches_library():
  shard = os.path.join(TINY_BF16, 'transformer', 'diffusion_pytorch_model-00001-of-00002.safetensors')
  tensors = load_file(shard)
  assert any(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
  for key, value in tensors.items():
    raw = safetensors_io.read_tensor_raw(shard, key)
    assert raw.dtype == value.dtype and raw.shape == value.shape
    np.testing.assert_array_equal(raw.astype(np.float32), value.astype(np.float32))


def test_flow_time_call_equals_wan_timestep(tiny, io):
  t = io['timesteps'] / 1000.0
  ours = nnx.jit(lambda m, x, t, c: m(x, t, c))(tiny.model, io['latents'], t, io['text'])
  np.testing.assert_allclose(ours, tiny(io['latents'], io['timesteps'], io['text']),
                             rtol=1e-4, atol=1e-4)


def test_context_mask_zeroes_padded_embeddings(tiny, io):
  """Wan attends to all positions; a mask zeroes the padded embeddings, as the Wan pipeline does."""
  model, x, ctx = tiny.model, io['latents'], io['text']
  t = jnp.array([0.3, 0.7])
  mask = jnp.array([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
  masked = nnx.jit(lambda m, x, t, c, mask: m(x, t, c, mask))(model, x, t, ctx, mask)
  np.testing.assert_allclose(masked, tiny(x, 1000 * t, ctx * mask[..., None]), atol=1e-4)
  assert rel_l2(masked, tiny(x, 1000 * t, ctx)) > 1e-2


def test_scan_matches_unrolled(tiny, io):
  # remat only changes what the backward pass recomputes (checked by hand: remat='full' input
  # gradients equal to 4e-6 of 18); a gradient compile costs ~5 s of CPU, so it is not repeated here.
  unrolled = wt.load_wan_transformer(TINY, scan_layers=False)
  args = io['latents'], io['timesteps'], io['text']
  np.testing.assert_allclose(unrolled(*args), tiny(*args), rtol=1e-5, atol=1e-5)


def test_bf16_compute_is_close(io):
  f = wt.load_wan_transformer(TINY, dtype=jnp.bfloat16)
  assert rel_l2(f(io['latents'], io['timesteps'], io['text']), io['out']) < 3e-2


def test_params_carry_logical_axes_and_load_sharded(io):
  abstract = nnx.eval_shape(lambda: wan.WanDiT(
      wan.WanConfig.from_diffusers(wt.wan_config_from_diffusers(TINY)), rngs=nnx.Rngs(0)))
  specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(abstract)))
  for path, spec in specs:
    names = tuple(spec.get_value())
    assert names and any(n is not None for n in names), path
    assert (names[0] == 'layers') == (path[0] == 'blocks'), (path, names)

  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2, context=2), jax.devices()[:8])
  f = wt.load_wan_transformer(TINY, mesh=mesh)
  kernel = f.model.blocks.attn1.to_q.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, ('fsdp', 'context'), 'tensor')
  err = rel_l2(f(io['latents'], io['timesteps'], io['text']), io['out'])
  assert err < 1e-4


# --------------------------------------------------------------------------- errors


def _copy(tmp_path, config_edit=None, tensors_edit=None):
  dst = tmp_path / 'wan'
  shutil.copytree(TINY, dst)
  if config_edit:
    config = json.loads((dst / 'config.json').read_text())
    config_edit(config)
    (dst / 'config.json').write_text(json.dumps(config))
  if tensors_edit:
    tensors = load_file(str(dst / wt.WEIGHTS_NAME))
    tensors_edit(tensors)
    save_file(tensors, str(dst / wt.WEIGHTS_NAME))
  return str(dst)


def test_error_missing_folder_and_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    wt.load_wan_transformer(str(tmp_path / 'nowhere'))
  path = _copy(tmp_path)
  os.remove(os.path.join(path, wt.WEIGHTS_NAME))
  with pytest.raises(FileNotFoundError, match='No weights.*diffusion_pytorch_model.safetensors'):
    wt.load_wan_transformer(path)


def test_error_unexpected_and_missing_keys(tmp_path):
  def edit(t):
    t['blocks.0.attn1.extra.weight'] = np.zeros(3, np.float32)
    del t['blocks.1.ffn.net.2.bias']
  with pytest.raises(ValueError) as e:
    wt.load_wan_transformer(_copy(tmp_path, tensors_edit=edit))
  assert 'missing keys (1): blocks.1.ffn.net.2.bias' in str(e.value)
  assert 'unexpected keys (1): blocks.0.attn1.extra.weight' in str(e.value)


def test_error_shape_mismatch(tmp_path):
  def edit(c):
    c['ffn_dim'] = 48
  with pytest.raises(ValueError, match=r'Shape mismatch for blocks\.0\.ffn\.net\.0\.proj\.weight.*'
                     r'\(64, 32\).*\(2, 32, 48\)|Shape mismatch.*ffn'):
    wt.load_wan_transformer(_copy(tmp_path, config_edit=edit))


def test_error_bad_config():
  cfg = wt.wan_config_from_diffusers(TINY)
  with pytest.raises(ValueError, match=r"Unknown WanTransformer3DModel config fields \['bogus'\]"):
    wan.WanConfig.from_diffusers(dict(cfg, bogus=1))
  with pytest.raises(NotImplementedError, match='image-to-video'):
    wan.WanConfig.from_diffusers(dict(cfg, image_dim=1280, added_kv_proj_dim=5120))
  assert wan.WanConfig.from_diffusers(dict(cfg, out_channels=None)).out_channels == 4


def test_error_bad_inputs(tiny, io):
  with pytest.raises(ValueError, match=r'latents must be \[B, T, H, W, 4\]'):
    tiny(io['latents'][..., :3], io['timesteps'], io['text'])
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    tiny(io['latents'][:, :, :3], io['timesteps'], io['text'])
  with pytest.raises(ValueError, match='text_dim=32'):
    tiny(io['latents'], io['timesteps'], io['text'][..., :16])

"""Wan 2.1 image-to-video import: CLIPImageProcessor's preprocessing, the CLIP vision tower and the I2V
transformer against transformers / diffusers on tiny random checkpoints, and the errors that name a
folder of the wrong kind.

Fixtures: tests/fixtures/gen_wan_i2v.py (run with the torch reference venv; see its header).
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

from sora_jax import interop
from sora_jax.interop import clip_vision as cv
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import clip_vision, wan
from sora_jax.parallel import sharding

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
PIPE = os.path.join(FIXTURES, 'wan_i2v_tiny')               # transformer/, image_encoder/, image_processor/
CLIP_BF16 = os.path.join(FIXTURES, 'clip_vision_tiny_bf16')  # sharded bf16 CLIPVisionModel folder
T2V = os.path.join(FIXTURES, 'wan_transformer_tiny')
T2V_PIPE = os.path.join(FIXTURES, 'wan_transformer_tiny_bf16')  # WanPipeline folder (no image encoder)
WAN_PROCESSOR_IMAGES = ((300, 397, 1), (97, 130, 2))  # as gen_wan_i2v.py
STRIDE = 4


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def pseudo_random_image(height, width, seed):
  """gen_wan_i2v.py's deterministic noise image."""
  i = np.arange(height * width * 3, dtype=np.uint64).reshape(height, width, 3)
  x = (i + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) * np.uint64(6364136223846793005)
  x = x + np.uint64(1442695040888963407)
  x ^= x >> np.uint64(29)
  return ((x * np.uint64(0xBF58476D1CE4E5B9)) >> np.uint64(56)).astype(np.uint8)


@pytest.fixture(scope='module')
def io():
  return dict(np.load(os.path.join(FIXTURES, 'wan_i2v_tiny_io.npz')))


@pytest.fixture(scope='module')
def encoder():
  return interop.load_clip_vision_encoder(PIPE)  # pipeline folder: image_encoder/ + image_processor/


# --------------------------------------------------------------------------- preprocessing


def test_preprocessing_matches_clip_image_processor(io):
  processor = cv.load_clip_image_processor(PIPE)
  assert processor.size == (42,) and processor.image_mean == (0.5, 0.42, 0.37)
  ours = processor([io['image_a'], io['image_b']])  # one downscaled, one upscaled
  assert ours.shape == io['pixels'].shape == (2, 42, 42, 3) and ours.dtype == np.float32
  err = rel_l2(ours, io['pixels'])
  print(f'CLIP preprocessing (tiny settings) rel L2 vs CLIPImageProcessor: {err:.2e}, max abs '
        f'{np.abs(ours - io["pixels"]).max():.1e}')
  assert err < 1e-6


def test_preprocessing_at_wan_settings_matches_clip_image_processor(io):
  processor = cv.CLIPImageProcessor()  # Wan's image_processor/ settings: 224, OpenAI mean / std
  for k, (h, w, seed) in enumerate(WAN_PROCESSOR_IMAGES):
    image = pseudo_random_image(h, w, seed)
    assert image.astype(np.int64).sum() == io[f'wan_image_sum_{k}']
    ours = processor(image)[0]
    assert ours.shape == (224, 224, 3)
    err = rel_l2(ours[::STRIDE, ::STRIDE], io[f'wan_pixels_{k}'])
    print(f'CLIP preprocessing {h}x{w} -> 224 rel L2 vs CLIPImageProcessor: {err:.2e}')
    assert err < 1e-6


def test_preprocessing_inputs_and_errors(io):
  processor = cv.CLIPImageProcessor(size=(42,), crop_size=(42, 42))
  image = io['image_a']
  np.testing.assert_array_equal(processor(image), processor(image[None]))
  grey = processor(image[..., 0])
  np.testing.assert_array_equal(grey[..., 0], processor(np.repeat(image[..., :1], 3, -1))[..., 0])
  with pytest.raises(ValueError, match='uint8'):
    processor(image.astype(np.float32) / 255)
  with pytest.raises(ValueError, match=r'\[H, W, 3\]'):
    processor(np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(NotImplementedError, match='bicubic'):
    cv.CLIPImageProcessor.from_dict({'resample': 2})
  with pytest.raises(ValueError, match='bogus'):
    cv.CLIPImageProcessor.from_dict({'bogus': 1})


# --------------------------------------------------------------------------- CLIP vision tower


def test_clip_matches_transformers(encoder, io):
  out = encoder(io['pixels'])
  assert out.shape == io['clip_penultimate'].shape == (2, 10, 32) and out.dtype == jnp.float32
  err = rel_l2(out, io['clip_penultimate'])
  print(f'CLIP hidden_states[-2] rel L2 vs transformers: {err:.2e}')
  assert err < 1e-4
  model, x = encoder.model, jnp.asarray(io['pixels'])
  for layer, ref in ((-1, 'clip_last'), (0, 'clip_embeddings')):
    assert rel_l2(model(x, hidden_layer=layer), io[ref]) < 1e-4, layer
  err = rel_l2(model.pooled_output(x), io['clip_pooled'])
  print(f'CLIP pooler_output rel L2: {err:.2e}')
  assert err < 1e-4
  # images -> preprocessing -> tower: what the pipeline's encode_image does
  assert rel_l2(encoder.encode_images([io['image_a'], io['image_b']]), io['clip_penultimate']) < 1e-4


def test_clip_bf16_sharded_folder(io):
  assert os.path.isfile(os.path.join(CLIP_BF16, 'model.safetensors.index.json'))
  f = cv.load_clip_vision_encoder(CLIP_BF16)
  assert f.model.layers.q_proj.kernel.dtype == jnp.float32  # bf16 file, float32 parameters
  err = rel_l2(f(io['pixels']), io['clip_penultimate_bf16_weights'])
  print(f'CLIP bf16 sharded checkpoint rel L2: {err:.2e}')
  assert err < 1e-4


def test_clip_loads_sharded_on_a_mesh(io):
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2, context=2), jax.devices()[:8])
  model = cv.load_clip_vision_model(PIPE, mesh=mesh)
  kernel = model.layers.fc1.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, ('fsdp', 'context'), 'tensor')
  out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(io['pixels']))
  assert rel_l2(out, io['clip_penultimate']) < 1e-4


def test_clip_transformers4_layout(tmp_path, io):
  """transformers 4.x (the released Wan image_encoder/) prefixes 'vision_model.'; a
  CLIPVisionModelWithProjection adds visual_projection, which Wan does not use."""
  src = os.path.join(PIPE, 'image_encoder')
  tensors = {f'vision_model.{k}': v for k, v in load_file(os.path.join(src, cv.WEIGHTS_NAME)).items()}
  tensors['visual_projection.weight'] = np.zeros((16, 32), np.float32)
  dst = tmp_path / 'image_encoder'
  dst.mkdir()
  shutil.copy(os.path.join(src, 'config.json'), dst / 'config.json')
  save_file(tensors, str(dst / cv.WEIGHTS_NAME))
  model = cv.load_clip_vision_model(str(tmp_path))
  assert rel_l2(model(jnp.asarray(io['pixels'])), io['clip_penultimate']) < 1e-4


def test_clip_vit_h_at_real_size():
  cfg = cv.config_from_hf({'model_type': 'clip_vision_model', 'hidden_size': 1280,
                           'intermediate_size': 5120, 'num_hidden_layers': 32,
                           'num_attention_heads': 16, 'patch_size': 14, 'image_size': 224,
                           'hidden_act': 'gelu', 'layer_norm_eps': 1e-5, 'projection_dim': 1024,
                           'architectures': ['CLIPVisionModel'], 'torch_dtype': 'float32',
                           'transformers_version': '4.48.0.dev0'})
  assert cfg == clip_vision.CLIPVisionConfig() and cfg.num_positions == 257
  abstract = cv.abstract_clip_vision_model(cfg, jnp.bfloat16, param_dtype=jnp.bfloat16)
  graphdef, state = nnx.split(abstract)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert out.shape == (2, 257, 1280) and out.dtype == jnp.float32
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(state))
  assert 630e6 < count < 634e6  # open_clip ViT-H/14's vision tower: 632M parameters
  specs = nnx.to_flat_state(nnx.get_partition_spec(state))
  for path, spec in specs:
    names = tuple(spec.get_value())
    assert names and any(n is not None for n in names), path
    assert (names[0] == 'layers') == (path[0] == 'layers'), (path, names)


def test_clip_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='text-to-video Wan pipeline'):
    cv.load_clip_vision_model(T2V_PIPE)
  with pytest.raises(ValueError, match='diffusers WanTransformer3DModel config'):
    cv.load_clip_vision_model(T2V)
  src = os.path.join(PIPE, 'image_encoder')
  dst = tmp_path / 'clip'
  shutil.copytree(src, dst)
  tensors = load_file(str(dst / cv.WEIGHTS_NAME))
  del tensors['encoder.layers.1.mlp.fc2.bias']
  tensors['encoder.layers.0.extra.weight'] = np.zeros(3, np.float32)
  save_file(tensors, str(dst / cv.WEIGHTS_NAME))
  with pytest.raises(ValueError) as e:
    cv.load_clip_vision_model(str(dst))
  assert 'missing tensors (1): encoder.layers.1.mlp.fc2.bias' in str(e.value)
  assert 'unexpected tensors (1): encoder.layers.0.extra.weight' in str(e.value)
  config = json.loads((dst / 'config.json').read_text())
  with pytest.raises(ValueError, match='full CLIPModel'):
    cv.config_from_hf(dict(config, model_type='clip'))
  with pytest.raises(ValueError, match=r"\['quantization_config'\]"):
    cv.config_from_hf(dict(config, quantization_config={}))


# --------------------------------------------------------------------------- I2V transformer


@pytest.fixture(scope='module')
def i2v():
  return wt.load_wan_transformer(PIPE, task='i2v')  # pipeline folder: finds transformer/


def test_i2v_transformer_matches_diffusers(i2v, io):
  assert i2v.model.config.is_i2v and i2v.model.config.in_channels == 12
  out = i2v(io['latents'], io['timesteps'], io['text'].astype(np.float32), io['image_embeds'])
  assert out.shape == io['out'].shape == (2, 3, 4, 6, 4) and out.dtype == jnp.float32
  err = rel_l2(out, io['out'])
  print(f'Wan I2V transformer rel L2 vs diffusers: {err:.2e}')
  assert err < 1e-4
  # the image tokens matter: without them (zeros) the output moves
  blank = i2v(io['latents'], io['timesteps'], io['text'].astype(np.float32),
              np.zeros_like(io['image_embeds']))
  assert rel_l2(blank, io['out']) > 1e-2


def test_i2v_flow_time_call_and_logical_axes(i2v, io):
  model = i2v.model
  args = (io['latents'], io['timesteps'] / 1000.0, io['text'].astype(np.float32))
  ours = nnx.jit(lambda m, x, t, c, i: m(x, t, c, image_embeds=i))(model, *args, io['image_embeds'])
  assert rel_l2(ours, io['out']) < 1e-4
  specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model)))
  paths = set()
  for path, spec in specs:
    names = tuple(spec.get_value())
    assert names and any(n is not None for n in names), path
    assert (names[0] == 'layers') == (path[0] == 'blocks'), (path, names)
    paths.add(path)
  assert ('blocks', 'attn2', 'add_k_proj', 'kernel') in paths
  assert ('image_embedder', 'ff_1', 'kernel') in paths
  assert not any(p[:2] == ('blocks', 'attn1') and 'add_k_proj' in p for p in paths)


def test_wan21_i2v_14b_config_is_accepted():
  config = {'_class_name': 'WanTransformer3DModel', '_diffusers_version': '0.33.0.dev0',
            'added_kv_proj_dim': 5120, 'attention_head_dim': 128, 'cross_attn_norm': True,
            'eps': 1e-06, 'ffn_dim': 13824, 'freq_dim': 256, 'image_dim': 1280, 'in_channels': 36,
            'num_attention_heads': 40, 'num_layers': 40, 'out_channels': 16,
            'patch_size': [1, 2, 2], 'pos_embed_seq_len': None, 'qk_norm': 'rms_norm_across_heads',
            'rope_max_seq_len': 1024, 'text_dim': 4096}
  cfg = wan.WanConfig.from_diffusers(config)
  assert cfg.is_i2v and cfg.image_dim == 1280 and wt.wan_task(config) == 'i2v'
  table = wt.param_table(cfg)
  assert table[('blocks', 'attn2', 'add_k_proj', 'kernel')][0][39] == 'blocks.39.attn2.add_k_proj.weight'
  assert ('image_embedder', 'norm1_scale') in table


# --------------------------------------------------------------------------- errors


def _copy(src, tmp_path, config_edit):
  dst = tmp_path / 'wan'
  shutil.copytree(src, dst)
  config = json.loads((dst / 'config.json').read_text())
  config_edit(config)
  (dst / 'config.json').write_text(json.dumps(config))
  return str(dst)


def test_error_wrong_task_is_named(tmp_path):
  with pytest.raises(ValueError, match='holds a text-to-video Wan transformer.*image-to-video needs'):
    wt.load_wan_transformer(T2V, task='i2v')
  with pytest.raises(ValueError, match='holds an image-to-video Wan transformer.*text-to-video needs'):
    wt.load_wan_transformer(PIPE, task='t2v')
  # config.json and weights of different kinds
  def t2v_config(c):
    c.update(image_dim=None, added_kv_proj_dim=None)
  with pytest.raises(ValueError, match='weights are an image-to-video transformer.s'):
    wt.load_wan_transformer(_copy(os.path.join(PIPE, 'transformer'), tmp_path / 'a', t2v_config))
  def i2v_config(c):
    c.update(image_dim=32, added_kv_proj_dim=32)
  with pytest.raises(ValueError, match='weights are a text-to-video one.s'):
    wt.load_wan_transformer(_copy(T2V, tmp_path / 'b', i2v_config))


def test_error_missing_or_stray_image_embeds(i2v, io):
  model, args = i2v.model, (io['latents'], io['timesteps'], io['text'].astype(np.float32))
  with pytest.raises(ValueError, match='image-to-video.*pass image_embeds'):
    model.forward_wan(*args)
  with pytest.raises(ValueError, match=r'image_embeds must be \[B=2, I, image_dim=32\]'):
    model.forward_wan(*args, io['image_embeds'][..., :16])
  with pytest.raises(ValueError, match='36|frame mask'):
    model.forward_wan(io['latents'][..., :4], *args[1:], io['image_embeds'])
  t2v = wt.load_wan_transformer(T2V)
  with pytest.raises(ValueError, match='text-to-video.*takes no image_embeds'):
    t2v(np.zeros((2, 3, 4, 6, 4), np.float32), io['timesteps'], np.zeros((2, 7, 32), np.float32),
        io['image_embeds'])


def test_error_unsupported_variants_are_named(tmp_path):
  base = wt.wan_config_from_diffusers(T2V)
  # Wan 2.2 TI2V-5B's 48-channel transformer loads (tests/test_wan22_ti2v.py).
  assert wan.is_ti2v(wan.WanConfig.from_diffusers(dict(base, in_channels=48, out_channels=48)))
  # Wan 2.2 I2V-A14B's experts (36 channels, no CLIP) load (tests/test_wan22_a14b.py).
  assert wan.image_condition_only(wan.WanConfig.from_diffusers(dict(base, in_channels=36,
                                                                    out_channels=16)))
  with pytest.raises(NotImplementedError, match='first-last-frame'):
    wan.WanConfig.from_diffusers(dict(base, image_dim=32, added_kv_proj_dim=32,
                                      pos_embed_seq_len=514))
  with pytest.raises(NotImplementedError, match='image-to-video settings'):
    wan.WanConfig.from_diffusers(dict(base, image_dim=32))
  with pytest.raises(ValueError, match=r"Unknown WanTransformer3DModel config fields \['bogus'\]"):
    wan.WanConfig.from_diffusers(dict(base, bogus=1))
  # a Wan 2.2 A14B pipeline folder: two experts switched by timestep
  pipe = tmp_path / 'a14b'
  shutil.copytree(T2V_PIPE, pipe)
  (pipe / 'model_index.json').write_text(json.dumps({
      '_class_name': 'WanPipeline', 'boundary_ratio': 0.875,
      'transformer': ['diffusers', 'WanTransformer3DModel'],
      'transformer_2': ['diffusers', 'WanTransformer3DModel']}))
  with pytest.raises(ValueError, match="Wan 2.2 A14B pipeline.*name the expert"):
    wt.load_wan_transformer(str(pipe))


def test_fixture_files_are_small():
  total = 0
  for root in (PIPE, CLIP_BF16):
    for folder, _, files in os.walk(root):
      total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
  total += os.path.getsize(os.path.join(FIXTURES, 'wan_i2v_tiny_io.npz'))
  assert total < 1 << 20, total
  shard = os.path.join(CLIP_BF16, 'model-00001-of-00003.safetensors')
  assert any(v.dtype == ml_dtypes.bfloat16 for v in load_file(shard).values())

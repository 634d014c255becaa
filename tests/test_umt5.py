"""UMT5 / T5 encoder and tokenizer against transformers (fixtures: tests/fixtures/gen_umt5.py)."""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from sora_jax.common import tokenizers
from sora_jax.interop import umt5 as interop
from sora_jax.models import umt5

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
UMT5_DIR = FIXTURES / 'umt5_tiny'
T5_DIR = UMT5_DIR / 't5_relu'


@pytest.fixture(scope='module')
def io():
  return dict(np.load(FIXTURES / 'umt5_tiny_io.npz'))


@pytest.fixture(scope='module')
def encode():
  return interop.load_umt5_encoder(UMT5_DIR)


def rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def write_checkpoint(folder, tensors, config=None, src=UMT5_DIR):
  folder.mkdir(parents=True, exist_ok=True)
  save_file(tensors, folder / 'model.safetensors')
  config = config if config is not None else json.loads((src / 'config.json').read_text())
  (folder / 'config.json').write_text(json.dumps(config))
  return folder


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers(io):
  tok = tokenizers.load_umt5_tokenizer(UMT5_DIR)
  ids, mask = tok.tokenize(list(io['captions']), int(io['max_length']))
  assert ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(ids, io['input_ids'])
  np.testing.assert_array_equal(mask, io['attention_mask'])
  # Untruncated: same length as transformers without max_length (pieces + EOS).
  _, mask = tok.tokenize(list(io['captions']), 64)
  np.testing.assert_array_equal(mask.sum(1), io['full_lengths'])
  assert tok.tokenize([''], 1)[0].tolist() == [[tok.eos_id]]


def test_tokenizer_locations(tmp_path):
  wan = tmp_path / 'wan'
  (wan / 'tokenizer').mkdir(parents=True)
  (wan / 'text_encoder').mkdir()
  shutil.copy(UMT5_DIR / 'spiece.model', wan / 'tokenizer' / 'spiece.model')
  reference = tokenizers.UMT5Tokenizer(UMT5_DIR / 'spiece.model').tokenize(['a red circle'], 8)
  for path in (wan, wan / 'text_encoder', wan / 'tokenizer'):
    np.testing.assert_array_equal(tokenizers.load_umt5_tokenizer(path).tokenize(['a red circle'], 8),
                                  reference)
  with pytest.raises(FileNotFoundError, match='spiece.model'):
    tokenizers.load_umt5_tokenizer(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='max_length'):
    tokenizers.UMT5Tokenizer(UMT5_DIR).tokenize(['a'], 0)


def test_prompt_clean():
  assert tokenizers.prompt_clean('  A &amp;amp; B\n\t moving   left ') == 'A & B moving left'


# ---------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize('key,num_buckets,max_distance', [
    ('buckets_tiny', 8, 20), ('buckets_t5_tiny', 10, 12), ('buckets_32_128', 32, 128)])
def test_relative_position_buckets(io, key, num_buckets, max_distance):
  reference = io[key]  # transformers' bucket of each offset -(L-1) .. L-1
  length = (len(reference) + 1) // 2
  offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
  np.testing.assert_array_equal(
      umt5.relative_position_buckets(length, length, num_buckets, max_distance),
      reference[offsets + length - 1])


def test_umt5_parity(io, encode):
  out = encode(io['input_ids'], io['attention_mask'])
  err = rel_l2(out, io['umt5_last_hidden_state'])
  print(f'UMT5 float32 rel L2 vs transformers: {err:.2e}')
  assert out.shape == io['umt5_last_hidden_state'].shape and out.dtype == jnp.float32
  assert err < 1e-4


def test_t5_parity_shared_bias_relu(io):
  """T5 layout: one bias table (layer 0) reused by every layer, non-gated ReLU FFN."""
  model = interop.load_umt5_module(T5_DIR, scan_layers=False)
  assert not model.config.bias_per_layer and not model.config.gated
  err = rel_l2(model(jnp.asarray(io['input_ids']), jnp.asarray(io['attention_mask'])),
               io['t5_last_hidden_state'])
  print(f'T5 float32 rel L2 vs transformers: {err:.2e}')
  assert err < 1e-4


def test_padding_does_not_change_real_positions(io, encode):
  ids, mask = io['input_ids'], io['attention_mask']
  out = np.asarray(encode(ids, mask))
  padded = np.asarray(encode(np.pad(ids, ((0, 0), (0, 3))), np.pad(mask, ((0, 0), (0, 3)))))
  np.testing.assert_allclose(padded[:, :ids.shape[1]][mask], out[mask], rtol=0, atol=1e-5)


def test_text_encoder_adapter_zeroes_padding(io):
  ids, mask = jnp.asarray(io['input_ids']), jnp.asarray(io['attention_mask'])
  encoder = umt5.UMT5TextEncoder(interop.load_umt5_module(UMT5_DIR))
  embeddings, out_mask = encoder(ids, mask)
  assert encoder.width == 32 and out_mask.dtype == bool
  reference = io['umt5_last_hidden_state']
  assert np.all(np.asarray(embeddings)[~io['attention_mask']] == 0)
  assert rel_l2(np.asarray(embeddings)[io['attention_mask']], reference[io['attention_mask']]) < 1e-4


def test_random_init_bf16():
  """Built from scratch (no checkpoint): bf16 compute, float32 norms and output, finite."""
  config = umt5.UMT5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=2,
                           relative_attention_num_buckets=6, relative_attention_max_distance=10)
  model = umt5.UMT5Encoder(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  ids = jnp.array([[5, 7, 1, 0], [0, 0, 0, 0]], jnp.int32)  # second row: all padding
  out = nnx.jit(lambda m, i: m(i, i != 0))(model, ids)
  assert out.shape == (2, 4, 16) and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_logical_axes():
  model = interop.load_umt5_module(UMT5_DIR)
  specs = nnx.get_partition_spec(nnx.state(model))
  assert tuple(specs['embed']['embedding'].get_value()) == ('vocab', 'embed')
  assert tuple(specs['blocks']['q']['kernel'].get_value()) == ('layers', 'embed', 'heads')
  assert tuple(specs['blocks']['o']['kernel'].get_value()) == ('layers', 'heads', 'embed')
  assert tuple(specs['blocks']['wi_0']['kernel'].get_value()) == ('layers', 'embed', 'mlp')
  assert tuple(specs['blocks']['wo']['kernel'].get_value()) == ('layers', 'mlp', 'embed')
  assert model.blocks.relative_bias.shape == (2, 8, 4)


# ---------------------------------------------------------------------------------- checkpoints


def test_sharded_wan_layout_and_embed_tokens_name(io, encode, tmp_path):
  """Two shards + index under text_encoder/ (Wan diffusers), embedding saved under its tied name,
  a decoder tensor of a full seq2seq checkpoint skipped."""
  tensors = load_file(UMT5_DIR / 'model.safetensors')
  tensors['encoder.embed_tokens.weight'] = tensors.pop('shared.weight')
  tensors['decoder.final_layer_norm.weight'] = np.ones(32, np.float32)
  folder = tmp_path / 'wan' / 'text_encoder'
  folder.mkdir(parents=True)
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:10],
            'model-00002-of-00002.safetensors': names[10:]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, folder / file)
  (folder / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {}, 'weight_map': {k: f for f, keys in shards.items() for k in keys}}))
  shutil.copy(UMT5_DIR / 'config.json', folder / 'config.json')
  out = interop.load_umt5_encoder(tmp_path / 'wan')(io['input_ids'], io['attention_mask'])
  np.testing.assert_array_equal(out, encode(io['input_ids'], io['attention_mask']))


def test_bf16_checkpoint(io, tmp_path):
  tensors = {k: v.astype(jnp.bfloat16) for k, v in load_file(UMT5_DIR / 'model.safetensors').items()}
  folder = write_checkpoint(tmp_path / 'bf16', tensors)
  reference = io['umt5_last_hidden_state']
  errors = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = interop.load_umt5_module(folder, dtype)
    assert model.blocks.q.kernel.dtype == dtype and model.final_norm.scale.dtype == jnp.float32
    out = model(jnp.asarray(io['input_ids']), jnp.asarray(io['attention_mask']))
    assert out.dtype == jnp.float32
    errors[jnp.dtype(dtype).name] = rel_l2(out, reference)
  print(f'bf16 checkpoint rel L2 vs float32 transformers: {errors}')
  assert errors['float32'] < 2e-2 and errors['bfloat16'] < 2e-2


def test_checkpoint_errors(tmp_path):
  tensors = load_file(UMT5_DIR / 'model.safetensors')
  config = json.loads((UMT5_DIR / 'config.json').read_text())

  missing = dict(tensors)
  del missing['encoder.block.1.layer.1.DenseReluDense.wi_1.weight']
  missing['encoder.block.0.layer.0.SelfAttention.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'missing tensors encoder\.block\.1\.layer\.1\.DenseReluDense'
                     r'\.wi_1\.weight; unexpected tensors .*SelfAttention\.extra\.weight'):
    interop.load_umt5_module(write_checkpoint(tmp_path / 'missing', missing))

  with pytest.raises(ValueError, match=r'DenseReluDense\.wi_0\.weight \(x2 layers\) has shape '
                     r'\(2, 32, 64\).*implies \(2, 32, 96\)'):
    interop.load_umt5_module(write_checkpoint(tmp_path / 'shape', tensors, dict(config, d_ff=96)))

  with pytest.raises(ValueError, match='quantization_config'):
    interop.load_umt5_module(write_checkpoint(
        tmp_path / 'field', tensors, dict(config, quantization_config={'bits': 4})))
  with pytest.raises(ValueError, match=r"lacks required fields \['d_kv'\]"):
    interop.config_from_hf({k: v for k, v in config.items() if k != 'd_kv'})
  with pytest.raises(ValueError, match='model_type'):
    interop.config_from_hf(dict(config, model_type='bert'))
  with pytest.raises(ValueError, match='gated-swiglu'):
    interop.config_from_hf(dict(config, feed_forward_proj='gated-swiglu'))

  with pytest.raises(FileNotFoundError, match='config.json'):
    interop.load_umt5_encoder(tmp_path / 'nowhere')
  empty = tmp_path / 'bin_only'
  empty.mkdir()
  (empty / 'config.json').write_text(json.dumps(config))
  (empty / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match='pytorch_model.bin'):
    interop.load_umt5_encoder(empty)

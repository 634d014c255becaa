"""Wan LoRA interop: parity with diffusers / PEFT on the tiny transformer.

Fixtures: tests/fixtures/gen_wan_lora.py (torch reference venv; see its header): one random LoRA
(rank 4, alpha 8) in diffusers' PEFT, ComfyUI and musubi-tuner layouts, diffusers' output with the
ComfyUI file loaded by WanPipeline.load_lora_weights (out_lora) and after fuse_lora (out_fused), and
what save_pretrained wrote for the fused model (config.json, per-tensor fingerprints).
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from sora_jax.interop import wan_lora as wl
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import wan

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TINY = os.path.join(FIXTURES, 'wan_transformer_tiny')
LORA = {layout: os.path.join(FIXTURES, f'wan_lora_{layout}.safetensors')
        for layout in ('peft', 'comfy', 'musubi')}
FUSED = os.path.join(FIXTURES, 'wan_lora_fused')
CONFIG = wt.wan_config_from_diffusers(TINY)


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fingerprint(x):  # the same as gen_wan_lora.fingerprint
  x = np.asarray(x, np.float64).reshape(-1)
  directions = np.sin(np.outer(np.arange(1, 17), np.arange(1, x.size + 1)) * 0.7548776662466927)
  return directions @ x


@pytest.fixture(scope='module')
def io():
  return {**np.load(os.path.join(FIXTURES, 'wan_transformer_tiny_io.npz')),
          **np.load(os.path.join(FIXTURES, 'wan_lora_io.npz'))}


@pytest.fixture(scope='module')
def model():
  return wt.load_wan_transformer(TINY).model


@pytest.fixture(scope='module')
def base(model):
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope='module')
def lora():
  return wl.import_lora(LORA['peft'], CONFIG)


_forward = nnx.jit(lambda m, x, t, c: m.forward_wan(x, t, c))


def run(model, params, io):
  """The Wan forward of `model`'s graph with `params` ({path: array}) on the fixture inputs; one
  compile for every call (same graph)."""
  graphdef, state = nnx.split(model)
  flat = [(p, v.replace(jnp.asarray(params[p]))) for p, v in nnx.to_flat_state(state)]
  with_params = nnx.merge(graphdef, nnx.from_flat_state(flat))
  return _forward(with_params, io['latents'], io['timesteps'], io['text'])


def assert_adapters_equal(x, y):
  assert x.keys() == y.keys()
  for module in x:
    for part in ('lora_a', 'lora_b'):
      np.testing.assert_array_equal(x[module][part], y[module][part], err_msg=f'{module} {part}')


def test_linears_are_param_tables_linear_layers():
  table = wt.param_table(wan.WanConfig.from_diffusers(CONFIG))
  linears = {path[:-1]: keys[0].removesuffix('.weight').removeprefix('blocks.0.')
             for path, (keys, fn) in table.items() if fn is wt._linear_kernel}
  assert linears == {path: theirs for path, (theirs, _) in wl.LINEARS.items()}


def test_every_layout_imports_to_the_same_adapters(lora, tmp_path):
  adapters, rank, alpha = lora
  assert (rank, alpha) == (4, 8.0)
  assert len(adapters) == 16  # 10 per block, 6 non-block
  assert adapters[('blocks', 'ffn', 'up')]['lora_a'].shape == (2, 32, 4)
  assert adapters[('blocks', 'ffn', 'up')]['lora_b'].shape == (2, 4, 64)
  assert adapters[('time_proj',)]['lora_b'].shape == (4, 192)
  with safe_open(LORA['peft'], 'numpy') as f:  # lora_a is PEFT's lora_A.weight transposed
    np.testing.assert_array_equal(adapters[('blocks', 'attn2', 'to_out')]['lora_a'][1],
                                  f.get_tensor('transformer.blocks.1.attn2.to_out.0.lora_A.weight').T)

  # transformer.save_lora_adapter's variant: no 'transformer.' prefix on keys or metadata.
  with safe_open(LORA['peft'], 'numpy') as f:
    metadata = json.loads(f.metadata()[wl.PEFT_METADATA_KEY])
  unprefixed = str(tmp_path / 'unprefixed.safetensors')
  save_file({k.removeprefix('transformer.'): v for k, v in load_file(LORA['peft']).items()},
            unprefixed, metadata={wl.PEFT_METADATA_KEY: json.dumps(
                {k.removeprefix('transformer.'): v for k, v in metadata.items()})})

  for path in (LORA['comfy'], LORA['musubi'], unprefixed):
    other, other_rank, other_alpha = wl.import_lora(path, CONFIG)
    assert (other_rank, other_alpha) == (rank, alpha), path
    # comfy's non-block lora_B carry alpha / rank = 2 (no alpha key): exact in float32 both ways.
    assert_adapters_equal(other, adapters)


def test_export_is_the_comfy_file_diffusers_loads(lora, tmp_path):
  path = str(tmp_path / 'ours.safetensors')
  wl.export_lora(*lora, path, base='wan_transformer_tiny')
  ours, theirs = load_file(path), load_file(LORA['comfy'])
  assert ours.keys() == theirs.keys()
  for key in theirs:
    assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  with safe_open(path, 'numpy') as f:
    assert f.metadata()['ss_network_alpha'] == '8'
    assert f.metadata()['sora_jax_base_model'] == 'wan_transformer_tiny'
  assert_adapters_equal(wl.import_lora(path, CONFIG)[0], lora[0])


def test_merged_weights_match_diffusers_lora(model, base, lora, io):
  assert rel_l2(io['out_lora'], io['out_base']) > 0.3  # the LoRA matters
  out = run(model, wl.merge(base, *lora), io)
  err, err_fused = rel_l2(out, io['out_lora']), rel_l2(out, io['out_fused'])
  print(f'merged LoRA rel L2 vs diffusers LoRA {err:.2e}, vs diffusers fused {err_fused:.2e}')
  assert err < 1e-4 and err_fused < 1e-4
  assert rel_l2(run(model, base, io), io['out_base']) < 1e-4


def test_export_diffusers_is_save_pretrained(model, base, lora, io, tmp_path):
  folder = str(tmp_path / 'fused')
  written = wl.export_diffusers(wl.merge(base, *lora), CONFIG, folder)
  assert written == ['config.json', 'diffusion_pytorch_model.safetensors']
  with open(os.path.join(folder, 'config.json')) as f, open(os.path.join(FUSED, 'config.json')) as g:
    assert f.read() == g.read()
  with open(os.path.join(FUSED, 'tensors.json')) as f:
    expected = json.load(f)
  tensors = load_file(os.path.join(folder, wt.WEIGHTS_NAME))
  assert tensors.keys() == expected.keys()
  worst = 0.0
  for key, x in tensors.items():
    assert [list(x.shape), str(x.dtype)] == [expected[key]['shape'], expected[key]['dtype']], key
    worst = max(worst, rel_l2(fingerprint(x), expected[key]['fingerprint']))
  print(f'export_diffusers vs save_pretrained: worst tensor fingerprint rel L2 {worst:.2e}')
  assert worst < 1e-5

  abstract = nnx.eval_shape(lambda: model)
  reloaded = wt.load_wan_params(folder, abstract)
  err = rel_l2(_forward(reloaded, io['latents'], io['timesteps'], io['text']), io['out_fused'])
  print(f'export_diffusers reloaded by load_wan_params: rel L2 vs diffusers fused {err:.2e}')
  assert err < 1e-4


def test_export_diffusers_inverts_param_table_exactly(base, tmp_path):
  wl.export_diffusers(base, CONFIG, str(tmp_path))
  ours, theirs = load_file(str(tmp_path / wt.WEIGHTS_NAME)), load_file(f'{TINY}/{wt.WEIGHTS_NAME}')
  assert ours.keys() == theirs.keys()
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_export_diffusers_sharded_bf16(model, base, tmp_path):
  written = wl.export_diffusers(base, CONFIG, str(tmp_path), max_shard_bytes=30_000,
                                dtype=ml_dtypes.bfloat16)
  index = json.loads((tmp_path / (wt.WEIGHTS_NAME + '.index.json')).read_text())
  shards = sorted(set(index['weight_map'].values()))
  assert len(shards) > 2 and shards[0] == 'diffusion_pytorch_model-00001-of-%05d.safetensors' % len(
      shards) and written[1:-1] == shards
  sizes = [os.path.getsize(tmp_path / s) for s in shards]
  assert index['metadata']['total_size'] == sum(x.size for x in base.values()) * 2
  assert max(sizes) < 30_000 + 4096  # tensors plus the safetensors header
  reloaded = nnx.state(wt.load_wan_params(str(tmp_path), nnx.eval_shape(lambda: model)))
  for path, v in nnx.to_flat_state(reloaded):
    np.testing.assert_array_equal(v.get_value(), base[path].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32), err_msg=str(path))


def test_split_adapters_and_export_rejects_lora_entries(base, lora):
  adapters, rank, alpha = lora
  with_lora = dict(base)
  for module, arrays in adapters.items():
    for part, value in arrays.items():
      with_lora[(*module, part)] = value
  params, split = wl.split_adapters(with_lora)
  assert params.keys() == base.keys()
  assert_adapters_equal(split, adapters)
  with pytest.raises(ValueError, match=r'no diffusers key \(LoRA entries: merge\(\).*'
                     r'blocks/attn1/to_q/lora_a'):
    wl.export_diffusers(with_lora, CONFIG, '/nonexistent')
  wrong = {**base, ('blocks', 'ffn', 'up', 'kernel'): np.zeros((2, 32, 48), np.float32)}
  with pytest.raises(ValueError,
                     match=r'blocks/ffn/up/kernel \(2, 32, 48\) \(expected \(2, 32, 64\)'):
    wl.export_diffusers(wrong, CONFIG, '/nonexistent')


def test_mixed_alphas_and_ranks_fold_into_one_scale(lora, tmp_path):
  tensors = load_file(LORA['comfy'])
  q0 = 'diffusion_model.blocks.0.self_attn.q'
  tensors[f'{q0}.alpha'] = np.array(2.0, np.float32)  # scale 0.5 there, 2 elsewhere
  k = 'diffusion_model.blocks.1.cross_attn.k'  # rank 2 there
  tensors[f'{k}.lora_A.weight'] = tensors[f'{k}.lora_A.weight'][:2].copy()
  tensors[f'{k}.lora_B.weight'] = tensors[f'{k}.lora_B.weight'][:, :2].copy()
  tensors[f'{k}.alpha'] = np.array(4.0, np.float32)  # scale 2 at rank 2
  path = str(tmp_path / 'mixed.safetensors')
  save_file(tensors, path)
  adapters, rank, alpha = wl.import_lora(path, CONFIG)
  assert (rank, alpha) == (4, 8.0)
  ref = lora[0]
  q, k = adapters[('blocks', 'attn1', 'to_q')], adapters[('blocks', 'attn2', 'to_k')]
  np.testing.assert_array_equal(q['lora_b'][0], ref[('blocks', 'attn1', 'to_q')]['lora_b'][0] / 4)
  np.testing.assert_array_equal(q['lora_b'][1], ref[('blocks', 'attn1', 'to_q')]['lora_b'][1])
  np.testing.assert_array_equal(k['lora_a'][1][:, 2:], 0)
  np.testing.assert_array_equal(k['lora_a'][1][:, :2],
                                ref[('blocks', 'attn2', 'to_k')]['lora_a'][1][:, :2])


# --------------------------------------------------------------------------- errors


def _edited(tmp_path, edit, source='comfy'):
  tensors = load_file(LORA[source])
  edit(tensors)
  path = str(tmp_path / 'edited.safetensors')
  save_file(tensors, path)
  return path


def test_error_keys_of_another_architecture(tmp_path):
  def edit(t):
    t['diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight'] = np.zeros((4, 32), np.float32)
    t['diffusion_model.blocks.2.self_attn.q.lora_A.weight'] = np.zeros((4, 32), np.float32)
  with pytest.raises(ValueError, match=r'2 keys name no LoRA part.*'
                     r'blocks\.0\.cross_attn\.k_img\.lora_A\.weight.*blocks\.2\.self_attn\.q'):
    wl.import_lora(_edited(tmp_path, edit), CONFIG)

  def bias(t):  # PEFT lora_bias=True: not representable here
    t['transformer.blocks.0.attn1.to_q.lora_B.bias'] = np.zeros(32, np.float32)
  with pytest.raises(ValueError,
                     match=r'peft layout.*transformer\.blocks\.0\.attn1\.to_q\.lora_B\.bias'):
    wl.import_lora(_edited(tmp_path, bias, 'peft'), CONFIG)


def test_error_wrong_shape(tmp_path):
  def edit(t):
    t['lora_unet_blocks_1_ffn_0.lora_up.weight'] = np.zeros((48, 4), np.float32)
  with pytest.raises(ValueError, match=r'lora_unet_blocks_1_ffn_0\.lora_down\.weight \(4, 32\) / '
                     r'lora_unet_blocks_1_ffn_0\.lora_up\.weight \(48, 4\): '
                     r'expected \[r, 32\] / \[64, r\]'):
    wl.import_lora(_edited(tmp_path, edit, 'musubi'), CONFIG)
  bigger = dict(CONFIG, ffn_dim=96)  # a file for a smaller model of the same family
  with pytest.raises(ValueError, match=r'blocks\.0\.ffn\.0\.lora_A\.weight.*\[96, r\]'):
    wl.import_lora(LORA['comfy'], bigger)


def test_error_missing_layer_and_partner(tmp_path):
  def edit(t):
    del t['diffusion_model.blocks.1.ffn.2.lora_A.weight']
    del t['diffusion_model.blocks.1.ffn.2.lora_B.weight']
    del t['diffusion_model.blocks.1.ffn.2.alpha']
    del t['diffusion_model.head.head.lora_B.weight']
  with pytest.raises(ValueError) as e:
    wl.import_lora(_edited(tmp_path, edit), CONFIG)
  assert ("diffusion_model.head.head has ['diffusion_model.head.head.lora_A.weight'] but no "
          'lora_B') in str(e.value)
  assert 'blocks/ffn/down is adapted in some layers but not in [1]' in str(e.value)


def test_error_not_a_lora(tmp_path):
  with pytest.raises(ValueError,
                     match=r'not a Wan LoRA in a known layout.*its keys: blocks\.0\.attn1'):
    wl.import_lora(f'{TINY}/{wt.WEIGHTS_NAME}', CONFIG)


def test_error_bad_adapters(lora, tmp_path):
  adapters, rank, alpha = lora
  with pytest.raises(ValueError, match=r"\('blocks', 'attn1', 'to_q'\): lora_a \(2, 32, 4\) and "
                     r"lora_b \(2, 4, 32\) are not \[L, din, 8\]"):
    wl.export_lora(adapters, 8, alpha, str(tmp_path / 'x.safetensors'))
  with pytest.raises(ValueError, match=r"\('blocks', 'norm2'\): not a linear layer"):
    wl.export_lora({('blocks', 'norm2'): {}}, rank, alpha, str(tmp_path / 'x.safetensors'))

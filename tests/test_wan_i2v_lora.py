"""Wan LoRA interop for the image-to-video modules (issue 19 part 1): attn2.add_k_proj / add_v_proj
(original Wan: cross_attn.k_img / v_img) and the image embedding (img_emb.proj.1 / .3), named as
diffusers' _convert_non_diffusers_wan_lora_to_diffusers pairs them."""

import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from sora_jax.interop import wan_lora as wl
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import wan

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
I2V = wt.wan_config_from_diffusers(os.path.join(FIXTURES, 'wan_i2v_tiny', 'transformer'))
T2V = wt.wan_config_from_diffusers(os.path.join(FIXTURES, 'wan_transformer_tiny'))


def random_adapters(cfg_dict, rank=4, seed=0):
  shapes = wl.parameter_shapes(wan.WanConfig.from_diffusers(cfg_dict))
  rng = np.random.default_rng(seed)
  out = {}
  for module in wl.ALL_LINEARS:
    din, dout = shapes[(*module, 'kernel')][-2:]
    lead = shapes[(*module, 'kernel')][:-2]
    out[module] = {'lora_a': rng.standard_normal((*lead, din, rank)).astype(np.float32),
                   'lora_b': rng.standard_normal((*lead, rank, dout)).astype(np.float32)}
  return out


def test_i2v_linears_are_the_param_tables():
  table = wt.param_table(wan.WanConfig.from_diffusers(I2V))
  linears = {path[:-1]: keys[0].removesuffix('.weight').removeprefix('blocks.0.')
             for path, (keys, fn) in table.items() if fn is wt._linear_kernel}
  assert linears == {path: theirs for path, (theirs, _) in wl.ALL_LINEARS.items()}


@pytest.mark.parametrize('alpha', [4.0, 8.0])
def test_i2v_lora_round_trips(tmp_path, alpha):
  adapters = random_adapters(I2V)
  path = str(tmp_path / 'i2v.safetensors')
  wl.export_lora(adapters, 4, alpha, path)
  with safe_open(path, 'numpy') as f:
    keys = set(f.keys())
  for name in ('diffusion_model.blocks.1.cross_attn.k_img.lora_A.weight',
               'diffusion_model.blocks.0.cross_attn.v_img.lora_B.weight',
               'diffusion_model.img_emb.proj.1.lora_A.weight',
               'diffusion_model.img_emb.proj.3.lora_B.weight'):
    assert name in keys, name
  back, rank, back_alpha = wl.import_lora(path, I2V)
  assert (rank, back_alpha) == (4, alpha) and back.keys() == adapters.keys()
  for module in adapters:
    for part in ('lora_a', 'lora_b'):
      np.testing.assert_allclose(back[module][part], adapters[module][part], rtol=1e-6,
                                 err_msg=f'{module} {part}')
  # diffusers' PEFT layout and musubi-tuner's name the same modules their own way.
  for layout, prefix in (('peft', 'transformer.'), ('musubi', '')):
    tensors = {}
    for module, arrays in adapters.items():
      layers = range(2) if wl.is_block(module) else [None]
      for i in layers:
        a = arrays['lora_a'] if i is None else arrays['lora_a'][i]
        b = arrays['lora_b'] if i is None else arrays['lora_b'][i]
        name = prefix + wl.module_name(module, i, layout)
        part_a, part_b = ('lora_A', 'lora_B') if layout == 'peft' else ('lora_down', 'lora_up')
        tensors[f'{name}.{part_a}.weight'] = np.ascontiguousarray(a.T)
        tensors[f'{name}.{part_b}.weight'] = np.ascontiguousarray(b.T)
    other = str(tmp_path / f'{layout}.safetensors')
    save_file(tensors, other)
    assert 'blocks.0.attn2.add_k_proj' in ' '.join(tensors) or layout == 'musubi'
    got, r, a = wl.import_lora(other, I2V)
    assert (r, a) == (4, 4.0) and got.keys() == adapters.keys()
    np.testing.assert_array_equal(got[('blocks', 'attn2', 'add_v_proj')]['lora_b'],
                                  adapters[('blocks', 'attn2', 'add_v_proj')]['lora_b'])


def test_i2v_lora_on_a_t2v_model_names_the_image_modules(tmp_path):
  path = str(tmp_path / 'i2v.safetensors')
  wl.export_lora(random_adapters(I2V), 4, 4.0, path)
  with pytest.raises(ValueError, match='k_img'):
    wl.import_lora(path, T2V)


def test_i2v_lora_run_exports_its_image_adapters(tmp_path):
  """A LoRA run on the I2V transformer (default targets: attn2's add_k_proj / add_v_proj too)
  exports its adapters as a LoRA file and, merged, as a diffusers folder that loads as I2V."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from sora_jax import export  # pylint: disable=g-import-not-at-top
  from sora_jax.training import factory  # pylint: disable=g-import-not-at-top
  from test_wan_i2v_training import i2v_config, i2v_pipeline  # pylint: disable=g-import-not-at-top
  config = i2v_config(i2v_pipeline(tmp_path / 'Wan-I2V-tiny'))
  config.lora.rank, config.lora.alpha = 4, 8.0
  model = factory.build(config, nnx.Rngs(0))
  rng = np.random.default_rng(0)
  flat = {p: rng.standard_normal(v.shape).astype(np.float32) if p[-1] == 'lora_b'
          else np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  dit = {p[1:]: v for p, v in flat.items() if p[0] == 'dit'}
  _, adapters = wl.split_adapters(dit)
  assert {('blocks', 'attn2', 'add_k_proj'), ('blocks', 'attn2', 'add_v_proj')} <= set(adapters)
  path = str(tmp_path / 'run.safetensors')
  wl.export_lora(adapters, 4, 8.0, path)
  back, rank, alpha = wl.import_lora(path, export.diffusers_config(config))
  assert (rank, alpha) == (4, 8.0) and back.keys() == adapters.keys()
  np.testing.assert_allclose(back[('blocks', 'attn2', 'add_k_proj')]['lora_b'],
                             adapters[('blocks', 'attn2', 'add_k_proj')]['lora_b'], rtol=1e-6)
  base, _ = wl.split_adapters(dit)
  merged = wl.merge(base, adapters, 4, 8.0)
  wl.export_diffusers(merged, export.diffusers_config(config), str(tmp_path / 'merged'))
  loaded = wt.load_wan_transformer(str(tmp_path / 'merged'), task='i2v').model
  got = np.asarray(loaded.blocks.attn2.add_k_proj.kernel.get_value())
  np.testing.assert_allclose(got, merged[('blocks', 'attn2', 'add_k_proj', 'kernel')], rtol=1e-6)

"""Load a diffusers-format Wan `WanTransformer3DModel` (Wan 2.1 text-to-video or image-to-video, or
one Wan 2.2 A14B expert) into sora_jax.models.wan.WanDiT (no torch).

A folder holds config.json and either diffusion_pytorch_model.safetensors or shards listed by
diffusion_pytorch_model.safetensors.index.json; a pipeline folder (its parent, with a transformer/
subfolder) works too. Tensors are read with safetensors' numpy API (bfloat16 included, via ml_dtypes)
and converted by an explicit name table (`param_table`): every checkpoint key must be consumed and
every model parameter assigned, or the error lists what is missing / unexpected.

Wan 2.2 A14B pipelines (T2V and I2V) hold two experts of the same architecture, switched by timestep
as diffusers' WanPipeline / WanImageToVideoPipeline do: transformer/ (the high-noise expert) runs the
steps with timestep >= boundary_ratio * 1000 (model_index.json's boundary_ratio; 1000 =
num_train_timesteps), transformer_2/ (the low-noise expert) the others. Such a folder loads one expert
by name (`expert='high_noise'` or `'low_noise'`; `load_wan_experts` loads both); loading it without
one is refused rather than silently half loaded. I2V-A14B's experts take the 36-channel input (noisy
latents, frame mask, first-frame latents) without CLIP image tokens.

  f = load_wan_transformer('Wan2.1-T2V-1.3B-Diffusers')
  v = f(latents, timesteps, text_embeddings)  # [B,T,H,W,16], [B] on 0..1000, [B,512,4096] (UMT5)
  f = load_wan_transformer('Wan2.1-I2V-14B-480P-Diffusers', task='i2v')
  v = f(latents, timesteps, text_embeddings, image_embeds)  # [B,T,H,W,36], ..., [B,257,1280] (CLIP)
  f = load_wan_experts('Wan2.2-T2V-A14B-Diffusers')  # the expert the timestep picks, as diffusers
  v = f(latents, timestep, text_embeddings)  # one timestep per call (a sampler step)
  f = load_wan_transformer('Wan2.2-TI2V-5B-Diffusers')  # expand_timesteps: true
  v = f(latents, timesteps, text_embeddings)  # [B,T,H,W,48], timesteps [B, T]: 0 on a given frame

Wan 2.2 TI2V-5B (model_index.json `expand_timesteps: true`) is one transformer in the Wan 2.2 VAE's
48-channel latents; its pipeline conditions on an image by a clean first latent frame with timestep
0 on its tokens (per-frame timesteps [B, T] here). `check_vae` refuses a TI2V transformer paired with
a Wan 2.1 VAE, or a Wan 2.1 / A14B transformer with the Wan 2.2 VAE, naming both.
"""

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.config import validation
from sora_jax.interop import safetensors_io
from sora_jax.models import wan
from sora_jax.parallel import sharding

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
# Keys diffusers itself skips when loading (WanTransformer3DModel._keys_to_ignore_on_load_unexpected).
IGNORED_KEY_PARTS = ('norm_added_q',)
TASKS = ('t2v', 'i2v')
# Wan 2.2 A14B experts: name -> the pipeline subfolder holding it (diffusers' order).
EXPERTS = {'high_noise': 'transformer', 'low_noise': 'transformer_2'}
NUM_TRAIN_TIMESTEPS = 1000  # the scheduler's num_train_timesteps: boundary = boundary_ratio * it
# Key parts only image-to-video checkpoints have.
I2V_KEY_PARTS = ('image_embedder', 'add_k_proj', 'add_v_proj', 'norm_added_k')


def transformer_dir(path: str, expert: str | None = None) -> str:
  """The folder holding the transformer's config.json: `path` itself or `path/transformer` (an A14B
  pipeline's `expert`: `path/transformer` or `path/transformer_2`)."""
  if expert:
    check_expert(expert)
    _check_pipeline(path, expert)
    candidates = (os.path.join(path, EXPERTS[expert]),)
  else:
    candidates = (path, os.path.join(path, 'transformer'))
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
      return candidate
  raise FileNotFoundError(
      f'No Wan transformer at {path!r}: expected {CONFIG_NAME} '
      + (f'in {candidates[0]!r} (the {expert} expert of a Wan 2.2 A14B pipeline folder)' if expert
         else f'there or in {candidates[1]!r} (a diffusers WanTransformer3DModel folder)'))


def check_expert(expert) -> None:
  if expert not in EXPERTS:
    raise ValueError(f'expert={expert!r}: expected one of {tuple(EXPERTS)} (Wan 2.2 A14B: '
                     'transformer/ is the high-noise expert, transformer_2/ the low-noise one)')


def boundary_ratio(path: str) -> float | None:
  """A Wan 2.2 A14B pipeline folder's boundary_ratio (None: a single-transformer folder). A folder
  with transformer_2 but no boundary_ratio runs transformer_2 never in diffusers: refused."""
  index = validation.model_index(path)
  ratio = index.get('boundary_ratio')
  if ratio is None and (index.get('transformer_2') or [None])[0]:
    raise ValueError(f'{path!r}: model_index.json lists transformer_2 without a boundary_ratio '
                     '(diffusers would never run it); a Wan 2.2 A14B pipeline sets both.')
  return None if ratio is None else float(ratio)


def expand_timesteps(path: str) -> bool:
  """Whether the pipeline folder `path` is Wan 2.2 TI2V's (model_index.json `expand_timesteps`:
  per-token timesteps, the first frame kept clean for image-to-video); False without one."""
  return bool(validation.model_index(path).get('expand_timesteps'))


def check_vae(path: str, vae_path: str | None = None, expert: str | None = None) -> None:
  """Refuses a transformer and a VAE that were not released together: Wan 2.2 TI2V's
  (expand_timesteps in `path`'s model_index.json) needs the Wan 2.2 VAE (patch_size 2, 48
  channels), every other Wan transformer a Wan 2.1 VAE, and the latent channels must agree.
  `vae_path`: the VAE folder (default: `path`'s vae/; nothing to check without one)."""
  from sora_jax.interop import wan_vae  # pylint: disable=g-import-not-at-top
  if vae_path is None:
    vae_path = os.path.join(path, 'vae')
    if not os.path.isfile(os.path.join(vae_path, CONFIG_NAME)):
      return
  validation.check_wan_vae(path, wan_config_from_diffusers(path, expert), expand_timesteps(path),
                           vae_path, wan_vae.load_config(vae_path))


def wan_config_from_diffusers(path: str, expert: str | None = None) -> dict:
  """The transformer's config.json as a dict (validated: the class must be WanTransformer3DModel;
  a Wan 2.2 A14B pipeline folder needs `expert`, and only such a folder takes one)."""
  folder = transformer_dir(path, expert)
  if folder != path:
    _check_pipeline(path, expert)
  with open(os.path.join(folder, CONFIG_NAME)) as f:
    config = json.load(f)
  cls = config.get('_class_name', 'WanTransformer3DModel')
  if cls != 'WanTransformer3DModel':
    raise ValueError(f'{path!r} holds a {cls}, not a WanTransformer3DModel')
  return config


def _check_pipeline(path: str, expert: str | None) -> None:
  """A Wan 2.2 A14B pipeline folder (two experts switched by timestep) is loaded one named expert
  at a time, not half loaded by accident; an expert of another folder is an error."""
  ratio = boundary_ratio(path)
  if ratio is not None and not expert:
    raise ValueError(
        f'{path!r} is a Wan 2.2 A14B pipeline ({validation.model_index(path).get("_class_name")}: two expert '
        f'transformers switched at boundary_ratio={ratio}): name the expert to load, '
        f"expert='high_noise' (transformer/, timesteps >= {ratio * NUM_TRAIN_TIMESTEPS:g}) or "
        "'low_noise' (transformer_2/) (config.model.wan.expert), or load both with "
        'load_wan_experts')
  if ratio is None and expert:
    raise ValueError(f'expert={expert!r} but {path!r} is not a Wan 2.2 A14B pipeline folder '
                     '(model_index.json has no boundary_ratio / transformer_2): it holds one '
                     'transformer, loaded without an expert')


def wan_task(config: dict) -> str:
  """'i2v' for an image-to-video WanTransformer3DModel config.json dict (Wan 2.1: CLIP image tokens,
  image_dim set; Wan 2.2 I2V-A14B: the 2C + 4 channel input without them), else 't2v'."""
  if config.get('image_dim') is not None:
    return 'i2v'
  out = config.get('out_channels') or config.get('in_channels', 16)
  return 'i2v' if config.get('in_channels', 16) == 2 * out + wan.I2V_MASK_CHANNELS else 't2v'


def check_task(config: dict, task: str | None, path: str = '') -> None:
  """Raises ValueError naming what the folder holds when it is not the `task` ('t2v' / 'i2v')
  transformer; None accepts either."""
  if task is None:
    return
  if task not in TASKS:
    raise ValueError(f'task={task!r}: expected one of {TASKS}')
  found = wan_task(config)
  if found == task:
    return
  where = f'{path!r} holds' if path else 'This is'
  if found == 't2v':
    raise ValueError(
        f'{where} a text-to-video Wan transformer (config.json: no image_dim / '
        f'added_kv_proj_dim, in_channels={config.get("in_channels")}); image-to-video needs a Wan '
        '2.1 I2V one (e.g. Wan2.1-I2V-14B-480P-Diffusers: CLIP image tokens, 36 input channels)')
  raise ValueError(
      f'{where} an image-to-video Wan transformer (config.json: image_dim={config.get("image_dim")}, '
      f'in_channels={config.get("in_channels")}); text-to-video needs a Wan 2.1 T2V one (e.g. '
      'Wan2.1-T2V-14B-Diffusers)')


def weight_files(path: str, expert: str | None = None) -> dict[str, str]:
  """Checkpoint key -> safetensors file holding it (single file or sharded)."""
  return safetensors_io.weight_files(transformer_dir(path, expert), WEIGHTS_NAME)


# --------------------------------------------------------------------------- name table


def _linear_kernel(w):  # torch Linear weight [out, in] -> kernel [in, out]
  return w.T


def _conv_kernel(w):
  """Conv3d weight [D, C, pt, ph, pw] -> linear kernel [(pt, ph, pw, C), D], the feature order of
  dit.patchify; a stride = kernel conv is exactly that linear map applied per patch."""
  return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])


def _squeeze0(w):  # scale_shift_table [1, k, D] -> [k, D]
  return w[0]


def _same(w):
  return w


def param_table(cfg: wan.WanConfig) -> dict[tuple[str, ...], tuple[list[str], Callable]]:
  """Our parameter path -> (the diffusers keys feeding it, transform of each).

  Stacked block parameters list one key per layer (stacked on the leading 'layers' axis).
  """
  table = {
      ('patch_embedding', 'kernel'): (['patch_embedding.weight'], _conv_kernel),
      ('patch_embedding', 'bias'): (['patch_embedding.bias'], _same),
      ('scale_shift_table',): (['scale_shift_table'], _squeeze0),
  }

  def linear(ours, theirs, layers=None):
    for leaf, suffix, fn in (('kernel', 'weight', _linear_kernel), ('bias', 'bias', _same)):
      keys = ([f'{theirs}.{suffix}'] if layers is None else
              [f'blocks.{i}.{theirs}.{suffix}' for i in range(layers)])
      table[(*ours, leaf)] = (keys, fn)

  linear(('time_embedder_1',), 'condition_embedder.time_embedder.linear_1')
  linear(('time_embedder_2',), 'condition_embedder.time_embedder.linear_2')
  linear(('time_proj',), 'condition_embedder.time_proj')
  linear(('text_embedder_1',), 'condition_embedder.text_embedder.linear_1')
  linear(('text_embedder_2',), 'condition_embedder.text_embedder.linear_2')
  linear(('proj_out',), 'proj_out')

  n = cfg.num_layers
  per_layer = lambda name: [f'blocks.{i}.{name}' for i in range(n)]
  for attn in ('attn1', 'attn2'):
    for proj in ('to_q', 'to_k', 'to_v'):
      linear(('blocks', attn, proj), f'{attn}.{proj}', n)
    linear(('blocks', attn, 'to_out'), f'{attn}.to_out.0', n)
    for norm in ('norm_q', 'norm_k'):
      table[('blocks', attn, norm)] = (per_layer(f'{attn}.{norm}.weight'), _same)
  linear(('blocks', 'ffn', 'up'), 'ffn.net.0.proj', n)
  linear(('blocks', 'ffn', 'down'), 'ffn.net.2', n)
  table[('blocks', 'scale_shift_table')] = (per_layer('scale_shift_table'), _squeeze0)
  if cfg.cross_attn_norm:
    table[('blocks', 'norm2_scale')] = (per_layer('norm2.weight'), _same)
    table[('blocks', 'norm2_bias')] = (per_layer('norm2.bias'), _same)
  if cfg.is_i2v:
    image = 'condition_embedder.image_embedder'
    for norm in ('norm1', 'norm2'):
      table[('image_embedder', f'{norm}_scale')] = ([f'{image}.{norm}.weight'], _same)
      table[('image_embedder', f'{norm}_bias')] = ([f'{image}.{norm}.bias'], _same)
    linear(('image_embedder', 'ff_1'), f'{image}.ff.net.0.proj')
    linear(('image_embedder', 'ff_2'), f'{image}.ff.net.2')
  if cfg.added_kv_proj_dim is not None:
    linear(('blocks', 'attn2', 'add_k_proj'), 'attn2.add_k_proj', n)
    linear(('blocks', 'attn2', 'add_v_proj'), 'attn2.add_v_proj', n)
    table[('blocks', 'attn2', 'norm_added_k')] = (per_layer('attn2.norm_added_k.weight'), _same)
  return table


def check_keys(table, checkpoint_keys, model_paths) -> None:
  """Raises ValueError listing checkpoint keys the table needs but lacks (missing), keys it would not
  use (unexpected) and model parameters the table does not fill (unassigned)."""
  needed = {k for keys, _ in table.values() for k in keys}
  present = {k for k in checkpoint_keys if not any(p in k for p in IGNORED_KEY_PARTS)}
  missing, unexpected = needed - present, present - needed
  unassigned = set(model_paths) - set(table)
  unknown = set(table) - set(model_paths)
  problems = []
  if missing:
    problems.append(f'missing keys ({len(missing)}): {safetensors_io.listing(missing)}')
  if unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}): {safetensors_io.listing(unexpected)}')
  if unassigned:
    problems.append(f'model parameters with no checkpoint source: {safetensors_io.listing(unassigned)}')
  if unknown:
    problems.append(f'name table entries with no model parameter: {safetensors_io.listing(unknown)}')
  i2v_part = lambda keys: any(p in k for k in keys for p in I2V_KEY_PARTS)
  if i2v_part(unexpected) and not i2v_part(needed):
    problems.append('the weights are an image-to-video transformer\'s (image_embedder, '
                    'add_k_proj, ...) but config.json describes a text-to-video one (no image_dim)')
  elif i2v_part(missing) and not i2v_part(present):
    problems.append('config.json describes an image-to-video transformer (image_dim, '
                    'added_kv_proj_dim) but the weights are a text-to-video one\'s')
  if problems:
    raise ValueError('Wan checkpoint does not match the model config: ' + '; '.join(problems))


# --------------------------------------------------------------------------- loading


def load_wan_params(path: str, model: wan.WanDiT, mesh=None,
                    expert: str | None = None) -> wan.WanDiT:
  """`model` (concrete, or abstract from nnx.eval_shape) with the checkpoint's weights (of an A14B
  pipeline folder: `expert`'s).

  Returns a new model; parameters take the model's parameter dtype. With `mesh`, each parameter is
  placed with the sharding its logical axis names give (sora_jax.parallel.sharding.RULES) as it is read.
  """
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  if transformer_dir(path, expert) != path:
    _check_pipeline(path, expert)
  files = weight_files(path, expert)
  table = param_table(model.config)
  check_keys(table, files, flat)
  shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh))) if mesh else {}

  with safetensors_io.reader(files) as read:
    for ours, (keys, fn) in table.items():
      variable = flat[ours]
      arrays = [fn(read(k)) for k in keys]
      value = arrays[0] if ours[0] != 'blocks' else np.stack(arrays)
      if value.shape != tuple(variable.shape):
        raise ValueError(f'Shape mismatch for {keys[0]}{" (and other layers)" if len(keys) > 1 else ""}'
                         f' -> {"/".join(ours)}: checkpoint gives {value.shape}, the model from '
                         f'config.json expects {tuple(variable.shape)}')
      value = value.astype(variable.dtype)
      if ours in shardings:
        target = shardings[ours].get_value()
        value = jax.make_array_from_callback(value.shape, target, lambda idx, v=value: v[idx])
      else:
        value = jnp.asarray(value)
      flat[ours] = variable.replace(value)
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


class WanTransformer:
  """Jitted Wan forward with loaded weights: f(latents, timesteps, text_embeddings[, image_embeds]).

  latents [B, T, H, W, C] channels-last (diffusers is [B, C, T, H, W]; I2V: C = 36, the noisy
  latents, frame mask and first-frame latents); timesteps [B] (or [B, T]) on Wan's 0..1000 scale, a
  scalar is broadcast; text_embeddings [B, L, text_dim] (Wan: UMT5 output zero-padded to 512);
  image_embeds [B, 257, image_dim] for I2V (CLIP hidden_states[-2]). Returns Wan's prediction
  [B, T, H, W, C_out] float32.
  """

  def __init__(self, model: wan.WanDiT, config: dict):
    self.model, self.config = model, config
    graphdef, self._state = nnx.split(model)
    self._forward = jax.jit(
        lambda state, x, t, c, i: nnx.merge(graphdef, state).forward_wan(x, t, c, i))

  def __call__(self, latents, timesteps, text_embeddings, image_embeds=None):
    latents = jnp.asarray(latents)
    timesteps = jnp.asarray(timesteps, jnp.float32)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, latents.shape[:1])
    image_embeds = None if image_embeds is None else jnp.asarray(image_embeds)
    return self._forward(self._state, latents, timesteps, jnp.asarray(text_embeddings),
                         image_embeds)


def load_wan_transformer(path: str, dtype=jnp.float32, *, param_dtype=jnp.float32,
                         scan_layers=True, remat='none', attention_impl=None,
                         mesh=None, task: str | None = None,
                         expert: str | None = None) -> WanTransformer:
  """Builds WanDiT from `path`'s config.json (abstractly: no random init of a 14B model) and loads
  its weights. `dtype`: compute dtype; `param_dtype`: bf16 halves memory for inference; `task`:
  't2v' or 'i2v' refuses the other kind of transformer by name (None: either); `expert`: which
  expert of a Wan 2.2 A14B pipeline folder ('high_noise' / 'low_noise'); the other options as
  wan.WanDiT."""
  config = wan_config_from_diffusers(path, expert)
  check_task(config, task, path)
  check_vae(path, expert=expert)
  cfg = wan.WanConfig.from_diffusers(config)
  with nnx.use_eager_sharding(False):  # placed from the logical-axis metadata, not at creation
    abstract = nnx.eval_shape(lambda: wan.WanDiT(
        cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
        remat=remat, attention_impl=attention_impl, expand_timesteps=expand_timesteps(path)))
  return WanTransformer(load_wan_params(path, abstract, mesh=mesh, expert=expert), config)


def is_high_noise(timestep, ratio: float):
  """Whether diffusers runs the high-noise expert at `timestep` (0..1000 scale; array or float):
  `t >= boundary_ratio * num_train_timesteps`, the pipelines' test."""
  return timestep >= ratio * NUM_TRAIN_TIMESTEPS


class WanExperts:
  """Both experts of a Wan 2.2 A14B pipeline folder: f(latents, timestep, text[, image_embeds])
  runs the expert diffusers' pipeline runs at that timestep (one timestep per call, as a sampler
  step has). `high` / `low`: the WanTransformers; `boundary_ratio` from model_index.json."""

  def __init__(self, high: WanTransformer, low: WanTransformer, ratio: float):
    self.high, self.low, self.boundary_ratio = high, low, ratio

  def expert(self, timestep) -> str:
    t = float(np.asarray(timestep).reshape(-1)[0])
    return 'high_noise' if is_high_noise(t, self.boundary_ratio) else 'low_noise'

  def __call__(self, latents, timesteps, text_embeddings, image_embeds=None):
    f = self.high if self.expert(timesteps) == 'high_noise' else self.low
    return f(latents, timesteps, text_embeddings, image_embeds)


def load_wan_experts(path: str, dtype=jnp.float32, **kwargs) -> WanExperts:
  """Both experts of the Wan 2.2 A14B pipeline folder `path` (keyword arguments as
  load_wan_transformer's)."""
  ratio = boundary_ratio(path)
  if ratio is None:
    raise ValueError(f'{path!r} is not a Wan 2.2 A14B pipeline folder (model_index.json has no '
                     'boundary_ratio): load its transformer with load_wan_transformer')
  return WanExperts(*(load_wan_transformer(path, dtype, expert=e, **kwargs) for e in EXPERTS), ratio)

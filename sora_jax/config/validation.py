"""Config validation: `validate(config, num_devices)` runs before anything compiles and names the
offending key in its message. Pure Python: no JAX.
"""

import functools
import json
import math
import os
import re

import ml_collections
from absl import logging

from sora_jax.config import buckets as buckets_lib
from sora_jax.config import geometry, schema


def _unknown_keys(cfg, ref, prefix=''):
  for key in cfg.keys():
    name = prefix + key
    if key not in ref:
      yield name
    elif isinstance(cfg[key], ml_collections.ConfigDict):
      if not isinstance(ref[key], ml_collections.ConfigDict):
        yield name
      else:
        yield from _unknown_keys(cfg[key], ref[key], name + '.')


def _check_data(config):
  d = config.data
  sources = [k for k in ('manifest', 'prepared', 'tfds_name') if d[k]]
  if len(sources) > 1:
    raise ValueError(f'config.data: set at most one of manifest, prepared, tfds_name; got {sources}.')
  if d.manifest and not os.path.isfile(d.manifest):
    raise ValueError(f'config.data.manifest={d.manifest!r} is not a file.')
  if d.prepared and not os.path.isfile(os.path.join(d.prepared, 'index.json')):
    raise ValueError(f'config.data.prepared={d.prepared!r} holds no index.json: run'
                     ' `python -m sora_jax.prepare` first.')
  if not 0.0 <= d.max_skip_fraction <= 1.0:
    raise ValueError(f'config.data.max_skip_fraction={d.max_skip_fraction} not in [0, 1].')
  if d.read_threads < 1:
    raise ValueError(f'config.data.read_threads={d.read_threads} must be >= 1.')
  if d.fps <= 0:
    raise ValueError(f'config.data.fps={d.fps} must be positive.')
  for name in ('bounce', 'stop', 'rest'):
    if not 0.0 <= d[name] <= 1.0:
      raise ValueError(f'config.data.{name}={d[name]} not in [0, 1].')
  if d.bounce + d.stop + d.rest > 1.0:
    raise ValueError('config.data.bounce + config.data.stop + config.data.rest ='
                     f' {d.bounce + d.stop + d.rest:g} exceeds 1.')
  errors = buckets_lib.check(config)
  if errors:
    raise ValueError(' '.join(errors))


def _check_packing(config):
  d = config.data
  if not isinstance(d.packing, bool):
    raise ValueError(f'config.data.packing={d.packing!r} must be True or False.')
  for key, low in (('packing_length', 0), ('packing_segments', 1), ('packing_bins', 0)):
    if not isinstance(d[key], int) or d[key] < low:
      raise ValueError(f'config.data.{key}={d[key]!r} must be an int >= {low}.')
  if not d.packing:
    return
  patch = tuple(config.model.patch_size)
  longest = max(buckets_lib.shapes(config), key=lambda s: buckets_lib.tokens(s, patch))
  if d.packing_length and d.packing_length < buckets_lib.tokens(longest, patch):
    raise ValueError(
        f'config.data.packing_length={d.packing_length} cannot hold a clip of {longest}'
        f' ({buckets_lib.tokens(longest, patch)} tokens with config.model.patch_size={patch}).')


def _check_causal_clip(config, temporal, spatial, what):
  """A causal autoencoder encodes the first frame alone, then groups of `temporal` frames."""
  for t, h, w in buckets_lib.shapes(config):
    if (t - 1) % temporal or h % spatial or w % spatial:
      key = 'config.data.buckets' if config.data.buckets else (
          'config.data.num_frames' if (t - 1) % temporal else 'config.data.height/width')
      raise ValueError(
          f'{key}: clip {(t, h, w)} does not fit {what} ({temporal}x temporal, {spatial}x spatial'
          f' compression): frames must be 1 + {temporal}k (e.g. {1 + temporal * max(1, t // temporal)})'
          f' and height/width multiples of {spatial}.')


def _check_vae(config):
  v = config.vae
  if v.z_dim <= 0 or v.base_dim <= 0 or v.num_res_blocks <= 0 or not v.dim_mult:
    raise ValueError('config.vae: z_dim, base_dim, num_res_blocks must be positive and dim_mult'
                     ' non-empty.')
  if len(v.temperal_downsample) != len(v.dim_mult) - 1:
    raise ValueError(f'config.vae.temperal_downsample={tuple(v.temperal_downsample)} needs'
                     f' len(config.vae.dim_mult) - 1 = {len(v.dim_mult) - 1} entries.')
  if config.autoencoder:
    raise ValueError('config.autoencoder must be empty when training an autoencoder'
                     ' (model.family="vae").')
  for key in ('l1_weight', 'l2_weight', 'kl_weight'):
    if v[key] < 0:
      raise ValueError(f'config.vae.{key}={v[key]} must be >= 0.')
  _check_causal_clip(config, 2 ** sum(bool(x) for x in v.temperal_downsample),
                     2 ** (len(v.dim_mult) - 1), 'config.vae')


def _check_transformer(config, mesh):
  m = config.model
  patch = tuple(m.patch_size)
  if len(patch) != 3 or any(p <= 0 for p in patch):
    raise ValueError(f'config.model.patch_size={patch} must be three positive ints (t, h, w).')
  clips = buckets_lib.shapes(config)
  ae_geometry = None
  if config.autoencoder:
    ae_geometry = geometry.autoencoder_geometry(config.autoencoder)
    _check_causal_clip(config, ae_geometry['temporal'], ae_geometry['spatial'],
                       f'config.autoencoder={config.autoencoder!r}')
  for clip in clips:
    where = f'the clip {clip}'
    if ae_geometry:
      clip = geometry.latent_shape(clip, ae_geometry)
      where = f'the latent clip {clip}'
    for name, n, p in zip(('num_frames', 'height', 'width'), clip, patch):
      if n % p:
        key = 'config.data.buckets' if config.data.buckets else f'config.data.{name}'
        raise ValueError(
            f'config.model.patch_size={patch} does not divide {where}: {key}={n if not ae_geometry else clip}'
            f' gives {name} {n}, not a multiple of {p}.')
  if mesh['context'] > 1:
    for clip in clips:
      shape = geometry.latent_shape(clip, ae_geometry) if ae_geometry else clip
      tokens = math.prod(n // p for n, p in zip(shape, patch))
      if tokens % mesh['context']:
        raise ValueError(f'config.mesh.context={mesh["context"]} does not divide the {tokens} tokens'
                         f' of clip {clip}: the token sequence is split evenly over it.')
  _check_packing(config)
  if config.data.packing and (m.family != 'dit' or config.autoencoder or
                              config.text.encoder != 'bytes'):
    raise ValueError('config.data.packing=True works with model.family="dit" on pixels with the byte'
                     ' text encoder only (packed latents / frozen-encoder captions are not'
                     ' implemented); set config.data.packing=False.')
  if m.family == 'wan':
    w = m.wan
    width, heads, head_dim = w.num_attention_heads * w.attention_head_dim, w.num_attention_heads, \
        w.attention_head_dim
    if head_dim % 2 or head_dim < 6:
      raise ValueError(f'config.model.wan.attention_head_dim={head_dim} must be even and >= 6.')
    _check_wan_ti2v(config)
    _check_wan_i2v(config)
  else:
    width, heads = m.width, m.num_heads
    if m.width % m.num_heads or (m.width // m.num_heads) % 2 or m.width // m.num_heads < 6:
      raise ValueError(
          f'config.model.width={m.width} / num_heads={m.num_heads} must give an even head dim'
          ' of at least 6 (3D RoPE rotates pairs on each of the t, h, w axes).')
  if width % mesh['tensor'] or heads % mesh['tensor']:
    raise ValueError(
        f'config.model width {width} and {heads} heads must be divisible by'
        f' config.mesh.tensor={mesh["tensor"]}.')


def _check_wan_ti2v(config):
  """Wan 2.2 TI2V (model.wan.expand_timesteps): one text-to-video transformer conditioned through
  given frames, not through image channels or experts."""
  w = config.model.wan
  if w.get('expand_timesteps', False) and (int(w.get('image_dim', 0) or 0)
                                           or w.get('image_condition', False) or w.get('expert', '')):
    raise ValueError('config.model.wan.expand_timesteps (Wan 2.2 TI2V: the image enters as a given'
                     ' first frame) takes no image_dim, image_condition or expert: those are Wan'
                     ' 2.1 I2V / Wan 2.2 A14B models.')


def _check_wan_pipeline(config, weights: bool):
  """init_from's pipeline must be TI2V's (expand_timesteps) exactly when the run is, and its
  transformer must fit config.autoencoder (wan_transformer.check_vae)."""
  w = config.model.wan
  ti2v = bool(w.get('expand_timesteps', False))
  path = config.init_from
  if not weights or not path or not os.path.isdir(path) or _is_sora_workdir(path):
    return
  folder_ti2v = bool(model_index(path).get('expand_timesteps'))
  if folder_ti2v != ti2v:
    raise ValueError(
        f'config.init_from={path!r} is {"" if folder_ti2v else "not "}a Wan 2.2 TI2V pipeline'
        f' (model_index.json expand_timesteps: {str(folder_ti2v).lower()}) but'
        f' config.model.wan.expand_timesteps={ti2v}: use '
        + ('configs/wan2_2_ti2v_5b.py.' if folder_ti2v else
           'a Wan 2.1 / A14B config (configs/wan2_1_t2v_1_3b.py, wan2_2_a14b.py).'))
  vae_file = os.path.join(config.autoencoder or '', 'config.json')
  if config.autoencoder and not _is_sora_workdir(config.autoencoder) and os.path.isfile(vae_file):
    sub = 'transformer_2' if w.get('expert', '') == 'low_noise' else 'transformer'
    folder = os.path.join(path, sub) if os.path.isdir(os.path.join(path, sub)) else path
    with open(os.path.join(folder, 'config.json')) as f, open(vae_file) as g:
      check_wan_vae(path, json.load(f), folder_ti2v, config.autoencoder, json.load(g))


def _vae_kind(vae_config: dict) -> str:
  if int(vae_config.get('patch_size') or 1) > 1 or vae_config.get('is_residual'):
    return (f'a Wan 2.2 VAE (z_dim {vae_config.get("z_dim")}, patch_size '
            f'{vae_config.get("patch_size")}: x16 spatial)')
  return f'a Wan 2.1 VAE (z_dim {vae_config.get("z_dim", 16)}, x8 spatial)'


def check_wan_vae(path: str, config: dict, ti2v: bool, vae_path: str, vae_config: dict) -> None:
  """Refuses a Wan transformer (`config`: its config.json; `ti2v`: its pipeline's expand_timesteps)
  and a VAE (`vae_config`) that were not released together, naming both folders."""
  wan22_vae = int(vae_config.get('patch_size') or 1) > 1 or bool(vae_config.get('is_residual'))
  channels = config.get('out_channels') or config.get('in_channels', 16)
  what = (f'{path!r} is a Wan 2.2 TI2V transformer (model_index.json expand_timesteps: true, '
          f'{channels} latent channels)' if ti2v else
          f'{path!r} is a Wan 2.1 / 2.2 A14B transformer (no expand_timesteps, {channels} latent '
          'channels)')
  vae_what = f'{vae_path!r} holds {_vae_kind(vae_config)}'
  if ti2v != wan22_vae:
    need = ('the Wan 2.2 VAE (Wan2.2-TI2V-5B-Diffusers/vae: z_dim 48, patch_size 2)' if ti2v else
            'the Wan 2.1 VAE (z_dim 16, x8), which Wan 2.1 and Wan 2.2 A14B share')
    raise ValueError(f'{what}, but {vae_what}: it was released with {need}.')
  if int(vae_config.get('z_dim', 16)) != int(channels):
    raise ValueError(f'{what}, but {vae_what}: the latent channels differ.')


def _is_sora_workdir(path: str) -> bool:
  config_file = os.path.join(path, 'config.json')
  if not os.path.isfile(config_file) or model_index(path):
    return False
  with open(config_file) as f:
    return 'model' in json.load(f)


def _check_wan_i2v(config):
  """Wan 2.1 image-to-video: CLIP image tokens and the first frame's latents need both frozen
  encoders, and condition every clip on its first frame (not config.condition's given frames)."""
  image_dim = int(config.model.wan.get('image_dim', 0) or 0)
  if config.model.wan.get('image_condition', False) and not image_dim:
    if config.get('image_encoder') or not config.autoencoder:
      raise ValueError('config.model.wan.image_condition=True (Wan 2.2 I2V-A14B: the first frame\'s'
                       ' VAE latents and frame mask, no CLIP tokens) needs config.autoencoder (the'
                       ' Wan VAE) and no config.image_encoder.')
    if {str(n) for n, _ in config.condition.mix} - {'none'}:
      raise ValueError('Wan image-to-video conditions every clip on its first frame through its'
                       ' input channels; config.condition.mix must be "none".')
    return
  if not image_dim and config.get('image_encoder'):
    raise ValueError(f'config.image_encoder={config.image_encoder!r} needs an image-to-video Wan'
                     ' model: set config.model.wan.image_dim (1280 for Wan 2.1 I2V).')
  if not image_dim:
    return
  if config.model.wan.get('image_condition', False):
    raise ValueError(f'config.model.wan.image_dim={image_dim} (Wan 2.1 I2V: CLIP image tokens) and'
                     ' config.model.wan.image_condition=True (Wan 2.2 I2V-A14B: no CLIP tokens) are'
                     ' two different models; set one.')
  if image_dim < 0 or not config.get('image_encoder') or not config.autoencoder:
    raise ValueError(f'config.model.wan.image_dim={image_dim} (Wan 2.1 image-to-video) needs'
                     ' config.image_encoder (the CLIP image encoder folder) and config.autoencoder'
                     ' (the Wan VAE): e.g. configs/wan2_1_i2v_14b.py with a Wan I2V pipeline folder.')
  if {str(n) for n, _ in config.condition.mix} - {'none'}:
    raise ValueError('Wan 2.1 image-to-video conditions every clip on its first frame through its'
                     ' input channels; config.condition.mix (the DiT\'s given frames) must be'
                     ' "none".')


WAN_EXPERTS = ('high_noise', 'low_noise')


def model_index(path: str) -> dict:
  """A diffusers pipeline folder's model_index.json ({} when there is none)."""
  index_file = os.path.join(path, 'model_index.json') if path else ''
  if not index_file or not os.path.isfile(index_file):
    return {}
  with open(index_file) as f:
    return json.load(f)


def _check_wan_experts(config, weights: bool):
  """Wan 2.2 A14B: one named expert per run, a boundary in (0, 1), and (with weights) an
  init_from folder that is that A14B pipeline, so both the expert and its partner load."""
  if not float(config.sample.get('guidance_scale_2', 0.0)) >= 0:
    raise ValueError(f'config.sample.guidance_scale_2={config.sample.guidance_scale_2} must be >= 0'
                     ' (0: config.sample.guidance_scale).')
  w = config.model.get('wan', {})
  expert, ratio = str(w.get('expert', '') or ''), float(w.get('boundary_ratio', 0.0) or 0.0)
  if expert and expert not in WAN_EXPERTS:
    raise ValueError(f'config.model.wan.expert={expert!r}: expected one of {WAN_EXPERTS} (or "" for'
                     ' a single-transformer Wan run).')
  if (expert or ratio) and config.model.family != 'wan':
    raise ValueError('config.model.wan.expert / boundary_ratio describe a Wan 2.2 A14B run:'
                     ' config.model.family must be "wan".')
  if not expert and not ratio:
    if config.model.family == 'wan' and model_index(config.init_from).get('boundary_ratio'):
      raise ValueError(f'config.init_from={config.init_from!r} is a Wan 2.2 A14B pipeline (two'
                       ' experts): set config.model.wan.boundary_ratio to its'
                       f' {model_index(config.init_from)["boundary_ratio"]} and'
                       ' config.model.wan.expert to high_noise or low_noise (configs/wan2_2_a14b.py).')
    return
  if not expert:
    raise ValueError(f'config.model.wan.boundary_ratio={ratio} (Wan 2.2 A14B) trains one expert per'
                     ' run: set config.model.wan.expert to high_noise (t >= boundary) or low_noise.')
  if not 0.0 < ratio < 1.0:
    raise ValueError(f'config.model.wan.expert={expert!r} needs config.model.wan.boundary_ratio in'
                     f' (0, 1) (the A14B pipeline\'s: T2V 0.875, I2V 0.9), got {ratio}.')
  if not weights:
    return
  path = config.init_from
  if not path:
    raise ValueError(f'config.model.wan.expert={expert!r}: set config.init_from to the Wan 2.2 A14B'
                     ' pipeline folder (the expert starts from it, and sampling runs its partner).')
  source = path
  if os.path.isfile(os.path.join(path, 'config.json')) and not model_index(path):
    try:  # a sora_jax workdir: its run's folder
      source = schema.load_config(path).init_from
    except Exception:  # pylint: disable=broad-except
      source = path
  index = model_index(source)
  if index.get('boundary_ratio') is None:
    raise ValueError(f'config.model.wan.expert={expert!r} but config.init_from={path!r} is not a'
                     ' Wan 2.2 A14B pipeline folder (model_index.json with transformer_2 and'
                     ' boundary_ratio); a single-transformer folder takes expert="".')
  if abs(float(index['boundary_ratio']) - ratio) > 1e-9:
    raise ValueError(f'config.model.wan.boundary_ratio={ratio} but {source!r} was released with'
                     f' boundary_ratio={index["boundary_ratio"]}: use the pipeline\'s.')


def _check_lora(config, weights: bool):
  lo = config.lora
  if not isinstance(lo.rank, int) or lo.rank < 0:
    raise ValueError(f'config.lora.rank={lo.rank!r} must be an int >= 0 (0: full fine-tuning).')
  if lo.rank == 0:
    if lo.init_from:
      raise ValueError(f'config.lora.init_from={lo.init_from!r} needs config.lora.rank > 0.')
    return
  if config.model.family == 'vae':
    raise ValueError('config.lora.rank > 0: LoRA applies to the transformer families, not the VAE.')
  if weights and not config.init_from:
    raise ValueError('config.lora.rank > 0 trains adapters on a frozen base: set config.init_from'
                     ' to a Wan diffusers folder or a sora_jax workdir.')
  if lo.alpha < 0:
    raise ValueError(f'config.lora.alpha={lo.alpha} must be >= 0 (0: alpha = rank).')
  if lo.dropout:
    raise ValueError(f'config.lora.dropout={lo.dropout}: LoRA dropout is not implemented; use 0.')
  if lo.base_dtype not in ('', 'float32', 'bfloat16'):
    raise ValueError(f"config.lora.base_dtype={lo.base_dtype!r}: expected '', 'float32' or"
                     " 'bfloat16'.")
  try:
    re.compile(lo.targets)
  except re.error as e:
    raise ValueError(f'config.lora.targets={lo.targets!r} is not a regular expression: {e}') from None
  if lo.init_from and not os.path.isfile(lo.init_from):
    raise ValueError(f'config.lora.init_from={lo.init_from!r} is not a file (a LoRA .safetensors).')


def validate(config, num_devices: int, *, weights: bool = True) -> dict[str, int]:
  """Rejects bad configs before compilation; returns the resolved mesh shape. `weights=False`
  (compiling ahead of time from abstract shapes) does not ask for a LoRA run's base weights."""
  unknown = list(_unknown_keys(config, schema.base_config()))
  if unknown:
    raise ValueError(f'Unknown config key(s): {", ".join("config." + k for k in unknown)}.')
  mesh = geometry.resolve_mesh_shape(config, num_devices)
  for key in ('batch_size', 'total_steps', 'log_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints', 'max_failed_saves'):
    if int(config[key]) <= 0:
      raise ValueError(f'config.{key}={config[key]} must be positive.')
  if not float(config.sample.max_seconds) >= 0:  # NaN too
    raise ValueError(f'config.sample.max_seconds={config.sample.max_seconds} must be >= 0 (0: no'
                     ' limit on the time training previews take).')
  if int(config.optim.max_nonfinite_steps) < 1:
    raise ValueError(f'config.optim.max_nonfinite_steps={config.optim.max_nonfinite_steps} must be'
                     ' >= 1.')
  batch_shards = mesh['data'] * mesh['fsdp']
  if config.batch_size % batch_shards:
    raise ValueError(
        f'config.batch_size={config.batch_size} is not divisible by the data-parallel size'
        f' mesh.data*mesh.fsdp={batch_shards}.')
  _check_data(config)
  m = config.model
  if m.family not in schema.FAMILIES:
    raise ValueError(f'config.model.family={m.family!r}: expected one of {", ".join(schema.FAMILIES)}.')
  if m.family == 'vae':
    _check_vae(config)
  else:
    _check_transformer(config, mesh)
  if m.attention not in schema.ATTENTION_IMPLS:
    raise ValueError(f'config.model.attention={m.attention!r}: expected one of'
                     f' {", ".join(schema.ATTENTION_IMPLS)}.')
  if m.context_parallel not in ('', 'ring', 'all_to_all'):
    raise ValueError(f'config.model.context_parallel={m.context_parallel!r}: expected ring,'
                     ' all_to_all or "".')
  if m.remat not in ('none', 'full', 'dots'):
    raise ValueError(f'config.model.remat={m.remat!r}: expected none, full or dots.')
  if m.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected float32 or bfloat16.')
  if config.diffusion.prediction not in ('velocity', 'x0'):
    raise ValueError(f'config.diffusion.prediction={config.diffusion.prediction!r}: expected'
                     ' velocity or x0.')
  if not 0.0 <= config.diffusion.loss_t_floor < 1.0:
    raise ValueError(f'config.diffusion.loss_t_floor={config.diffusion.loss_t_floor} not in [0, 1).')
  if not 0.0 <= config.diffusion.frame_noise_prob <= 1.0:
    raise ValueError(f'config.diffusion.frame_noise_prob={config.diffusion.frame_noise_prob} not in'
                     ' [0, 1].')
  check_upscale(config)
  _check_lora(config, weights)
  _check_wan_experts(config, weights)
  if m.family == 'wan':
    _check_wan_pipeline(config, weights)
  if m.family != 'vae':
    ae_geometry = geometry.autoencoder_geometry(config.autoencoder) if config.autoencoder else None
    check_condition(config, [geometry.latent_shape(s, ae_geometry)[0] if ae_geometry else s[0]
                                for s in buckets_lib.shapes(config)])
  if config.text.encoder not in ('bytes', 'umt5'):
    raise ValueError(f'config.text.encoder={config.text.encoder!r}: expected bytes or umt5.')
  if config.text.encoder == 'umt5' and not os.path.isdir(config.text.path):
    raise ValueError(f'config.text.path={config.text.path!r} is not a folder: text.encoder=umt5 needs'
                     ' a Hugging Face UMT5EncoderModel folder.')
  if config.init_from and not os.path.isdir(config.init_from):
    raise ValueError(f'config.init_from={config.init_from!r} is not a folder.')
  if config.text.width % config.text.num_heads:
    raise ValueError('config.text.width must be divisible by config.text.num_heads.')
  if config.text.word_buckets < 0:
    raise ValueError(f'config.text.word_buckets={config.text.word_buckets} must be >= 0.')
  if not 0.0 <= config.text.dropout_prob < 1.0:
    raise ValueError(f'config.text.dropout_prob={config.text.dropout_prob} not in [0, 1).')
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f'config.optim.ema_decay={config.optim.ema_decay} not in [0, 1).')
  if config.optim.mu_dtype not in ('', 'float32', 'bfloat16'):
    raise ValueError(f"config.optim.mu_dtype={config.optim.mu_dtype!r}: expected '', 'float32' or"
                     " 'bfloat16'.")
  warmup = config.optim.warmup_steps
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f'config.optim.warmup_steps={warmup!r} must be an int >= 0.')
  if warmup_steps(config) != warmup:
    _warn_short_run(warmup, config.total_steps, warmup_steps(config))
  return mesh


@functools.cache  # once per process: sora_jax.train validates the same config twice
def _warn_short_run(warmup: int, total: int, used: int):
  logging.warning('config.optim.warmup_steps=%d does not end before config.total_steps=%d:'
                  ' warming up for %d steps (a tenth of the run) instead.', warmup, total, used)


def warmup_steps(config) -> int:
  """The warm-up the learning-rate schedule uses (training/state.py make_optimizer).

  config.optim.warmup_steps, unless the run ends before it does: then a tenth of the run. A config
  tuned for a long run (the demo: 100 of 3000 steps) then still starts a short smoke run
  (--config.total_steps=20) that reaches its peak learning rate, instead of being refused; validate()
  logs the change.
  """
  warmup, total = config.optim.warmup_steps, config.total_steps
  return warmup if warmup < total else total // 10


def check_upscale(config) -> None:
  """Validates config.upscale (before anything compiles)."""
  u = config.upscale
  if not isinstance(u.factor, int) or u.factor < 1:
    raise ValueError(f'config.upscale.factor={u.factor!r} must be an int >= 1 (1: no upscaling).')
  for key in ('noise_aug', 'sample_noise'):
    if not 0.0 <= u[key] < 1.0:
      raise ValueError(f'config.upscale.{key}={u[key]} not in [0, 1).')
  if u.factor == 1:
    return
  d = config.data
  if d.height % u.factor or d.width % u.factor:
    raise ValueError(f'config.data.height x width = {d.height} x {d.width} must be divisible by'
                     f' config.upscale.factor={u.factor}.')
  if config.autoencoder or config.model.family != 'dit' or d.packing:
    raise ValueError('config.upscale.factor > 1 upscales pixels with model.family="dit": it needs an'
                     ' empty config.autoencoder and data.packing=False.')
  if u.residual and config.diffusion.prediction != 'x0':
    raise ValueError('config.upscale.residual predicts the clip as the upsampled input plus a'
                     ' residual: it needs config.diffusion.prediction="x0".')
  if any(p != 'none' and q > 0 for p, q in config.condition.mix):
    raise ValueError('config.upscale.factor > 1 with config.condition.mix: an upscaler is conditioned'
                     ' on the whole low-resolution video; train it without given frames.')


def check_condition(config, model_frames: list[int]) -> None:
  """Validates config.condition for clips of `model_frames` frames (as the model sees them)."""
  pairs = config.condition.mix
  try:
    pairs = geometry.condition_mix(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.condition.mix={pairs!r} must be a tuple of (pattern, probability)'
                     f' pairs: {e}.') from None
  if not pairs:
    raise ValueError('config.condition.mix is empty; use (("none", 1.0),) for no conditioning.')
  for p, q in pairs:
    if p not in schema.CONDITION_PATTERNS:
      raise ValueError(f'config.condition.mix: unknown pattern {p!r}; expected one of'
                       f' {", ".join(schema.CONDITION_PATTERNS)}.')
    if q < 0:
      raise ValueError(f'config.condition.mix: probability {q} of {p!r} is negative.')
  if abs(sum(q for _, q in pairs) - 1.0) > 1e-6:
    raise ValueError(f'config.condition.mix: probabilities sum to {sum(q for _, q in pairs):g},'
                     ' not 1.')
  k = config.condition.max_frames
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'config.condition.max_frames={k!r} must be an int >= 1.')
  for key in ('context_noise', 'sample_context_noise'):
    if not 0.0 <= config.condition[key] < 1.0:
      raise ValueError(f'config.condition.{key}={config.condition[key]} not in [0, 1).')
  if not geometry.conditioning_enabled(config):
    return
  wan_ti2v = config.model.family == 'wan' and config.model.wan.get('expand_timesteps', False)
  if (config.model.family != 'dit' and not wan_ti2v) or config.data.packing:
    raise ValueError('config.condition.mix conditions on given frames with model.family="dit" (or'
                     ' "wan" with model.wan.expand_timesteps: Wan 2.2 TI2V, configs/'
                     'wan2_2_ti2v_5b.py) and data.packing=False only.')
  if wan_ti2v and (config.condition.context_noise or config.condition.sample_context_noise):
    raise ValueError('Wan 2.2 TI2V tells given frames apart by their timestep of 0 alone (no mask'
                     ' channel): config.condition.context_noise and sample_context_noise must be 0.')
  pt = config.model.patch_size[0]
  used = {p for p, q in pairs if q > 0}
  for frames in model_frames:
    patches = frames // pt
    if frames == 1:
      continue  # image clips: nothing given (sample_given clamps k)
    need = {'first': 1, 'first_k': k, 'last_k': k, 'first_last': 2 * k}
    for p in used - {'none'}:
      if need[p] >= patches:
        raise ValueError(
            f'config.condition.max_frames={k} with pattern {p!r} gives {need[p]} temporal patch(es),'
            f' but a clip of {frames} model frames has only {patches} temporal patches'
            f' (model.patch_size[0]={pt}): at least one must stay to generate. max_frames counts'
            f' temporal patches.')

"""What follows from a config without building anything: mesh axis sizes, the clip / latent /
token shapes the model sees, the timestep shift, and which features (given-frame conditioning,
cascaded upscaling) a run has switched on. Pure Python: no JAX.
"""

import json
import math
import os


def upscale_enabled(config) -> bool:
  u = config.get('upscale')
  return u is not None and u.factor > 1


def lowres_shape(config) -> tuple[int, int]:
  """(height, width) of the videos this upscaler takes."""
  f = config.upscale.factor
  return config.data.height // f, config.data.width // f


def condition_mix(config) -> tuple[tuple[str, float], ...]:
  """config.condition.mix as ((pattern, probability), ...); workdirs saved before conditioning existed
  (or a JSON round trip: lists) read as today's default."""
  cond = config.get('condition')
  if cond is None:
    return (('none', 1.0),)
  return tuple((str(p), float(q)) for p, q in cond.mix)


def conditioning_enabled(config) -> bool:
  """Whether the model conditions on given frames (and so has the extra mask input channel)."""
  return any(p != 'none' and q > 0 for p, q in condition_mix(config))


def pixel_frames(model_frames: int, temporal: int, *, at_start: bool) -> int:
  """Pixel frames that make `model_frames` latent frames of a causal autoencoder (temporal = its
  compression; 1 without one): the first latent frame encodes one pixel frame alone."""
  if temporal == 1 or model_frames == 0:
    return model_frames
  return 1 + (model_frames - 1) * temporal if at_start else model_frames * temporal


def model_frames(config) -> int:
  return model_clip_shape(config)[0]


def resolve_overlap(config, overlap=None) -> int:
  """Model frames shared by consecutive windows / taken from an extended video: `overlap`, else
  patch_size[0] * config.condition.max_frames (the most training gave). Must be whole temporal
  patches, fewer than the clip's frames."""
  pt = config.model.patch_size[0]
  k = overlap or pt * config.condition.max_frames
  t_model = model_frames(config)
  if k % pt or not 0 < k < t_model:
    raise ValueError(f'--overlap={k} must be a multiple of model.patch_size[0]={pt} below the'
                     f' clip length {t_model} (model frames).')
  return k


def temporal_factor(config) -> int:
  """Pixel frames per latent frame of the run's causal autoencoder (1 in pixel space)."""
  if not config.autoencoder:
    return 1
  return autoencoder_geometry(config.autoencoder)['temporal']


def resolve_mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the (at most one) -1 filled in."""
  axes = {a: int(config.mesh[a]) for a in ('data', 'fsdp', 'tensor', 'context')}
  for a, n in axes.items():
    if n == 0 or n < -1:
      raise ValueError(f'config.mesh.{a}={n}: axis sizes are positive or -1.')
  for a in ('data', 'fsdp'):
    dcn = int(config.mesh.get(f'dcn_{a}', 1))
    if dcn < 1:
      raise ValueError(f'config.mesh.dcn_{a}={dcn} must be >= 1.')
  free = [a for a, n in axes.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}.')
  fixed = math.prod(n for n in axes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh: {num_devices} devices are not divisible by the fixed axes'
          f' {dict((a, n) for a, n in axes.items() if n != -1)} (product {fixed}).')
    axes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh: data*fsdp*tensor*context = {fixed} but there are {num_devices} devices.')
  for a in ('data', 'fsdp'):
    dcn = int(config.mesh.get(f'dcn_{a}', 1))
    if axes[a] % dcn:
      raise ValueError(f'config.mesh.dcn_{a}={dcn} does not divide mesh.{a}={axes[a]}.')
  return axes


def dcn_shape(config) -> dict[str, int]:
  return {a: int(config.mesh.get(f'dcn_{a}', 1)) for a in ('data', 'fsdp')}


def autoencoder_geometry(path: str) -> dict:
  """{'temporal', 'spatial', 'z_dim'} of the autoencoder at `path` (a sora_jax 'vae' workdir or a
  diffusers AutoencoderKLWan folder), read from its config.json; both use the diffusers field names."""
  for sub in ('', 'vae'):
    cfg_path = os.path.join(path, sub, 'config.json')
    if os.path.isfile(cfg_path):
      break
  else:
    raise ValueError(f'config.autoencoder={path!r}: no config.json there (nor in vae/).')
  with open(cfg_path) as f:
    cfg = json.load(f)
  if 'model' in cfg:  # a sora_jax workdir: its config.json is the training config
    if cfg['model'].get('family') != 'vae':
      raise ValueError(f'config.autoencoder={path!r} is a sora_jax workdir of model.family='
                       f'{cfg["model"].get("family")!r}, not a "vae" run.')
    cfg = cfg['vae']
  try:
    return dict(temporal=2 ** sum(bool(x) for x in cfg['temperal_downsample']),
                # Wan 2.2's patch_size folds p x p pixels into channels first (x16 at p = 2).
                spatial=2 ** (len(cfg['dim_mult']) - 1) * int(cfg.get('patch_size') or 1),
                z_dim=int(cfg['z_dim']))
  except KeyError as e:
    raise ValueError(f'config.autoencoder={path!r}: {cfg_path} lacks {e}; is it a video VAE?')


def latent_shape(clip, ae_geometry) -> tuple[int, int, int]:
  t, h, w = clip
  return (1 + (t - 1) // ae_geometry['temporal'], h // ae_geometry['spatial'], w // ae_geometry['spatial'])


def model_shape(config, clip) -> tuple[int, int, int]:
  """(frames, height, width) the diffusion model sees for a pixel clip: itself, or (with
  config.autoencoder) its latents."""
  if not config.autoencoder:
    return tuple(int(n) for n in clip)
  return latent_shape(clip, autoencoder_geometry(config.autoencoder))


def model_clip_shape(config) -> tuple[int, int, int]:
  """(frames, height, width) the diffusion model sees for the default clip: pixels, or latents."""
  return model_shape(config, (config.data.num_frames, config.data.height, config.data.width))


def patch_tokens(shape, patch_size) -> int:
  """Transformer tokens of one clip of model-space `shape` (frames, height, width)."""
  return math.prod(int(n) // int(p) for n, p in zip(shape, patch_size))


def shift_for_tokens(num_tokens, base_shift: float, base_tokens: int):
  """Resolution-dependent shift: more tokens carry more redundant signal, so spend more time at high
  noise. Grows as sqrt(tokens / base) (SD3's sqrt(m/n) rule), equal to `base_shift` at `base_tokens`.
  `num_tokens` may be an array (packed sequences: one count per segment, on device)."""
  return float(base_shift) * (num_tokens / base_tokens) ** 0.5


def timestep_shift(config, shape=None) -> float:
  """The flow-time shift of a clip of model-space `shape` (frames, height, width: latents with an
  autoencoder; default: the default clip). The one formula for training (each batch's static shape,
  at trace time: every bucket gets its own) and sampling (the shape it generates)."""
  shape = model_clip_shape(config) if shape is None else shape
  return shift_for_tokens(patch_tokens(shape, config.model.patch_size), config.diffusion.shift,
                          config.diffusion.shift_base_tokens)

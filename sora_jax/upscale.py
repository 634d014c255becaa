"""Cascaded spatial super-resolution: a VideoDiT that also sees the low-resolution video.

An upscaler run (`config.upscale.factor` = f > 1, e.g. configs/demo_upscale.py) trains on the same
clips as the base model, at f x its frame size: the clip's box-downsampled (1/f) and bilinearly
re-upsampled copy joins the noisy clip as extra input channels (channel concat, so the conditioning is
aligned with the output pixel for pixel), and the flow objective is unchanged. With
config.upscale.residual (x0 prediction) the model predicts the clean clip as the clean upsampled input
plus its output, so an untrained upscaler (zero-initialised head) starts as bilinear upsampling and
learns only the missing detail. Cascaded-diffusion noise augmentation: the low-resolution input is
noised to a flow time drawn uniformly from [0, config.upscale.noise_aug] per training clip, so the
upscaler does not copy the base model's artifacts; sampling uses the fixed level
config.upscale.sample_noise.

`python -m sora_jax.sample --workdir=BASE --upscale_workdir=UP ...` chains it after the base model:
`Upscaler` takes the base model's uint8 videos and returns f x larger ones, clip by clip (the
upscaler's clip length; a long video is upscaled in consecutive clips).
"""

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import flow


def enabled(config) -> bool:
  u = config.get('upscale')
  return u is not None and u.factor > 1


def check(config) -> None:
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


def downsample(video, factor: int):
  """[..., H, W, C] -> [..., H / f, W / f, C] by box averaging (what a lower-resolution render of the
  same scene looks like, up to aliasing)."""
  *lead, h, w, c = video.shape
  v = video.reshape(*lead, h // factor, factor, w // factor, factor, c)
  return v.mean(axis=(-4, -2))


def upsample(video, factor: int):
  """[..., h, w, C] -> [..., h f, w f, C], bilinear (half-pixel centres)."""
  *lead, h, w, c = video.shape
  return jax.image.resize(video, (*lead, h * factor, w * factor, c), method='linear')


def condition(lowres, config, noise_level, noise):
  """Low-resolution clips [B, T, h, w, C] in [-1, 1] -> the upscaler's model inputs (lowres=, base=):
  the clips upsampled and moved to flow time `noise_level` ([B] or a scalar) towards `noise` (standard
  normal, [B, T, h f, w f, C]) as extra input channels, and, with config.upscale.residual, the clean
  upsampled clips the model's x0 estimate is a residual over (else None)."""
  up = upsample(lowres, config.upscale.factor)
  level = jnp.broadcast_to(jnp.asarray(noise_level, up.dtype), up.shape[:1])
  return flow.interpolate(up, noise, level), (up if config.upscale.residual else None)


def training_condition(x0, config, key):
  """Training: the clip's own degraded copy, noise level ~ U(0, config.upscale.noise_aug) per clip."""
  level_key, noise_key = jax.random.split(key)
  u = config.upscale
  level = jax.random.uniform(level_key, x0.shape[:1], maxval=u.noise_aug)
  return condition(downsample(x0, u.factor), config, level,
                   jax.random.normal(noise_key, x0.shape, x0.dtype))


def eval_clips(config, split: str, num: int, seed_offset: int = 1000):
  """Fixed clips of the (shapes) eval split at the upscaler's resolution: (float32 [N, T, H, W, 3] in
  [-1, 1], captions), from a seed disjoint from training's (as pipeline.eval_batches)."""
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  src = pipeline.source(config, split, config.seed + seed_offset)
  records = [src[i] for i in range(num)]
  video = np.stack([r['video'] for r in records]).astype(np.float32) / 127.5 - 1.0
  return video, [r['caption'] for r in records]


def psnr(a, b) -> np.ndarray:
  """Per-video PSNR (dB) of uint8 videos [N, ...]."""
  mse = np.square(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).mean(-1)
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def define_noise_flag():
  """`--upscale_noise`, shared by sample and evaluate."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_float('upscale_noise', None, 'Flow time in [0, 1) the upscaler noises its'
                     ' low-resolution input to (default: its config.upscale.sample_noise); higher'
                     ' trusts the base video less. Keep it within the noise_aug it was trained with.')


def check_noise(noise):
  if noise is not None and not 0.0 <= noise < 1.0:
    raise ValueError(f'--upscale_noise={noise} not in [0, 1).')


def lowres_shape(config) -> tuple[int, int]:
  """(height, width) of the videos this upscaler takes."""
  f = config.upscale.factor
  return config.data.height // f, config.data.width // f


class Upscaler:
  """A trained upscaler run, loaded once: `__call__(videos uint8 [N, T, h, w, 3], prompts)` ->
  uint8 [N, T, h f, w f, 3]."""

  def __init__(self, workdir: str, *, use_ema: bool = True, step=None, noise=None,
               **sample_options):
    """noise: the input's flow time, overriding the run's config.upscale.sample_noise."""
    from sora_jax import restore, sampling  # pylint: disable=g-import-not-at-top  (they import models)
    config = restore.load_config(workdir)
    if not enabled(config):
      raise ValueError(f'{workdir} is not an upscaler run (config.upscale.factor > 1, e.g.'
                       ' configs/demo_upscale.py).')
    check_noise(noise)
    self.config, self.noise = config, noise
    self.options = sampling.settings(config, **sample_options)
    self.workdir, self.use_ema, self.step = workdir, use_ema, step
    self._loaded = None

  def check_input(self, num_frames: int, height: int, width: int):
    """Raises ValueError unless base videos of this size can be upscaled (before any compilation)."""
    h, w = lowres_shape(self.config)
    if (height, width) != (h, w):
      raise ValueError(f'--upscale_workdir={self.workdir!r} upscales {h}x{w} videos (its'
                       f' data.height x width / upscale.factor); the base model makes'
                       f' {height}x{width}.')
    del num_frames  # any length: upscaled in clips of the upscaler's length

  def load(self):
    if self._loaded is None:
      from sora_jax import frozen as frozen_lib, restore, sampling  # pylint: disable=g-import-not-at-top
      config, mesh, graphdef, params, _ = restore.load(self.workdir, step=self.step,
                                                       use_ema=self.use_ema)
      if self.noise is not None:
        config.upscale.sample_noise = self.noise
      frozen = frozen_lib.Frozen(config)
      generate = sampling.make_generate(graphdef, config, frozen=frozen, **self.options)
      self._loaded = (config, mesh, params, frozen, generate)
    return self._loaded

  def __call__(self, videos, prompts, *, seed: int = 0, batch_size: int = 16) -> np.ndarray:
    from sora_jax import sampling  # pylint: disable=g-import-not-at-top
    config, mesh, params, frozen, generate = self.load()
    n, t = videos.shape[:2]
    self.check_input(t, *videos.shape[2:4])
    clip = config.data.num_frames
    pixels = np.asarray(videos, np.float32) / 127.5 - 1.0
    out = []
    for start in range(0, t, clip):  # consecutive clips; the last is padded with its last frame
      part = pixels[:, start:start + clip]
      pad = clip - part.shape[1]
      part = np.concatenate([part, np.repeat(part[:, -1:], pad, axis=1)], axis=1)
      with jax.set_mesh(mesh):
        up = sampling.generate_videos(generate, params, list(prompts), config=config, mesh=mesh,
                                      seed=seed + start, batch_size=batch_size, frozen=frozen,
                                      lowres=part)
      out.append(up[:, :clip - pad])
    return np.concatenate(out, axis=1)

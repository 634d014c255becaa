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
upscaler's clip length; a long video is upscaled in consecutive clips)."""

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow


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

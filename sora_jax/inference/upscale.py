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
import numpy as np

from sora_jax.config import geometry, schema
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import restore, sampling


def check_noise(noise):
  if noise is not None and not 0.0 <= noise < 1.0:
    raise ValueError(f'--upscale_noise={noise} not in [0, 1).')


class Upscaler:
  """A trained upscaler run, loaded once: `__call__(videos uint8 [N, T, h, w, 3], prompts)` ->
  uint8 [N, T, h f, w f, 3]."""

  def __init__(self, workdir: str, *, use_ema: bool = True, step=None, noise=None,
               **sample_options):
    """noise: the input's flow time, overriding the run's config.upscale.sample_noise."""
    config = schema.load_config(workdir)
    if not geometry.upscale_enabled(config):
      raise ValueError(f'{workdir} is not an upscaler run (config.upscale.factor > 1, e.g.'
                       ' configs/demo_upscale.py).')
    check_noise(noise)
    self.config, self.noise = config, noise
    self.options = sampling.settings(config, **sample_options)
    self.workdir, self.use_ema, self.step = workdir, use_ema, step
    self._loaded = None

  def check_input(self, num_frames: int, height: int, width: int):
    """Raises ValueError unless base videos of this size can be upscaled (before any compilation)."""
    h, w = geometry.lowres_shape(self.config)
    if (height, width) != (h, w):
      raise ValueError(f'--upscale_workdir={self.workdir!r} upscales {h}x{w} videos (its'
                       f' data.height x width / upscale.factor); the base model makes'
                       f' {height}x{width}.')
    del num_frames  # any length: upscaled in clips of the upscaler's length

  def load(self):
    if self._loaded is None:
      config, mesh, graphdef, params, _ = restore.load(self.workdir, step=self.step,
                                                       use_ema=self.use_ema)
      if self.noise is not None:
        config.upscale.sample_noise = self.noise
      frozen = frozen_lib.Frozen(config, mesh)
      generate = sampling.make_generate(graphdef, config, frozen=frozen, **self.options)
      self._loaded = (config, mesh, params, frozen, generate)
    return self._loaded

  def __call__(self, videos, prompts, *, seed: int = 0, batch_size: int = 16) -> np.ndarray:
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

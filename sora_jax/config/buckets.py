"""Resolution/duration buckets: every batch has one static shape, one compilation per bucket.

A bucket is (frames, height, width) from `config.data.buckets` (empty: the single bucket
(data.num_frames, data.height, data.width)). Its global batch size comes from a token budget,
`config.data.tokens_per_batch` (0: every bucket uses `config.batch_size`) of the tokens the DiT sees
(`model_tokens`: latent patches with config.autoencoder), rounded down to a multiple of the
data-parallel size so each batch splits evenly over the mesh and the processes. Images go to
1-frame buckets, videos to the others: nearest aspect ratio first, then the longest clip that fits.

Batch sizes depend on the config alone, never on how many examples a bucket holds: every bucket's
step is compiled before the data is read (training/steps.py BucketSteps). A bucket with fewer
examples than its batch still trains: data_pipelines/bucketed.py BatchPlan repeats its rows.
"""

from __future__ import annotations

import dataclasses
import math

from sora_jax.config import geometry


@dataclasses.dataclass(frozen=True)
class Bucket:
  frames: int
  height: int
  width: int
  batch_size: int  # global

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.frames, self.height, self.width)

  @property
  def is_image(self) -> bool:
    return self.frames == 1


def shapes(config) -> list[tuple[int, int, int]]:
  d = config.data
  table = [tuple(int(v) for v in b) for b in d.buckets] if d.buckets else []
  return table or [(d.num_frames, d.height, d.width)]


def tokens(shape, patch_size) -> int:
  """Transformer tokens of one clip of `shape` (frames, height, width) as the model sees it."""
  return geometry.patch_tokens(shape, patch_size)


def model_tokens(config, shape) -> int:
  """Tokens the DiT sees for one clip of pixel `shape`: its latents' patches with config.autoencoder
  (Wan's VAE: 1 + (F - 1) // 4 frames, 8x smaller frames), its own patches without."""
  return tokens(geometry.model_shape(config, shape), config.model.patch_size)


def make(config, batch_multiple: int = 1) -> list[Bucket]:
  """The bucket table with per-bucket global batch sizes; assumes `config.validation.validate` passed."""
  budget = config.data.tokens_per_batch
  out = []
  for shape in shapes(config):
    if budget:
      per_clip = model_tokens(config, shape)  # what a step costs, not the pixels decoded
      batch = max(batch_multiple, budget // per_clip // batch_multiple * batch_multiple)
    else:
      batch = config.batch_size
    out.append(Bucket(*shape, batch_size=batch))
  return out


def check(config) -> list[str]:
  """Problems with the bucket table, each naming its key (used by config.validation.validate)."""
  errors = []
  patch = tuple(config.model.patch_size)
  key = 'config.data.buckets'
  for shape in config.data.buckets:  # the default bucket is the clip, which validate() checks
    shape = tuple(shape)
    if len(shape) != 3 or min(shape) < 1:
      errors.append(f'{key}: bucket {shape} must be three positive ints (frames, height, width).')
      continue
    for size, p, name in zip(shape, patch, ('frames', 'height', 'width')):
      if size % p and not config.get('autoencoder'):  # latent buckets: config/validation.py checks them
        errors.append(f'{key}: bucket {shape} {name}={size} is not divisible by'
                      f' config.model.patch_size={patch}.')
  if config.data.tokens_per_batch < 0:
    errors.append(f'config.data.tokens_per_batch={config.data.tokens_per_batch} must be >= 0.')
  return errors


def choose(table: list[Bucket], *, is_image: bool, width: int, height: int,
           seconds: float | None, fps: float) -> int | None:
  """Index of the bucket for a sample, or None when none fits (a video shorter than every bucket).

  `seconds` is the usable duration of a video (its [start, end] window); a bucket of F frames needs
  F / fps seconds. Ties in aspect ratio go to the longest clip, then to the larger frame.
  """
  aspect = math.log(width / height)
  best, best_key = None, None
  for i, b in enumerate(table):
    if b.is_image != is_image:
      continue
    if not is_image and b.frames / fps > seconds + 1e-6:
      continue
    key = (round(abs(math.log(b.width / b.height) - aspect), 6), -b.frames, -b.height * b.width)
    if best_key is None or key < best_key:
      best, best_key = i, key
  return best

"""Upscaler runs: PSNR of 2x upscaled eval clips against the real ones (and bilinear upsamplingu0027s),
and the judged adherence of the upscaled videos."""

import numpy as np

from data_pipelines import pipeline
from sora_jax.common import video_io
from sora_jax.diffusion import cascade
from sora_jax.evaluation import adherence
from sora_jax.inference import sampling


def eval_clips(config, split: str, num: int, seed_offset: int = 1000):
  """Fixed clips of the (shapes) eval split at the upscaler's resolution: (float32 [N, T, H, W, 3] in
  [-1, 1], captions), from a seed disjoint from training's (as pipeline.eval_batches)."""
  src = pipeline.source(config, split, config.seed + seed_offset)
  records = [src[i] for i in range(num)]
  video = np.stack([r['video'] for r in records]).astype(np.float32) / 127.5 - 1.0
  return video, [r['caption'] for r in records]


def psnr(a, b) -> np.ndarray:
  """Per-video PSNR (dB) of uint8 videos [N, ...]."""
  mse = np.square(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).mean(-1)
  return 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def upscaling(generate, params, config, mesh, split: str, videos_dir: str, *, seed: int,
              frozen) -> dict:
  """An upscaler run on `split`'s eval clips downsampled by its factor: PSNR of its output and of
  bilinear upsampling against the real clips, and the judged adherence of its output (mp4s)."""
  f = config.upscale.factor
  clips, prompts = eval_clips(config, split, config.eval.num_videos)
  low = np.asarray(cascade.downsample(clips, f))
  videos = sampling.generate_videos(generate, params, prompts, config=config, mesh=mesh, seed=seed,
                                    batch_size=config.eval.batch_size, frozen=frozen, lowres=low)
  real = video_io.to_uint8(clips)
  bilinear = video_io.to_uint8(np.asarray(cascade.upsample(low, f)))
  result = adherence.adherence(video_io.write_videos(videos, prompts, videos_dir, fps=config.data.fps))
  result['psnr_db'] = {'upscaled': float(psnr(videos, real).mean()),
                       'bilinear': float(psnr(bilinear, real).mean())}
  return result

"""Prompt adherence on the shapes data, judged from the written mp4 files (what a user sees): colour,
shape, direction, a stable object in every frame and of the data's size (`data_pipelines.shapes`),
for seen and held-out (colour, shape) pairs. `all` needs all five."""

import numpy as np

from data_pipelines import shapes
from sora_jax.common import video_io
from sora_jax.inference import sampling

SPLITS = {'seen': 'train', 'held_out': 'heldout'}


def adherence_prompts(split: str, samples_per_prompt: int) -> list[str]:
  """Every (colour, shape) pair of `split` x every direction, `samples_per_prompt` times."""
  return [shapes.caption(c, s, d) for c, s in shapes.pairs(split)
          for d in shapes.DIRECTIONS] * samples_per_prompt


def adherence(samples: list[dict]) -> dict:
  """Judges the written mp4 files (what a user sees), not the raw arrays."""
  keys = ('color', 'shape', 'direction', 'stable', 'size')
  results = []
  for s in samples:
    video = video_io.read_video(s['path'])
    tracked = shapes.track(video)  # once: judging and the speckle measure share it
    score = shapes.score(video, s['prompt'], tracked)
    results.append({'prompt': s['prompt'], 'path': s['path'], **{k: bool(score[k]) for k in keys},
                    'stray': float(tracked['stray'].mean())})
  rates = {k: float(np.mean([r[k] for r in results])) for k in keys}
  rates['all'] = float(np.mean([all(r[k] for k in keys) for r in results]))
  # Speckles: the mean fraction of a frame's pixels lit away from the object (shapes.track).
  return {'num_videos': len(results), 'rates': rates,
          'stray_fraction': float(np.mean([r['stray'] for r in results])), 'videos': results}


def split_adherence(generate, params, config, mesh, split: str, videos_dir: str, *, seed: int,
                    frozen, upscaler=None) -> dict:
  """Generates `split`'s adherence prompts with `generate` (sampling.make_generate), writes them to
  `videos_dir` and judges them. Run under `jax.set_mesh(mesh)`. upscaler: an `upscale.Upscaler`
  applied to the videos before they are written."""
  prompts = adherence_prompts(split, config.eval.samples_per_prompt)
  videos = sampling.generate_videos(generate, params, prompts, config=config, mesh=mesh, seed=seed,
                                    batch_size=config.eval.batch_size, frozen=frozen)
  if upscaler is not None:
    videos = upscaler(videos, prompts, seed=seed, batch_size=config.eval.batch_size)
  return adherence(video_io.write_videos(videos, prompts, videos_dir, fps=config.data.fps))

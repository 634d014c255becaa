"""Evaluates a trained run: held-out flow-matching loss and (shapes) prompt adherence from pixels.

  python -m sora_jax.evaluate --workdir=runs/demo --output=runs/demo/eval.json \
      [--sampler=dpm++2m --num_steps=16 --negative_prompt=... --guidance_schedule=linear]

Loss: mean velocity MSE on fresh clips (seed disjoint from training) at a fixed timestep grid with fixed
noise, for seen and held-out (colour, shape) pairs. Adherence: one video per prompt (every pair x every
direction x eval.samples_per_prompt), written as mp4, decoded again and judged by
`data_pipelines.shapes.judge_clip`: colour, shape, direction, and a stable object in every frame.
Runs trained with config.condition.mix also get image-to-video, forward extension and 4x-length
sliding-window videos judged, with temporal consistency at window boundaries
(evaluation/conditioned.py; --conditioned=image_to_video,extension,long_video,
long_video_from_image or none).
Upscaler runs (config.upscale.factor > 1): PSNR of the upscaled eval clips (and of bilinear
upsampling) against the real ones, plus the judged adherence of the upscaled mp4s;
--upscale_workdir=UP on a base run judges the base model's videos after that upscaler.
Runs trained on user data (a manifest, prepared shards, TFDS): no shapes judge; the flow loss by
flow time on held-out videos (`eval_data`) instead (evaluation/user_data.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data_pipelines import pipeline
from sora_jax.common import progress as progress_lib
from sora_jax.config import geometry
from sora_jax.diffusion import flow
from sora_jax.evaluation import adherence
from sora_jax.evaluation import conditioned as conditioned_eval
from sora_jax.evaluation import upscaling as upscale_eval
from sora_jax.evaluation import user_data
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import restore, sampling, upscale
from sora_jax.parallel import sharding

def flow_matching_loss(graphdef, params, config, mesh, split: str, frozen) -> dict:
  k = config.eval.num_timesteps
  grid = (np.arange(k) + 0.5) / k
  data_sharding = sharding.batch_sharding(mesh)

  @jax.jit
  def losses(params, batch, t, key):
    x0 = batch['video']
    noise = jax.random.normal(key, x0.shape)
    t = jnp.full((x0.shape[0],), t)
    v = nnx.merge(graphdef, params)(flow.interpolate(x0, noise, t), t, batch['tokens'],
                                    batch['mask'])
    return flow.loss(v, x0, noise).mean()

  batches = pipeline.eval_batches(config, split, config.eval.num_videos, config.eval.batch_size)
  if not batches:
    raise ValueError(f'config.eval.num_videos={config.eval.num_videos} is smaller than'
                     f' config.eval.batch_size={config.eval.batch_size}.')
  by_t = np.zeros(k)
  for i, batch in enumerate(batches):
    batch = frozen.encode_batch(jax.device_put(batch, data_sharding), data_sharding)
    for j, t in enumerate(grid):
      key = jax.random.fold_in(jax.random.PRNGKey(1234), i * k + j)
      by_t[j] += float(losses(params, batch, t, key)) / len(batches)
  return {'mean': float(by_t.mean()), 'by_t': {f'{t:.4f}': float(l) for t, l in zip(grid, by_t)},
          'num_examples': sum(len(b['video']) for b in batches)}


def reconstruction(graphdef, params, config, mesh, split: str) -> dict:
  """Autoencoder runs: PSNR (dB, on [0, 255] pixels) and L1 of reconstructions of `split`'s clips."""
  data_sharding = sharding.batch_sharding(mesh)

  @jax.jit
  def errors(params, video):
    model = nnx.merge(graphdef, params)
    recon = jnp.clip(model.decode(model.encode(video)[0]), -1.0, 1.0)
    mse = jnp.square((recon - video) * 127.5).reshape(video.shape[0], -1).mean(-1)
    return 10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10)), jnp.abs(recon - video).mean()

  batches = pipeline.eval_batches(config, split, config.eval.num_videos, config.eval.batch_size)
  psnr, l1 = [], []
  for batch in batches:
    p, e = errors(params, jax.device_put(batch['video'], data_sharding))
    psnr.extend(np.asarray(p).tolist())
    l1.append(float(e))
  return {'psnr_db': float(np.mean(psnr)), 'l1': float(np.mean(l1)), 'num_videos': len(psnr)}


def evaluate(workdir, output, *, step=None, seed=0, num_steps=None, guidance_scale=None,
             use_ema=True, videos_dir=None, sampler=None, negative_prompt=None,
             guidance_schedule=None, guidance_interval=None, flow_loss=True,
             conditioned=('image_to_video', 'extension', 'long_video', 'long_video_from_image'),
             upscale_workdir=None, upscale_noise=None, eval_data=None,
             guidance_scale_2=None) -> dict:
  """Sampling options left None come from config.sample (see `sampling.settings`). `conditioned`:
  the conditioned_eval protocols run when the run was trained with conditioning. upscale_workdir:
  judge the videos after that upscaler run (upscale.Upscaler). upscale_noise: the upscaler's input
  noise level (of `upscale_workdir`, or of `workdir` if it is an upscaler), else its config's.
  eval_data: a user-data run's held-out videos (user_data.py); their flow loss is its evaluation."""
  conditioned = check_options(conditioned, upscale_noise)
  config, mesh, graphdef, params, step = restore.load(workdir, step=step, use_ema=use_ema)
  user_data.check_options(config, eval_data, flow_loss=flow_loss, upscale_workdir=upscale_workdir)
  if user_data.applies(config):  # nothing is sampled: no shapes prompts to judge on real videos
    result = {'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema}
    frozen = frozen_lib.Frozen(config, mesh)
    with jax.set_mesh(mesh):
      result.update(user_data.flow_loss(graphdef, params, config, mesh, frozen, eval_data))
    _write(result, output)
    return result
  if upscale_noise is not None and geometry.upscale_enabled(config):
    config.upscale.sample_noise = upscale_noise
  if config.model.family == 'vae':
    result = {'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema}
    with jax.set_mesh(mesh):
      for name, split in adherence.SPLITS.items():
        result[name] = {'reconstruction': reconstruction(graphdef, params, config, mesh, split)}
        logging.info('%s: reconstruction %s', name, result[name]['reconstruction'])
    _write(result, output)
    return result
  upscaler = None
  if upscale_workdir:
    upscaler = upscale.Upscaler(upscale_workdir, noise=upscale_noise)
    upscaler.check_input(config.data.num_frames, config.data.height, config.data.width)
    upscaler.load()  # outside the base run's mesh context: restoring builds its own
  frozen = frozen_lib.Frozen(config, mesh)
  options = sampling.settings(config, num_steps=num_steps, guidance_scale=guidance_scale,
                              sampler=sampler, negative_prompt=negative_prompt,
                              guidance_schedule=guidance_schedule,
                              guidance_interval=guidance_interval,
                              guidance_scale_2=guidance_scale_2)
  videos_dir = videos_dir or os.path.splitext(output)[0] + '_videos'
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **options)
  result = {'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema, **options,
            'seed': seed}
  if upscaler is not None or geometry.upscale_enabled(config):
    result['upscale_noise'] = (upscaler.load()[0] if upscaler else config).upscale.sample_noise
  run_conditioned = bool(conditioned) and geometry.conditioning_enabled(config)
  stages = progress_lib.Progress(
      len(adherence.SPLITS) + (len(conditioned) if run_conditioned else 0), 'Evaluation stages')
  with jax.set_mesh(mesh):
    for i, (name, split) in enumerate(adherence.SPLITS.items()):
      stages.update(i, f'next: {name} pairs')
      result[name] = {}
      if geometry.upscale_enabled(config):
        result[name]['upscaling'] = upscale_eval.upscaling(generate, params, config, mesh, split,
                                              os.path.join(videos_dir, name), seed=seed,
                                              frozen=frozen)
        logging.info('%s: upscaling %s psnr %s', name, result[name]['upscaling']['rates'],
                     result[name]['upscaling']['psnr_db'])
        continue
      if flow_loss:
        result[name]['flow_matching_loss'] = flow_matching_loss(graphdef, params, config, mesh,
                                                                split, frozen)
      result[name]['adherence'] = adherence.split_adherence(generate, params, config, mesh, split,
                                                  os.path.join(videos_dir, name), seed=seed,
                                                  frozen=frozen, upscaler=upscaler)
      logging.info('%s: loss %s, adherence %s', name,
                   result[name].get('flow_matching_loss', {}).get('mean'),
                   result[name]['adherence']['rates'])
    if run_conditioned:
      starting = lambda i, protocol: stages.update(len(adherence.SPLITS) + i, f'next: {protocol}')
      result['conditioned'] = conditioned_eval.evaluate(
          generate, params, config, mesh, os.path.join(videos_dir, 'conditioned'), seed=seed,
          frozen=frozen, protocols=conditioned, starting=starting)
      for name, splits in result['conditioned'].items():
        logging.info('%s: %s', name, {k: v['rates'] for k, v in splits.items()})
  stages.update(stages.total)
  _write(result, output)
  return result


def _write(result, output):
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, 'w') as f:
    json.dump(result, f, indent=2)


def check_options(conditioned, upscale_noise) -> list[str]:
  """The conditioned protocols to run (ValueError on unknown names or a bad upscale_noise)."""
  upscale.check_noise(upscale_noise)
  conditioned = [p for p in conditioned if p != 'none']
  unknown = set(conditioned) - set(conditioned_eval.PROTOCOLS)
  if unknown:
    raise ValueError(f'Unknown conditioned protocol(s) {sorted(unknown)}; expected some of'
                     f' {list(conditioned_eval.PROTOCOLS)} or none.')
  return conditioned

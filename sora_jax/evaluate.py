r"""Evaluates a trained run: held-out flow-matching loss and (shapes) prompt adherence from pixels.

  python -m sora_jax.evaluate --workdir=runs/demo --output=runs/demo/eval.json \
      [--sampler=dpm++2m --num_steps=16 --negative_prompt=... --guidance_schedule=linear]

Loss: mean velocity MSE on fresh clips (seed disjoint from training) at a fixed timestep grid with fixed
noise, for seen and held-out (colour, shape) pairs. Adherence: one video per prompt (every pair x every
direction x eval.samples_per_prompt), written as mp4, decoded again and judged by
`data_pipelines.shapes.judge_clip`: colour, shape, direction, and a stable object in every frame.
Runs trained with config.condition.mix also get image-to-video, forward extension and 4x-length
sliding-window videos judged, with temporal consistency at window boundaries
(sora_jax/conditioned_eval.py; --conditioned=image_to_video,extension,long_video,
long_video_from_image or none).
Upscaler runs (config.upscale.factor > 1): PSNR of the upscaled eval clips (and of bilinear
upsampling) against the real ones, plus the judged adherence of the upscaled mp4s;
--upscale_workdir=UP on a base run judges the base model's videos after that upscaler.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from data_pipelines import pipeline, shapes
from sora_jax import checkpoint, conditioning, restore, sampling, sharding, upscale, video_io
from sora_jax import frozen as frozen_lib
from sora_jax.diffusion import flow


def define_flags():
  """Defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('output', None, 'JSON file for the results.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint to evaluate (default: latest).')
  flags.DEFINE_integer('seed', 0, 'Sampling noise seed.')
  sampling.define_sampler_flags()
  flags.DEFINE_bool('flow_loss', True, 'Also measure the held-out flow-matching loss (it does not'
                    ' depend on the sampling flags).')
  flags.DEFINE_bool('use_ema', True, 'Evaluate the EMA parameters.')
  flags.DEFINE_string('videos_dir', None, 'Where judged videos go (default: next to --output).')
  flags.DEFINE_string('upscale_workdir', None, 'An upscaler run (config.upscale.factor > 1): judge'
                      ' the base videos after upscaling them with it (what sample'
                      ' --upscale_workdir writes).')
  upscale.define_noise_flag()
  flags.DEFINE_list('conditioned', ['image_to_video', 'extension', 'long_video',
                                    'long_video_from_image'],
                    'Conditioned protocols judged on runs trained with config.condition.mix'
                    ' (sora_jax/conditioned_eval.py); "none" for none.')


SPLITS = {'seen': 'train', 'held_out': 'heldout'}


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
  return {'mean': float(by_t.mean()), 'by_t': {f'{t:.4f}': float(l) for t, l in zip(grid, by_t)}}


def adherence(samples: list[dict]) -> dict:
  """Judges the written mp4 files (what a user sees), not the raw arrays."""
  keys = ('color', 'shape', 'direction', 'stable')
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


def adherence_prompts(split: str, samples_per_prompt: int) -> list[str]:
  """Every (colour, shape) pair of `split` x every direction, `samples_per_prompt` times."""
  return [shapes.caption(c, s, d) for c, s in shapes.pairs(split)
          for d in shapes.DIRECTIONS] * samples_per_prompt


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
  return adherence(sampling.write_videos(videos, prompts, videos_dir, fps=config.data.fps))


def upscaling(generate, params, config, mesh, split: str, videos_dir: str, *, seed: int,
              frozen) -> dict:
  """An upscaler run on `split`'s eval clips downsampled by its factor: PSNR of its output and of
  bilinear upsampling against the real clips, and the judged adherence of its output (mp4s)."""
  f = config.upscale.factor
  clips, prompts = upscale.eval_clips(config, split, config.eval.num_videos)
  low = np.asarray(upscale.downsample(clips, f))
  videos = sampling.generate_videos(generate, params, prompts, config=config, mesh=mesh, seed=seed,
                                    batch_size=config.eval.batch_size, frozen=frozen, lowres=low)
  real = video_io.to_uint8(clips)
  bilinear = video_io.to_uint8(np.asarray(upscale.upsample(low, f)))
  result = adherence(sampling.write_videos(videos, prompts, videos_dir, fps=config.data.fps))
  result['psnr_db'] = {'upscaled': float(upscale.psnr(videos, real).mean()),
                       'bilinear': float(upscale.psnr(bilinear, real).mean())}
  return result


def evaluate(workdir, output, *, step=None, seed=0, num_steps=None, guidance_scale=None,
             use_ema=True, videos_dir=None, sampler=None, negative_prompt=None,
             guidance_schedule=None, guidance_interval=None, flow_loss=True,
             conditioned=('image_to_video', 'extension', 'long_video', 'long_video_from_image'),
             upscale_workdir=None, upscale_noise=None) -> dict:
  """Sampling options left None come from config.sample (see `sampling.settings`). `conditioned`:
  the conditioned_eval protocols run when the run was trained with conditioning. upscale_workdir:
  judge the videos after that upscaler run (upscale.Upscaler). upscale_noise: the upscaler's input
  noise level (of `upscale_workdir`, or of `workdir` if it is an upscaler), else its config's."""
  conditioned = _check_options(conditioned, upscale_noise)
  from sora_jax import conditioned_eval  # pylint: disable=g-import-not-at-top  (imports this module)
  config, mesh, graphdef, params, step = restore.load(workdir, step=step, use_ema=use_ema)
  if upscale_noise is not None and upscale.enabled(config):
    config.upscale.sample_noise = upscale_noise
  if config.model.family == 'vae':
    result = {'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema}
    with jax.set_mesh(mesh):
      for name, split in SPLITS.items():
        result[name] = {'reconstruction': reconstruction(graphdef, params, config, mesh, split)}
        logging.info('%s: reconstruction %s', name, result[name]['reconstruction'])
    _write(result, output)
    return result
  upscaler = None
  if upscale_workdir:
    upscaler = upscale.Upscaler(upscale_workdir, noise=upscale_noise)
    upscaler.check_input(config.data.num_frames, config.data.height, config.data.width)
    upscaler.load()  # outside the base run's mesh context: restoring builds its own
  frozen = frozen_lib.Frozen(config)
  options = sampling.settings(config, num_steps=num_steps, guidance_scale=guidance_scale,
                              sampler=sampler, negative_prompt=negative_prompt,
                              guidance_schedule=guidance_schedule,
                              guidance_interval=guidance_interval)
  videos_dir = videos_dir or os.path.splitext(output)[0] + '_videos'
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **options)
  result = {'workdir': os.path.abspath(workdir), 'step': step, 'use_ema': use_ema, **options,
            'seed': seed}
  if upscaler is not None or upscale.enabled(config):
    result['upscale_noise'] = (upscaler.load()[0] if upscaler else config).upscale.sample_noise
  with jax.set_mesh(mesh):
    for name, split in SPLITS.items():
      result[name] = {}
      if upscale.enabled(config):
        result[name]['upscaling'] = upscaling(generate, params, config, mesh, split,
                                              os.path.join(videos_dir, name), seed=seed,
                                              frozen=frozen)
        logging.info('%s: upscaling %s psnr %s', name, result[name]['upscaling']['rates'],
                     result[name]['upscaling']['psnr_db'])
        continue
      if flow_loss:
        result[name]['flow_matching_loss'] = flow_matching_loss(graphdef, params, config, mesh,
                                                                split, frozen)
      result[name]['adherence'] = split_adherence(generate, params, config, mesh, split,
                                                  os.path.join(videos_dir, name), seed=seed,
                                                  frozen=frozen, upscaler=upscaler)
      logging.info('%s: loss %s, adherence %s', name,
                   result[name].get('flow_matching_loss', {}).get('mean'),
                   result[name]['adherence']['rates'])
    if conditioned and conditioning.enabled(config):
      result['conditioned'] = conditioned_eval.evaluate(
          generate, params, config, mesh, os.path.join(videos_dir, 'conditioned'), seed=seed,
          frozen=frozen, protocols=conditioned)
      for name, splits in result['conditioned'].items():
        logging.info('%s: %s', name, {k: v['rates'] for k, v in splits.items()})
  _write(result, output)
  return result


def _write(result, output):
  if os.path.dirname(output):
    os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, 'w') as f:
    json.dump(result, f, indent=2)


def _check_options(conditioned, upscale_noise) -> list[str]:
  """The conditioned protocols to run (ValueError on unknown names or a bad upscale_noise)."""
  from sora_jax import conditioned_eval  # pylint: disable=g-import-not-at-top  (imports this module)
  upscale.check_noise(upscale_noise)
  conditioned = [p for p in conditioned if p != 'none']
  unknown = set(conditioned) - set(conditioned_eval.PROTOCOLS)
  if unknown:
    raise ValueError(f'Unknown conditioned protocol(s) {sorted(unknown)}; expected some of'
                     f' {list(conditioned_eval.PROTOCOLS)} or none.')
  return conditioned


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  f = flags.FLAGS
  try:
    options = sampling.flag_values()
    _check_options(f.conditioned, f.upscale_noise)  # before restoring and compiling anything
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  result = evaluate(f.workdir, f.output, step=f.checkpoint_step, seed=f.seed, use_ema=f.use_ema,
                    videos_dir=f.videos_dir, flow_loss=f.flow_loss, conditioned=f.conditioned,
                    upscale_workdir=f.upscale_workdir, upscale_noise=f.upscale_noise, **options)
  for name in SPLITS:
    if 'reconstruction' in result[name]:
      print(name, result[name]['reconstruction'])
    elif 'upscaling' in result[name]:
      print(name, result[name]['upscaling']['rates'], 'PSNR dB',
            result[name]['upscaling']['psnr_db'])
    elif 'flow_matching_loss' in result[name]:
      print(name, 'loss', round(result[name]['flow_matching_loss']['mean'], 4),
            result[name]['adherence']['rates'])
    else:
      print(name, result[name]['adherence']['rates'])
  for name, splits in result.get('conditioned', {}).items():
    for split, r in splits.items():
      print(name, split, r['rates'], 'jump rate', r['continuity']['jump_rate'])


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir', 'output'])
  app.run(main)

"""Text-to-video generation: an ODE sampler (Euler, Heun, DPM-Solver++(2M)) with classifier-free
guidance, negative prompts and a guidance schedule, compiled once."""

import json
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from absl import flags
from flax import nnx

from sora_jax import config_lib, sharding, video_io
from sora_jax import frozen as frozen_lib
from sora_jax.diffusion import flow, samplers


def timestep_shift(config) -> float:
  """The flow-time shift for the default clip's token count (in latent space with an autoencoder)."""
  clip = config_lib.model_clip_shape(config)
  tokens = math.prod(n // p for n, p in zip(clip, config.model.patch_size))
  return flow.shift_for_tokens(tokens, config.diffusion.shift, config.diffusion.shift_base_tokens)


def settings(config, *, num_steps=None, guidance_scale=None, sampler=None, negative_prompt=None,
             guidance_schedule=None, guidance_interval=None) -> dict:
  """make_generate's keyword arguments: each given value, else config.sample's, else the plain-CFG
  Euler default (workdirs written before the sampler options existed lack those keys)."""
  c = config.sample
  pick = lambda value, key, default: c.get(key, default) if value is None else value
  out = {'num_steps': int(pick(num_steps, 'num_steps', None)),
         'guidance_scale': float(pick(guidance_scale, 'guidance_scale', None)),
         'sampler': pick(sampler, 'sampler', 'euler'),
         'negative_prompt': pick(negative_prompt, 'negative_prompt', ''),
         'guidance_schedule': pick(guidance_schedule, 'guidance_schedule', 'constant'),
         'guidance_interval': tuple(float(v) for v in pick(guidance_interval, 'guidance_interval',
                                                           (0.0, 1.0)))}
  if out['num_steps'] <= 0:
    raise ValueError(f'num_steps={out["num_steps"]} must be positive.')
  samplers.get(out['sampler'])
  flow.guidance_schedule(out['guidance_scale'], out['guidance_schedule'], out['guidance_interval'])
  return out


def define_sampler_flags():
  """The sampling flags shared by the `sample` and `evaluate` programs (unset: config.sample's)."""
  flags.DEFINE_integer('num_steps', None, 'ODE steps (default: config.sample.num_steps).')
  flags.DEFINE_float('guidance_scale', None, 'CFG scale (default: config.sample.guidance_scale).')
  flags.DEFINE_enum('sampler', None, list(samplers.SAMPLERS),
                    'ODE solver (default: config.sample.sampler, else euler). Model calls per video'
                    ' for N steps: euler N, heun 2N - 1, dpm++2m N.')
  flags.DEFINE_string('negative_prompt', None, 'Caption CFG guides away from (default:'
                      ' config.sample.negative_prompt, else the empty caption).')
  flags.DEFINE_enum('guidance_schedule', None, list(flow.GUIDANCE_SCHEDULES),
                    'CFG scale over flow time t: constant; linear (scale at t=1 down to 1 at t=0);'
                    ' interval (scale inside --guidance_interval, 1 outside).')
  flags.DEFINE_list('guidance_interval', None, 'lo,hi in flow time for --guidance_schedule=interval'
                    ' (default: config.sample.guidance_interval, else 0,1).')


def flag_values() -> dict:
  """The flags of `define_sampler_flags` as `settings` keywords (None where unset)."""
  f = flags.FLAGS
  interval = f.guidance_interval
  if interval is not None:
    if len(interval) != 2:
      raise ValueError(f'--guidance_interval={",".join(interval)} must be two numbers, lo,hi.')
    interval = tuple(float(v) for v in interval)
  return {'num_steps': f.num_steps, 'guidance_scale': f.guidance_scale, 'sampler': f.sampler,
          'negative_prompt': f.negative_prompt, 'guidance_schedule': f.guidance_schedule,
          'guidance_interval': interval}


def make_generate(graphdef, config, *, num_steps: int, guidance_scale, frozen=None,
                  sampler: str = 'euler', negative_prompt: str = '',
                  guidance_schedule: str = 'constant', guidance_interval=(0.0, 1.0)):
  """jitted (params, captions [B, L(, D)], mask [B, L], keys [B]) -> model-space videos [B, T, H, W, C]
  (pixels in [-1, 1], or latents: decode with `frozen.decode`).

  Captions are what the model takes (`frozen.caption_inputs`). Noise comes from one key per video, so
  a prompt's video does not depend on what it is batched with.

  sampler: a name in `samplers.SAMPLERS` ('euler', 'heun', 'dpm++2m'), `num_steps` steps on the shifted
    schedule. negative_prompt: the caption CFG guides away from (the empty caption: plain CFG).
  guidance_scale: a float, shaped over t by `guidance_schedule` ('constant', 'linear', 'interval' over
    `guidance_interval`, see `flow.guidance_schedule`), or a function t [B] -> scale [B] used as is.
  """
  frozen = frozen or frozen_lib.Frozen(config)
  neg_tokens, neg_mask = frozen.tokenize([negative_prompt])
  neg_tokens, neg_mask = frozen.caption_inputs(jnp.asarray(neg_tokens), jnp.asarray(neg_mask))
  timesteps = flow.sampling_schedule(num_steps, timestep_shift(config))
  shape = frozen_lib.model_video_shape(config)
  solve = samplers.get(sampler)
  if callable(guidance_scale):
    scale = guidance_scale
  else:
    scale = flow.guidance_schedule(guidance_scale, guidance_schedule, guidance_interval)

  @jax.jit
  def generate(params, tokens, mask, keys):
    model = nnx.merge(graphdef, params)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    both_tokens = jnp.concatenate([tokens, jnp.broadcast_to(neg_tokens, tokens.shape)])
    both_mask = jnp.concatenate([mask, jnp.broadcast_to(neg_mask, mask.shape)])
    velocity = flow.guided_velocity(lambda x, t: model(x, t, both_tokens, both_mask), scale)
    return solve(velocity, noise, timesteps)

  return generate


def generate_videos(generate, params, prompts, *, config, mesh, seed: int,
                    batch_size: int, frozen=None) -> np.ndarray:
  """All prompts, in fixed-size (padded) batches: one compilation. Returns uint8 [N, T, H, W, 3]."""
  frozen = frozen or frozen_lib.Frozen(config)
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  batch_size = -(-min(batch_size, len(prompts)) // shards) * shards
  data_sharding = sharding.batch_sharding(mesh)
  base = jax.random.PRNGKey(seed)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [''] * (batch_size - n)
    tokens, mask = frozen.tokenize(chunk)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + batch_size))
    tokens, mask, keys = jax.device_put((tokens, mask, keys), data_sharding)
    videos = frozen.decode(generate(params, *frozen.caption_inputs(tokens, mask), keys))
    # Every process gets all videos (its devices hold only some rows on a multi-host mesh).
    videos = multihost_utils.process_allgather(videos, tiled=True)
    out.append(video_io.to_uint8(np.asarray(videos)[:n]))
  return np.concatenate(out)


def write_videos(videos, prompts, output_dir: str, fps: int) -> list[dict]:
  """One mp4 per prompt plus samples.json; returns the manifest entries."""
  os.makedirs(output_dir, exist_ok=True)
  samples = []
  for i, (video, prompt) in enumerate(zip(videos, prompts)):
    slug = ''.join(ch if ch.isalnum() else '_' for ch in prompt)[:60].strip('_') or 'unconditional'
    path = os.path.join(output_dir, f'{i:03d}_{slug}.mp4')
    video_io.write_mp4(path, video, fps=fps)
    samples.append({'prompt': prompt, 'path': os.path.abspath(path)})
  with open(os.path.join(output_dir, 'samples.json'), 'w') as f:
    json.dump({'samples': samples}, f, indent=2)
  return samples

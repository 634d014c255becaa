"""Text-to-video generation: Euler ODE sampler with classifier-free guidance, compiled once."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import config_lib, sharding, video_io
from sora_jax import frozen as frozen_lib
from sora_jax.diffusion import flow


def timestep_shift(config) -> float:
  """The flow-time shift for the default clip's token count (in latent space with an autoencoder)."""
  clip = config_lib.model_clip_shape(config)
  tokens = math.prod(n // p for n, p in zip(clip, config.model.patch_size))
  return flow.shift_for_tokens(tokens, config.diffusion.shift, config.diffusion.shift_base_tokens)


def make_generate(graphdef, config, *, num_steps: int, guidance_scale: float, frozen=None):
  """jitted (params, captions [B, L(, D)], mask [B, L], keys [B]) -> model-space videos [B, T, H, W, C]
  (pixels in [-1, 1], or latents: decode with `frozen.decode`).

  Captions are what the model takes (`frozen.caption_inputs`). Noise comes from one key per video, so
  a prompt's video does not depend on what it is batched with.
  """
  frozen = frozen or frozen_lib.Frozen(config)
  null_tokens, null_mask = frozen.null_caption()
  timesteps = flow.sampling_schedule(num_steps, timestep_shift(config))
  shape = frozen_lib.model_video_shape(config)

  @jax.jit
  def generate(params, tokens, mask, keys):
    model = nnx.merge(graphdef, params)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    both_tokens = jnp.concatenate([tokens, jnp.broadcast_to(null_tokens, tokens.shape)])
    both_mask = jnp.concatenate([mask, jnp.broadcast_to(null_mask, mask.shape)])
    velocity = flow.guided_velocity(lambda x, t: model(x, t, both_tokens, both_mask),
                                    guidance_scale)
    return flow.euler_sample(velocity, noise, timesteps)

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
    out.append(video_io.to_uint8(jax.device_get(videos)[:n]))
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

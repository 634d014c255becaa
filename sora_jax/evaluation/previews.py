"""What a run shows of itself while it trains (every config.sample_every_steps, and at the end): one
preview per objective, so the train loop knows none of them.

  text-to-video / frame-conditioned: videos of fixed prompts (preview_prompts);
  upscaler: bilinear | upscaled | real clips side by side;
  autoencoder: fixed clips above their reconstructions.

Every process runs them (their collectives are those of training): generated previews in batches
of config.batch_size over the training mesh, process 0 writing the files. How many:
config.sample.prompts when set (all of them), else config.num_train_samples. How long:
config.sample.max_seconds (0: no limit) stops them after the batch during which it ran out, on
every process alike (process 0's clock decides), with a warning saying how many videos were made.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from data_pipelines import pipeline, shapes
from sora_jax.common import video_io
from sora_jax.diffusion import cascade
from sora_jax.evaluation import upscaling
from sora_jax.inference import sampling
from sora_jax.training import update


def make(graphdef, config, mesh, frozen):
  """preview(params) -> (uint8 videos [N, T, H, W, 3], captions) for this run's objective."""
  name = update.objective(config).__name__.rsplit('.', 1)[-1]
  make_preview = {'autoencoder': _reconstructions, 'upscaler': _upscaled}.get(name, _generated)
  return make_preview(graphdef, config, mesh, frozen)


def preview_prompts(config) -> list[str]:
  """What training previews show: config.sample.prompts when set; else, for user data (manifest,
  prepared, tfds), its first num_train_samples captions (prompts in the data's own language and
  domain, the same at every step: the shapes prompts mean nothing to a fine-tune on real videos);
  else the shapes prompts."""
  prompts = [str(p) for p in config.sample.get('prompts', ())]  # absent in older workdirs
  if prompts:
    return prompts
  if pipeline.uses_user_data(config):
    return pipeline.data_captions(config, config.num_train_samples)
  return sample_prompts(config.num_train_samples)


def sample_prompts(n: int) -> list[str]:
  """A fixed mix of seen and held-out shapes prompts."""
  seen = [shapes.caption(c, s, d) for (c, s), d in
          zip(shapes.pairs('train'), shapes.DIRECTIONS * 8)]
  held = [shapes.caption(c, s, d) for (c, s), d in zip(shapes.pairs('heldout'), shapes.DIRECTIONS)]
  return [p for pair in zip(seen, held) for p in pair][:n]


def reconstruct(graphdef, params, video):
  """Autoencoder reconstruction (posterior mean) of [B, T, H, W, 3] clips in [-1, 1]."""
  model = nnx.merge(graphdef, params)
  return np.asarray(jnp.clip(model.decode(model.encode(jnp.asarray(video))[0]), -1.0, 1.0))


def generate_within_budget(generate, params, prompts, *, config, mesh, frozen,
                           lowres=None) -> np.ndarray:
  """sampling.generate_videos in batches of config.batch_size (the same videos: one noise key per
  video, by its index), stopping after the batch during which config.sample.max_seconds ran out.
  Returns the uint8 videos made, [M <= N, T, H, W, 3]. Call it on every process."""
  max_seconds = float(config.sample.get('max_seconds', 0.0))  # absent in older workdirs
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  batch_size = -(-min(config.batch_size, len(prompts)) // shards) * shards
  started, out = time.perf_counter(), []
  for start in range(0, len(prompts), batch_size):
    out.append(sampling.generate_videos(
        _keys_from(generate, config.seed, start), params, prompts[start:start + batch_size],
        config=config, mesh=mesh, seed=config.seed, batch_size=batch_size, frozen=frozen,
        lowres=None if lowres is None else lowres[start:start + batch_size]))
    made = start + len(out[-1])
    if max_seconds and made < len(prompts) and _out_of_time(started, max_seconds):
      logging.warning('Training samples: config.sample.max_seconds=%g ran out after %.1f s; %d of'
                      ' the %d videos were made, the others are skipped this time.', max_seconds,
                      time.perf_counter() - started, made, len(prompts))
      break
  return np.concatenate(out)


def _keys_from(generate, seed: int, start: int):
  """`generate` given the noise keys of videos start, start + 1, ...: generate_videos numbers a
  call's videos from 0, this batch's are the whole list's from `start`."""
  def shifted(params, tokens, mask, keys, **extra):
    base = jax.random.PRNGKey(seed)
    ours = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + len(keys)))
    return generate(params, tokens, mask, jax.device_put(np.asarray(ours), keys.sharding), **extra)
  return shifted


def _out_of_time(started: float, max_seconds: float) -> bool:
  """Whether process 0's sampling has taken max_seconds: one decision for every process, so that
  none waits in a collective for another that has stopped."""
  late = np.array(time.perf_counter() - started >= max_seconds)
  if jax.process_count() > 1:
    late = multihost_utils.broadcast_one_to_all(late)
  return bool(late)


def _generated(graphdef, config, mesh, frozen):
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **sampling.settings(config))
  prompts = preview_prompts(config)

  def preview(params):
    videos = generate_within_budget(generate, params, prompts, config=config, mesh=mesh,
                                    frozen=frozen)
    return videos, prompts[:len(videos)]
  return preview


def _upscaled(graphdef, config, mesh, frozen):
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **sampling.settings(config))

  def preview(params):
    clips, prompts = upscaling.eval_clips(config, 'heldout', config.num_train_samples)
    low = np.asarray(cascade.downsample(clips, config.upscale.factor))
    up = generate_within_budget(generate, params, prompts, config=config, mesh=mesh,
                                frozen=frozen, lowres=low)
    n = len(up)
    bilinear = video_io.to_uint8(np.asarray(cascade.upsample(low[:n], config.upscale.factor)))
    return np.concatenate([bilinear, up, video_io.to_uint8(clips[:n])], axis=3), prompts[:n]
  return preview


def _reconstructions(graphdef, config, mesh, frozen):
  del mesh, frozen

  def preview(params):
    batch = pipeline.eval_batches(config, 'heldout', config.num_train_samples,
                                  config.num_train_samples)[0]
    recon = reconstruct(graphdef, params, batch['video'])
    videos = video_io.to_uint8(np.concatenate([batch['video'], recon], axis=2))
    return videos, [f'reconstruction {i}' for i in range(len(videos))]
  return preview

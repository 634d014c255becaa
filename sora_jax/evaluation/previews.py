"""What a run shows of itself while it trains (every config.sample_every_steps, and at the end): one
preview per objective, so the train loop knows none of them.

  text-to-video / frame-conditioned: videos of fixed prompts (preview_prompts);
  upscaler: bilinear | upscaled | real clips side by side;
  autoencoder: fixed clips above their reconstructions.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def _generated(graphdef, config, mesh, frozen):
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **sampling.settings(config))
  prompts = preview_prompts(config)

  def preview(params):
    return sampling.generate_videos(generate, params, prompts, config=config, mesh=mesh,
                                    seed=config.seed, batch_size=len(prompts), frozen=frozen), prompts
  return preview


def _upscaled(graphdef, config, mesh, frozen):
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **sampling.settings(config))

  def preview(params):
    clips, prompts = upscaling.eval_clips(config, 'heldout', config.num_train_samples)
    low = np.asarray(cascade.downsample(clips, config.upscale.factor))
    up = sampling.generate_videos(generate, params, prompts, config=config, mesh=mesh,
                                  seed=config.seed, batch_size=len(prompts), frozen=frozen,
                                  lowres=low)
    bilinear = video_io.to_uint8(np.asarray(cascade.upsample(low, config.upscale.factor)))
    return np.concatenate([bilinear, up, video_io.to_uint8(clips)], axis=3), prompts
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

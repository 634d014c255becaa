"""Text-to-video flow matching (rectified flow) on clips, or on packed sequences of clips.

A batch is either one clip per row ({'video', 'tokens', 'mask'}), or packed sequences of several clips
({'patches', 'positions', 'segment_ids', 'tokens' [B, S, L], 'mask'}: data_pipelines/packing.py) when
it holds 'segment_ids'. Packed: one t and caption dropout per segment, noise per token, and the loss is
the mean over real (non-padding) tokens.

The pieces other objectives build on: `flow_times` (logit-normal times, shifted, optionally one per
frame) and `drop_captions` (the empty caption in place of some, for classifier-free guidance).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.config import geometry
from sora_jax.diffusion import experts, flow
from sora_jax.models import dit
from sora_jax.training import factory


def flow_times(rng, config, shape):
  """Flow times [B], or [B, T] where frame_noise_prob gave a clip one time per temporal patch, for a
  batch of model-space `shape` [B, T, H, W, C].

  The shift is the sampler's for this clip shape (geometry.timestep_shift): shapes are static, so
  each bucket's compiled step bakes in its own resolution-dependent shift.

  A Wan 2.2 A14B run (config.model.wan.expert) samples only its expert's side of the boundary,
  from the same distribution restricted to it (flow.sample_timesteps' t_range).

  Why per frame: with some frames nearly clean and others noisy, where the object goes next is a
  first-order question, so the caption's motion words get a strong gradient; t stays shared (as
  sampled) for the other clips, which is what the sampler uses."""
  d = config.diffusion
  batch, num_frames = shape[0], shape[1]
  shift = geometry.timestep_shift(config, shape[1:4])
  t_range = None
  if factory.wan_expert(config):  # Wan 2.2 A14B: this expert's side of the boundary only
    t_range = experts.time_range(factory.wan_expert(config), config.model.wan.boundary_ratio)
  dist = dict(logit_mean=d.logit_mean, logit_std=d.logit_std, shift=shift, t_range=t_range)
  t = flow.sample_timesteps(rng, batch, **dist)
  if d.frame_noise_prob <= 0:
    return t
  pt = config.model.patch_size[0]
  own_rng, pick_rng = jax.random.split(jax.random.fold_in(rng, 1))
  frames = flow.sample_timesteps(own_rng, batch * (num_frames // pt), **dist)
  frames = jnp.repeat(frames.reshape(batch, -1), pt, axis=1)
  pick = jax.random.bernoulli(pick_rng, d.frame_noise_prob, (batch, 1))
  return jnp.where(pick, frames, t[:, None])


def _dropped(drop, null, value):
  """Caption dropout for [B, L] tokens or [B, L, D] embeddings (drop [B, 1])."""
  return jnp.where(drop.reshape(drop.shape + (1,) * (value.ndim - 2)), null, value)


def drop_captions(rng, prob: float, tokens, mask, null_caption):
  """Caption dropout: the empty caption teaches the unconditional velocity used by CFG."""
  drop = jax.random.bernoulli(rng, prob, (tokens.shape[0], 1))
  null_tokens, null_mask = null_caption
  return _dropped(drop, null_tokens, tokens), _dropped(drop, null_mask, mask)


def segment_shifts(config, segment_ids, num_segments: int):
  """[B, S] timestep shifts of packed segments, each the sampler's for its clip's token count
  (counted on device: a segment's size is data, not shape). Empty slots count as one token."""
  d = config.diffusion
  counts = (segment_ids[:, None, :] == jnp.arange(1, num_segments + 1)[None, :, None]).sum(-1)
  return geometry.shift_for_tokens(jnp.maximum(counts, 1).astype(jnp.float32), d.shift,
                                   d.shift_base_tokens)


def make_loss(graphdef, config, null_caption):
  """null_caption: (tokens, mask) [1, ...] of the empty caption as the model takes captions."""
  d = config.diffusion

  def clip_loss(params, batch, rngs):
    x0 = batch['video']
    t = flow_times(rngs['t'], config, x0.shape)
    noise = jax.random.normal(rngs['noise'], x0.shape, x0.dtype)
    tokens, mask = drop_captions(rngs['drop'], config.text.dropout_prob, batch['tokens'],
                                 batch['mask'], null_caption)
    v = nnx.merge(graphdef, params)(flow.interpolate(x0, noise, t), t, tokens, mask)
    return flow.loss(v, x0, noise, flow.loss_weight(t, d.loss_t_floor)).mean(), {}

  def packed_loss(params, batch, rngs):
    x0, segment_ids = batch['patches'], batch['segment_ids']
    b, s = batch['tokens'].shape[:2]
    shift = segment_shifts(config, segment_ids, s).reshape(b * s)
    t = flow.sample_timesteps(rngs['t'], b * s, logit_mean=d.logit_mean, logit_std=d.logit_std,
                              shift=shift).reshape(b, s)
    noise = jax.random.normal(rngs['noise'], x0.shape, x0.dtype)
    t_token = dit.per_token(t, dit.segment_index(segment_ids))
    flat = lambda x: x.reshape(b * s, *x.shape[2:])
    tokens, mask = drop_captions(rngs['drop'], config.text.dropout_prob, flat(batch['tokens']),
                                 flat(batch['mask']), null_caption)
    v = nnx.merge(graphdef, params).packed(
        flow.interpolate(x0, noise, t_token), batch['positions'], segment_ids, t,
        tokens.reshape(batch['tokens'].shape), mask.reshape(batch['mask'].shape))
    return flow.packed_loss(v, x0, noise, segment_ids,
                            flow.loss_weight(t_token, d.loss_t_floor)), {}

  def loss(params, batch, rngs):
    return (packed_loss if 'segment_ids' in batch else clip_loss)(params, batch, rngs)

  return loss

"""Flow matching with given frames (image-to-video, extension, connecting clips, long videos).

Each clip draws a pattern from config.condition.mix (diffusion/given_frames.py). Given frames ride on
the per-frame flow times: t = 0 (or a small context noise) keeps them clean, the model sees their mask
as an extra input channel, and the loss covers only the frames to generate.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.diffusion import flow, given_frames
from sora_jax.training.objectives import text_to_video


def make_loss(graphdef, config, null_caption):
  d, c = config.diffusion, config.condition

  def loss(params, batch, rngs):
    x0 = batch['video']
    b = x0.shape[0]
    t = text_to_video.flow_times(rngs['t'], config, x0.shape)
    given, image = given_frames.sample_given(jax.random.fold_in(rngs['t'], 2), config, b,
                                             x0.shape[1])
    if not config.autoencoder:
      x0 = given_frames.as_image(x0, image, config.model.patch_size[0])
    t_given = 0.0
    if c.context_noise > 0:
      t_given = jax.random.uniform(jax.random.fold_in(rngs['t'], 3), (b, 1), maxval=c.context_noise)
    t = jnp.where(given > 0, t_given,
                  t if t.ndim == 2 else jnp.broadcast_to(t[:, None], given.shape))
    noise = jax.random.normal(rngs['noise'], x0.shape, x0.dtype)
    tokens, mask = text_to_video.drop_captions(rngs['drop'], config.text.dropout_prob,
                                               batch['tokens'], batch['mask'], null_caption)
    v = nnx.merge(graphdef, params)(flow.interpolate(x0, noise, t), t, tokens, mask, given=given)
    weight = flow.loss_weight(t, d.loss_t_floor)
    return given_frames.masked_loss(v, x0, noise, weight, given).mean(), {}

  return loss

"""Flow matching for a cascaded upscaler (config.upscale.factor > 1): the clip's own degraded copy
(box-downsampled, re-upsampled, noise-augmented: diffusion/cascade.py) joins the noisy clip as extra
input channels; with config.upscale.residual the model predicts the detail over it."""

import jax
from flax import nnx

from sora_jax.diffusion import cascade, flow
from sora_jax.training.objectives import text_to_video


def make_loss(graphdef, config, null_caption):
  d = config.diffusion

  def loss(params, batch, rngs):
    x0 = batch['video']
    t = text_to_video.flow_times(rngs['t'], config, x0.shape)
    noise = jax.random.normal(rngs['noise'], x0.shape, x0.dtype)
    tokens, mask = text_to_video.drop_captions(rngs['drop'], config.text.dropout_prob,
                                               batch['tokens'], batch['mask'], null_caption)
    lowres, base = cascade.training_condition(x0, config, jax.random.fold_in(rngs['noise'], 1))
    v = nnx.merge(graphdef, params)(flow.interpolate(x0, noise, t), t, tokens, mask, lowres=lowres,
                                    base=base)
    return flow.loss(v, x0, noise, flow.loss_weight(t, d.loss_t_floor)).mean(), {}

  return loss

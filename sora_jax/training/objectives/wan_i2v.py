"""Wan image-to-video flow matching, as WanImageToVideoPipeline conditions the transformer (Wan 2.1
I2V; Wan 2.2 I2V-A14B the same without 'image_embeds': its experts take no CLIP tokens).

The batch carries, besides the clip's latents and caption, what the frozen encoders computed from its
first frame before the train step (sora_jax/inference/frozen.py): 'image_condition' [B, T, H, W, 4 + C]
(the frame mask, ones on latent frame 0, and the VAE latents of [first frame, zero frames]) and
'image_embeds' [B, 257, 1280] (CLIP ViT-H/14 hidden_states[-2]). The transformer sees
[noisy latents; image_condition] (2C + 4 channels, diffusers' order) and the image tokens.

Every latent frame is noised, the first included (Wan 2.1 I2V carries the image in the condition
channels; only Wan 2.2 TI2V keeps the first frame clean), and the loss is the ordinary flow loss on the
model's C output channels, i.e. on the noisy-latent channels only and over all frames: what
musubi-tuner and finetrainers train Wan 2.1 I2V with. Caption dropout as for text-to-video; the image
is never dropped (the pipeline's unconditional CFG half keeps the image and drops the caption).
"""

import jax
from flax import nnx

from sora_jax.diffusion import flow
from sora_jax.models import wan
from sora_jax.training.objectives import text_to_video


def velocity(model, x_t, t, tokens, mask, image_condition, image_embeds=None):
  """The flow velocity of a TextToVideo model over a Wan I2V transformer (image_embeds None: Wan 2.2
  I2V-A14B's experts, which take no CLIP tokens)."""
  context, context_mask = model.encode_text(tokens, mask)
  out = model.dit(wan.i2v_input(x_t, image_condition), t, context, context_mask,
                  image_embeds=image_embeds)
  return flow.velocity_from_x0(out, x_t, t) if model.prediction == 'x0' else out


def make_loss(graphdef, config, null_caption):
  d = config.diffusion

  def loss(params, batch, rngs):
    if 'segment_ids' in batch:
      raise ValueError('Wan image-to-video does not train on packed sequences.')
    x0 = batch['video']
    t = text_to_video.flow_times(rngs['t'], config, x0.shape)
    noise = jax.random.normal(rngs['noise'], x0.shape, x0.dtype)
    tokens, mask = text_to_video.drop_captions(rngs['drop'], config.text.dropout_prob,
                                               batch['tokens'], batch['mask'], null_caption)
    v = velocity(nnx.merge(graphdef, params), flow.interpolate(x0, noise, t), t, tokens, mask,
                 batch['image_condition'], batch.get('image_embeds'))
    return flow.loss(v, x0, noise, flow.loss_weight(t, d.loss_t_floor)).mean(), {}

  return loss

"""The causal video autoencoder (model.family='vae'): reconstruction (L1 + L2) + KL, with PSNR among
the metrics (models/vae.py:vae_loss). Captions are unused."""

from flax import nnx

from sora_jax.models import vae


def make_loss(graphdef, config, null_caption):
  del null_caption
  v = config.vae

  def loss(params, batch, rngs):
    return vae.vae_loss(nnx.merge(graphdef, params), batch['video'], rngs['noise'],
                        kl_weight=v.kl_weight, l1_weight=v.l1_weight, l2_weight=v.l2_weight)

  return loss

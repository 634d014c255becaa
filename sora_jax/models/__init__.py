"""Model families. `build(config, rngs)` gives the trainable text-to-video model."""

import jax.numpy as jnp
from flax import nnx

from sora_jax import conditioning, upscale
from sora_jax.diffusion import flow
from sora_jax.models import dit, text

# Parameters are created unsharded (or abstractly) and placed by `jax.jit(out_shardings=...)` from
# their logical-axis metadata (sora_jax/sharding.py), so models also build outside a mesh context.
nnx.use_eager_sharding(False)


class TextToVideo(nnx.Module):
  """Text encoder + video DiT. The byte encoder trains jointly; a frozen pretrained encoder (UMT5) runs
  outside the params (sora_jax/frozen.py), and then `text_encoder` is None and the caption inputs
  (`tokens`, `mask`) are its embeddings [B, L, D] and mask [B, L].

  Returns the flow velocity at (x_t, t) whatever the DiT predicts: 'velocity' directly, or 'x0' (the
  clean clip), converted by `flow.velocity_from_x0`.
  """

  def __init__(self, text_encoder, dit_model, prediction: str = 'velocity'):
    self.text_encoder = text_encoder
    self.dit = dit_model
    self.prediction = prediction

  def encode_text(self, tokens, mask):
    return (tokens, mask) if self.text_encoder is None else self.text_encoder(tokens, mask)

  def __call__(self, x_t, t, tokens, mask, given=None, lowres=None, base=None):
    """given [B, T]: the given-frame mask of a conditioned model (sora_jax/conditioning.py);
    lowres [B, T, H, W, C]: an upscaler's upsampled low-resolution input (sora_jax/upscale.py);
    base [B, T, H, W, C]: with x0 prediction, the DiT predicts the clean clip's difference from it
    (an upscaler's residual over its clean upsampled input)."""
    context, context_mask = self.encode_text(tokens, mask)
    extra = {} if given is None else {'given': given}
    if lowres is not None:
      extra['lowres'] = lowres
    out = self.dit(x_t, t, context, context_mask, **extra)
    if base is not None:
      if self.prediction != 'x0':
        raise ValueError('A residual base needs diffusion.prediction="x0".')
      out = out + base
    return flow.velocity_from_x0(out, x_t, t) if self.prediction == 'x0' else out

  def packed(self, x_t, positions, segment_ids, t, tokens, mask):
    """Packed sequences (see dit.VideoDiT.packed): x_t [B, N, patch_dim] noisy patch tokens, positions
    [B, N, 3], segment_ids [B, N], t [B, S], caption tokens / mask [B, S, L] -> velocity per token.

    The text encoder runs once over all B*S captions.
    """
    b, s, length = mask.shape
    context, context_mask = self.encode_text(tokens.reshape(b * s, length, *tokens.shape[3:]),
                                             mask.reshape(b * s, length))
    out = self.dit.packed(x_t, positions, segment_ids, t, context.reshape(b, s, length, -1),
                          context_mask.reshape(b, s, length))
    if self.prediction == 'x0':
      return flow.velocity_from_x0(out, x_t, dit.per_token(t, dit.segment_index(segment_ids)))
    return out


def text_width(config) -> int:
  """Width of the caption embeddings the DiT cross-attends to."""
  if config.text.encoder == 'umt5':
    from sora_jax.interop import umt5  # pylint: disable=g-import-not-at-top
    return umt5.load_umt5_config(config.text.path).d_model
  return config.text.width


def channels(config) -> int:
  """Channels the diffusion model sees: RGB, or the autoencoder's latent channels."""
  if config.autoencoder:
    from sora_jax import config_lib  # pylint: disable=g-import-not-at-top
    return config_lib.autoencoder_geometry(config.autoencoder)['z_dim']
  return 3


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  """The trainable model of `config.model.family`: TextToVideo ('dit', 'wan') or the VAE ('vae')."""
  channels_in = channels(config)
  dtype = jnp.dtype(config.model.dtype)
  m = config.model
  if m.family == 'vae':
    from sora_jax.models import vae  # pylint: disable=g-import-not-at-top
    return vae.CausalVAE(**vae_kwargs(config.vae), dtype=dtype, rngs=rngs)
  encoder = None
  if config.text.encoder == 'bytes':
    encoder = text.ByteTextEncoder(
        max_length=config.text.max_length, width=config.text.width, depth=config.text.depth,
        num_heads=config.text.num_heads, word_buckets=config.text.word_buckets, rngs=rngs,
        dtype=dtype)
  if m.family == 'wan':
    from sora_jax.models import wan  # pylint: disable=g-import-not-at-top
    video_model = wan.WanDiT(wan.WanConfig(**wan_kwargs(config, channels_in)),
                             scan_layers=m.scan_layers, remat=m.remat, dtype=dtype, rngs=rngs,
                             attention_impl=m.attention,
                             context_parallel=m.context_parallel or None)
  else:
    video_model = dit.VideoDiT(
        channels=channels_in, patch_size=tuple(m.patch_size), width=m.width, depth=m.depth,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, context_width=text_width(config),
        rope_theta=m.rope_theta, scan_layers=m.scan_layers, remat=m.remat, dtype=dtype, rngs=rngs,
        attention_impl=m.attention, context_parallel=m.context_parallel or None,
        condition_channel=conditioning.enabled(config),
        lowres_channels=channels_in if upscale.enabled(config) else 0)
  return TextToVideo(encoder, video_model, config.diffusion.prediction)


def wan_kwargs(config, channels: int) -> dict:
  """diffusers WanTransformer3DModel config fields from a sora_jax config."""
  w = config.model.wan
  return dict(patch_size=tuple(config.model.patch_size), num_attention_heads=w.num_attention_heads,
              attention_head_dim=w.attention_head_dim, in_channels=channels, out_channels=channels,
              text_dim=text_width(config), freq_dim=w.freq_dim, ffn_dim=w.ffn_dim,
              num_layers=w.num_layers, cross_attn_norm=w.cross_attn_norm, eps=w.eps,
              rope_max_seq_len=w.rope_max_seq_len)


def vae_kwargs(v) -> dict:
  return dict(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=tuple(v.dim_mult),
              num_res_blocks=v.num_res_blocks, attn_scales=tuple(v.attn_scales),
              temperal_downsample=tuple(bool(x) for x in v.temperal_downsample),
              dropout=v.dropout, latents_mean=None, latents_std=None)

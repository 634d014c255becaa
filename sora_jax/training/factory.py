"""`build(config, rngs)`: the trainable model a run config describes, from the model families' explicit
constructor arguments (models/ never reads the run config)."""

import jax.numpy as jnp
from flax import nnx

from sora_jax.config import geometry
from sora_jax.interop import umt5
from sora_jax.models import dit, lora, text, text_to_video, vae, wan


def text_width(config) -> int:
  """Width of the caption embeddings the DiT cross-attends to."""
  if config.text.encoder == 'umt5':
    return umt5.load_umt5_config(config.text.path).d_model
  return config.text.width


def channels(config) -> int:
  """Channels the diffusion model sees: RGB, or the autoencoder's latent channels."""
  if config.autoencoder:
    return geometry.autoencoder_geometry(config.autoencoder)['z_dim']
  return 3


def build(config, rngs: nnx.Rngs) -> nnx.Module:
  """The trainable model of `config.model.family`: TextToVideo ('dit', 'wan') or the VAE ('vae').

  With config.lora.rank > 0 the model carries LoRA adapters (sora_jax/models/lora.py).
  Parameters are created unsharded (or abstractly) and placed by `jax.jit(out_shardings=...)` from
  their logical-axis metadata (parallel/sharding.py), so models also build outside a mesh context.
  """
  with nnx.use_eager_sharding(False):
    model = _build(config, rngs)
    if config.lora.rank:  # adapters on the matching linear layers (config.lora.targets)
      lora.add(model, rank=config.lora.rank, alpha=config.lora.alpha or config.lora.rank,
               targets=config.lora.targets, rngs=rngs)
    return model


def _build(config, rngs):
  channels_in = channels(config)
  dtype = jnp.dtype(config.model.dtype)
  m = config.model
  if m.family == 'vae':
    return vae.CausalVAE(**vae_kwargs(config.vae), dtype=dtype, rngs=rngs)
  encoder = None
  if config.text.encoder == 'bytes':
    encoder = text.ByteTextEncoder(
        max_length=config.text.max_length, width=config.text.width, depth=config.text.depth,
        num_heads=config.text.num_heads, word_buckets=config.text.word_buckets, rngs=rngs,
        dtype=dtype)
  if m.family == 'wan':
    video_model = wan.WanDiT(wan.WanConfig(**wan_kwargs(config, channels_in)),
                             scan_layers=m.scan_layers, remat=m.remat, dtype=dtype, rngs=rngs,
                             attention_impl=m.attention,
                             context_parallel=m.context_parallel or None,
                             expand_timesteps=wan_ti2v(config))
  else:
    video_model = dit.VideoDiT(
        channels=channels_in, patch_size=tuple(m.patch_size), width=m.width, depth=m.depth,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, context_width=text_width(config),
        rope_theta=m.rope_theta, scan_layers=m.scan_layers, remat=m.remat, dtype=dtype, rngs=rngs,
        attention_impl=m.attention, context_parallel=m.context_parallel or None,
        condition_channel=geometry.conditioning_enabled(config),
        lowres_channels=channels_in if geometry.upscale_enabled(config) else 0)
  return text_to_video.TextToVideo(encoder, video_model, config.diffusion.prediction)


def wan_i2v(config) -> bool:
  """A Wan image-to-video run: the first frame's latents and frame mask condition every clip through
  the input channels (sora_jax/training/objectives/wan_i2v.py); Wan 2.1 I2V (model.wan.image_dim >
  0) adds CLIP image tokens (`wan_clip`), Wan 2.2 I2V-A14B (model.wan.image_condition) does not."""
  return config.model.family == 'wan' and (
      wan_clip(config) or bool(config.model.wan.get('image_condition', False)))


def wan_clip(config) -> bool:
  """A Wan 2.1 image-to-video run: CLIP image tokens in cross-attention (config.image_encoder)."""
  return config.model.family == 'wan' and int(config.model.wan.get('image_dim', 0) or 0) > 0


def wan_ti2v(config) -> bool:
  """A Wan 2.2 TI2V run: given frames (config.condition.mix) ride on a per-frame timestep of 0, the
  model's only signal of them (model.wan.expand_timesteps)."""
  return config.model.family == 'wan' and bool(config.model.wan.get('expand_timesteps', False))


def wan_expert(config) -> str:
  """The Wan 2.2 A14B expert a run trains ('high_noise' / 'low_noise'), '' for other runs."""
  if config.model.family != 'wan':
    return ''
  return str(config.model.wan.get('expert', '') or '')


def wan_kwargs(config, channels: int) -> dict:
  """diffusers WanTransformer3DModel config fields from a sora_jax config. Image-to-video: the
  input is the noisy latents, the 4-channel frame mask and the first frame's latents (2C + 4)."""
  w = config.model.wan
  i2v = {}
  if wan_i2v(config):
    i2v = dict(in_channels=2 * channels + wan.I2V_MASK_CHANNELS)
  if wan_clip(config):
    i2v.update(image_dim=int(w.image_dim),
               added_kv_proj_dim=w.num_attention_heads * w.attention_head_dim)
  return dict(dict(patch_size=tuple(config.model.patch_size),
                   num_attention_heads=w.num_attention_heads,
                   attention_head_dim=w.attention_head_dim, in_channels=channels,
                   out_channels=channels, text_dim=text_width(config), freq_dim=w.freq_dim,
                   ffn_dim=w.ffn_dim, num_layers=w.num_layers, cross_attn_norm=w.cross_attn_norm,
                   eps=w.eps, rope_max_seq_len=w.rope_max_seq_len), **i2v)


def vae_kwargs(v) -> dict:
  return dict(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=tuple(v.dim_mult),
              num_res_blocks=v.num_res_blocks, attn_scales=tuple(v.attn_scales),
              temperal_downsample=tuple(bool(x) for x in v.temperal_downsample),
              dropout=v.dropout, latents_mean=None, latents_std=None)

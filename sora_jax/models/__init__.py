"""Model families. `build(config, rngs)` gives the trainable text-to-video model."""

import jax.numpy as jnp
from flax import nnx

from sora_jax.diffusion import flow
from sora_jax.models import dit, text

# Parameters are created unsharded (or abstractly) and placed by `jax.jit(out_shardings=...)` from
# their logical-axis metadata (sora_jax/sharding.py), so models also build outside a mesh context.
nnx.use_eager_sharding(False)


class TextToVideo(nnx.Module):
  """Byte text encoder + video DiT, trained jointly. A frozen encoder would live outside the params.

  Returns the flow velocity at (x_t, t) whatever the DiT predicts: 'velocity' directly, or 'x0' (the
  clean clip), converted by `flow.velocity_from_x0`.
  """

  def __init__(self, text_encoder, dit_model, prediction: str = 'velocity'):
    self.text_encoder = text_encoder
    self.dit = dit_model
    self.prediction = prediction

  def __call__(self, x_t, t, tokens, mask):
    context, context_mask = self.text_encoder(tokens, mask)
    out = self.dit(x_t, t, context, context_mask)
    return flow.velocity_from_x0(out, x_t, t) if self.prediction == 'x0' else out

  def packed(self, x_t, positions, segment_ids, t, tokens, mask):
    """Packed sequences (see dit.VideoDiT.packed): x_t [B, N, patch_dim] noisy patch tokens, positions
    [B, N, 3], segment_ids [B, N], t [B, S], caption tokens / mask [B, S, L] -> velocity per token.

    The text encoder runs once over all B*S captions.
    """
    b, s, length = tokens.shape
    context, context_mask = self.text_encoder(tokens.reshape(b * s, length),
                                              mask.reshape(b * s, length))
    out = self.dit.packed(x_t, positions, segment_ids, t, context.reshape(b, s, length, -1),
                          context_mask.reshape(b, s, length))
    if self.prediction == 'x0':
      return flow.velocity_from_x0(out, x_t, dit.per_token(t, dit.segment_index(segment_ids)))
    return out


def build(config, rngs: nnx.Rngs, channels: int = 3) -> TextToVideo:
  dtype = jnp.dtype(config.model.dtype)
  encoder = text.ByteTextEncoder(
      max_length=config.text.max_length, width=config.text.width, depth=config.text.depth,
      num_heads=config.text.num_heads,
      word_buckets=config.text.word_buckets, rngs=rngs, dtype=dtype)
  m = config.model
  video_model = dit.VideoDiT(
      channels=channels, patch_size=tuple(m.patch_size), width=m.width, depth=m.depth,
      num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, context_width=config.text.width,
      rope_theta=m.rope_theta, scan_layers=m.scan_layers, remat=m.remat, dtype=dtype, rngs=rngs)
  return TextToVideo(encoder, video_model, config.diffusion.prediction)

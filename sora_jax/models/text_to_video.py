"""The trainable text-to-video model: a text encoder and a video transformer (DiT or Wan), returning
the flow velocity whatever the transformer predicts."""

from flax import nnx

from sora_jax.diffusion import flow
from sora_jax.models import dit


class TextToVideo(nnx.Module):
  """Text encoder + video DiT. The byte encoder trains jointly; a frozen pretrained encoder (UMT5) runs
  outside the params (sora_jax/inference/frozen.py), and then `text_encoder` is None and the caption inputs
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
    """given [B, T]: the given-frame mask of a conditioned model (sora_jax/diffusion/given_frames.py);
    lowres [B, T, H, W, C]: an upscaler's upsampled low-resolution input (sora_jax/diffusion/cascade.py);
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

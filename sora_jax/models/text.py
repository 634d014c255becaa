"""Byte-level text encoder, trained jointly with the DiT (no download needed).

The text interface every encoder follows (a frozen UMT5/T5 will too):
  tokenize(captions, max_length) -> (tokens int32 [B, L], mask bool [B, L])   (host side, numpy)
  encoder(tokens, mask) -> (embeddings [B, L, D], mask [B, L])                 (in the jitted step)
The empty caption is the unconditional input for classifier-free guidance; it still holds BOS/EOS, so
cross-attention always has a valid key.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import layers

PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(captions, max_length: int):
  tokens = np.full((len(captions), max_length), PAD, np.int32)
  for i, caption in enumerate(captions):
    ids = [BOS] + [b + BYTE_OFFSET for b in caption.encode('utf-8')][:max_length - 2] + [EOS]
    tokens[i, :len(ids)] = ids
  return tokens, tokens != PAD


class EncoderBlock(nnx.Module):

  def __init__(self, width, num_heads, *, rngs, dtype):
    self.norm1 = layers.layer_norm(width, affine=True, rngs=rngs, dtype=dtype)
    self.attn = layers.Attention(width, num_heads, rngs=rngs, dtype=dtype)
    self.norm2 = layers.layer_norm(width, affine=True, rngs=rngs, dtype=dtype)
    self.mlp = layers.Mlp(width, 4 * width, rngs=rngs, dtype=dtype)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=layers.padding_mask(mask))
    return x + self.mlp(self.norm2(x))


class ByteTextEncoder(nnx.Module):

  def __init__(self, *, max_length, width, depth, num_heads, rngs, dtype=jnp.float32):
    embed_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ('vocab', 'embed'))
    self.embed = nnx.Embed(VOCAB_SIZE, width, embedding_init=embed_init, dtype=dtype, rngs=rngs)
    self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_length, width)),
                              out_sharding=(None, 'embed'))
    self.blocks = nnx.List(
        [EncoderBlock(width, num_heads, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = layers.layer_norm(width, affine=True, rngs=rngs, dtype=dtype)

  def __call__(self, tokens, mask):
    x = self.embed(tokens) + self.position[None, :tokens.shape[1]].astype(self.embed.dtype)
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x), mask

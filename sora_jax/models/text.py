"""Byte-level text encoder, trained jointly with the DiT (no download needed).

The text interface every encoder follows (a frozen UMT5/T5 will too):
  tokenize(captions, max_length) -> (tokens int32 [B, L], mask bool [B, L])   (host side, numpy)
  encoder(tokens, mask) -> (embeddings [B, L, D], mask [B, L])                 (in the jitted step)
The empty caption is the unconditional input for classifier-free guidance; it still holds BOS/EOS, so
cross-attention always has a valid key.

Each byte also gets a hashed embedding of the word it belongs to (fastText-style, computed in-graph from
the bytes). Why: a word's identity is then a distinct vector from step 0; from bytes alone the encoder
must first learn to spell, and words whose effect on the video is only second-order (a motion direction
changes frame-to-frame correlations, not the mean frame) never bootstrap that in a short run.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.common import tokenizers
from sora_jax.models import layers

_SPACE = ord(' ') + tokenizers.BYTE_OFFSET


def word_hashes(tokens, num_buckets: int):
  """[B, L] byte tokens -> [B, L] bucket of the (space-delimited) word holding each byte; -1 elsewhere.

  FNV-1a over the word's bytes: a forward scan hashes each word's prefix, a backward scan copies the
  whole-word hash (found at the word's last byte) onto every byte of the word.
  """
  is_char = (tokens >= tokenizers.BYTE_OFFSET) & (tokens != _SPACE)

  def prefix(h, x):
    tok, ch = x
    h = jnp.where(ch, (h ^ tok.astype(jnp.uint32)) * jnp.uint32(16777619), jnp.uint32(2166136261))
    return h, h

  init = jnp.full(tokens.shape[:1], 2166136261, jnp.uint32)
  _, h = jax.lax.scan(prefix, init, (tokens.T, is_char.T))  # [L, B]
  next_is_char = jnp.concatenate([is_char.T[1:], jnp.zeros_like(is_char.T[:1])], axis=0)

  def spread(word, x):
    h, ch, next_ch = x
    word = jnp.where(ch & ~next_ch, h, word)  # last byte of a word: its hash is complete
    return word, word

  _, word = jax.lax.scan(spread, init, (h, is_char.T, next_is_char), reverse=True)
  return jnp.where(is_char, (word.T % jnp.uint32(num_buckets)).astype(jnp.int32), -1)


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

  def __init__(self, *, max_length, width, depth, num_heads, word_buckets=0, rngs,
               dtype=jnp.float32):
    embed_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ('vocab', 'embed'))
    self.embed = nnx.Embed(tokenizers.VOCAB_SIZE, width, embedding_init=embed_init, dtype=dtype, rngs=rngs)
    self.word_buckets = word_buckets
    if word_buckets:
      self.word_embed = nnx.Embed(word_buckets, width, embedding_init=embed_init, dtype=dtype,
                                  rngs=rngs)
    self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (max_length, width)),
                              out_sharding=(None, 'embed'))
    self.blocks = nnx.List(
        [EncoderBlock(width, num_heads, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = layers.layer_norm(width, affine=True, rngs=rngs, dtype=dtype)

  def __call__(self, tokens, mask):
    x = self.embed(tokens) + self.position[None, :tokens.shape[1]].astype(self.embed.dtype)
    if self.word_buckets:
      words = word_hashes(tokens, self.word_buckets)
      x = x + jnp.where(words[..., None] >= 0, self.word_embed(jnp.maximum(words, 0)), 0)
    for block in self.blocks:
      x = block(x, mask)
    return self.norm(x), mask

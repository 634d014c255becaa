"""UMT5 / T5 text encoder (the frozen text encoder of Wan 2.x) and its sentencepiece tokenizer.

Reproduces transformers' `UMT5EncoderModel` / `T5EncoderModel` forward pass (`last_hidden_state`):
  token embedding -> N x [RMS norm -> self-attention with a bucketed relative-position bias ->
  residual -> RMS norm -> (gated) FFN -> residual] -> final RMS norm.
T5 conventions kept: no 1/sqrt(d) attention scaling (it is folded into the weights), RMS "layer norm"
without mean or bias, bidirectional relative-position buckets. UMT5 learns a bias table in every layer;
T5 / mT5 learn one in layer 0 that every layer reuses (`bias_per_layer=False`).
Weights come from Hugging Face checkpoints: sora_jax/interop/umt5.py.

Precision: matmuls run in `dtype` (bf16 for umt5-xxl), while the residual stream, norm statistics,
attention logits and softmax stay float32 (why: the stream of a 24-layer T5 grows large, and float32
there costs little and keeps bf16 outputs close to the float32 reference).

Tokenizer interface (the one sora_jax/models/text.py defines):
  UMT5Tokenizer(path).tokenize(captions, max_length) -> (ids int32 [B, L], mask bool [B, L])
  UMT5TextEncoder(encoder)(tokens, mask) -> (embeddings [B, L, D] zero at padding, mask)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.parallel import sharding

# transformers' ACT2FN names that T5-family configs use.
ACTIVATIONS = {
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
  """Encoder hyper-parameters, named as in Hugging Face's config.json."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  num_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = 'gated-gelu'
  layer_norm_epsilon: float = 1e-6
  bias_per_layer: bool = True  # UMT5: a bias table per layer; T5 / mT5: layer 0's, shared.

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_heads', 'num_layers',
                 'relative_attention_max_distance'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'UMT5Config.{name}={getattr(self, name)!r} must be a positive integer.')
    if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
      raise ValueError(f'UMT5Config.relative_attention_num_buckets='
                       f'{self.relative_attention_num_buckets} must be even and >= 4 (half per '
                       'direction, half of those exact offsets).')
    self.activation  # validates feed_forward_proj

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith('gated-')

  @property
  def activation(self) -> str:
    """transformers' rule: 'gated-gelu' means tanh GELU ('gelu_new'); otherwise the name after
    'gated-' (or the whole name) is the activation."""
    parts = self.feed_forward_proj.split('-')
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'gated'):
      raise ValueError(f'feed_forward_proj={self.feed_forward_proj!r}: expected "ACT" or '
                       '"gated-ACT", e.g. "gated-gelu" or "relu".')
    act = 'gelu_new' if self.feed_forward_proj == 'gated-gelu' else parts[-1]
    if act not in ACTIVATIONS:
      raise ValueError(f'feed_forward_proj={self.feed_forward_proj!r}: activation {act!r} is not '
                       f'supported (known: {sorted(ACTIVATIONS)}).')
    return act


def relative_position_buckets(query_length, key_length, num_buckets, max_distance):
  """Bidirectional T5 bucket of every (query, key) offset -> int32 [Lq, Lk] (host side, static).

  Half the buckets per direction (key after query: upper half); of those, half are exact offsets and
  half log-spaced up to `max_distance`, beyond which offsets share the last bucket. Same float32
  arithmetic as transformers (`_relative_position_bucket`), so boundary offsets round the same way.
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  num_buckets //= 2
  buckets = (rel > 0).astype(np.int64) * num_buckets
  rel = np.abs(rel)
  max_exact = num_buckets // 2
  # max(rel, 1): offsets below max_exact take the exact branch; this only avoids log(0).
  log_ratio = (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
               / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
  large = np.minimum(max_exact + log_ratio.astype(np.int64), num_buckets - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


def _dense(din, dout, axes, *, rngs, dtype, param_dtype):
  """Bias-free linear layer (T5 has no biases) with logical axis names (in, out) on its kernel."""
  return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes))


class RMSNorm(nnx.Module):
  """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale; no mean subtraction, no bias; float32."""

  def __init__(self, dim, eps):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * self.scale.astype(jnp.float32)


def position_bias(table, buckets):
  """Bias table [num_buckets, heads] and buckets [Lq, Lk] -> float32 bias [heads, Lq, Lk]."""
  return jnp.transpose(table[...].astype(jnp.float32)[buckets], (2, 0, 1))


class UMT5Block(nnx.Module):

  def __init__(self, config: UMT5Config, *, rngs, dtype, param_dtype):
    c = config
    self.num_heads, self.d_kv, self.dtype = c.num_heads, c.d_kv, dtype
    self.gated, self.activation = c.gated, c.activation
    inner = c.num_heads * c.d_kv
    dense = lambda din, dout, axes: _dense(din, dout, axes, rngs=rngs, dtype=dtype,
                                           param_dtype=param_dtype)
    self.attn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
    self.q = dense(c.d_model, inner, ('embed', 'heads'))
    self.k = dense(c.d_model, inner, ('embed', 'heads'))
    self.v = dense(c.d_model, inner, ('embed', 'heads'))
    self.o = dense(inner, c.d_model, ('heads', 'embed'))
    if c.bias_per_layer:
      self.relative_bias = nnx.Param(
          nnx.initializers.normal(1.0)(rngs.params(), (c.relative_attention_num_buckets, c.num_heads)))
    self.ffn_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)
    if c.gated:
      self.wi_0 = dense(c.d_model, c.d_ff, ('embed', 'mlp'))
      self.wi_1 = dense(c.d_model, c.d_ff, ('embed', 'mlp'))
    else:
      self.wi = dense(c.d_model, c.d_ff, ('embed', 'mlp'))
    self.wo = dense(c.d_ff, c.d_model, ('mlp', 'embed'))

  def __call__(self, x, mask, buckets, bias=None):
    """x float32 [B, L, D]; mask bool [B, L] (valid keys); buckets [L, L]; bias [H, L, L] when the
    bias is shared (T5), else this layer's own table is used."""
    if bias is None:
      bias = position_bias(self.relative_bias, buckets)
    b, n, _ = x.shape
    h = self.attn_norm(x).astype(self.dtype)
    heads = lambda y: y.reshape(b, n, self.num_heads, self.d_kv)
    q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
    q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
    # No 1/sqrt(d_kv) scaling (T5); logits and softmax in float32. Padded keys get the float32 minimum
    # (transformers' sdpa path), so an all-padding row degrades to a uniform average, never NaN.
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) + bias[None]
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, -1)
    x = x + self.o(out).astype(jnp.float32)

    h = self.ffn_norm(x).astype(self.dtype)
    act = ACTIVATIONS[self.activation]
    h = act(self.wi_0(h)) * self.wi_1(h) if self.gated else act(self.wi(h))
    h = sharding.constrain(h, ('batch', 'length', 'act_mlp'))
    return x + self.wo(h).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
  """`UMT5EncoderModel` / `T5EncoderModel`: (ids [B, L], mask [B, L]) -> last_hidden_state [B, L, D].

  Padded positions get outputs too (as in transformers); they attend to the real tokens but no real
  token attends to them, so the real positions' outputs do not depend on the padding.
  """

  def __init__(self, config: UMT5Config, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               scan_layers=True):
    self.config, self.scan_layers = config, scan_layers
    c = config
    self.embed = nnx.Embed(
        c.vocab_size, c.d_model, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ('vocab', 'embed')))
    if not c.bias_per_layer:
      self.relative_bias = nnx.Param(
          nnx.initializers.normal(1.0)(rngs.params(), (c.relative_attention_num_buckets, c.num_heads)))

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return UMT5Block(c, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

  def __call__(self, tokens, mask):
    """tokens int [B, L], mask [B, L] (nonzero = real token) -> float32 [B, L, D]."""
    c = self.config
    mask = mask.astype(bool)
    length = tokens.shape[1]
    buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                        c.relative_attention_max_distance)
    bias = None if c.bias_per_layer else position_bias(self.relative_bias, buckets)
    x = sharding.constrain(self.embed(tokens).astype(jnp.float32), ('batch', 'length', 'act_embed'))
    graphdef, params = nnx.split(self.blocks)

    def body(x, block_params):
      return nnx.merge(graphdef, block_params)(x, mask, buckets, bias), None

    if self.scan_layers:
      x, _ = jax.lax.scan(body, x, params)
    else:
      for i in range(c.num_layers):
        x, _ = body(x, jax.tree.map(lambda p: p[i], params))
    return self.final_norm(x)


class UMT5TextEncoder(nnx.Module):
  """The text-encoder interface of sora_jax/models/text.py around a (frozen) UMT5Encoder:
  (tokens [B, L], mask [B, L]) -> (embeddings [B, L, D], mask), padded positions zeroed (as the Wan
  pipeline does before padding its prompts to 512 tokens)."""

  def __init__(self, encoder: UMT5Encoder):
    self.encoder = encoder
    self.width = encoder.config.d_model

  def __call__(self, tokens, mask):
    mask = mask.astype(bool)
    return jnp.where(mask[..., None], self.encoder(tokens, mask), 0.0), mask


# ---------------------------------------------------------------------------------- tokenizer



"""Shared building blocks: sharded linear layers and multi-head attention with QK-norm."""

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.models import rope


def linear(din, dout, axes, *, rngs, dtype=jnp.float32, zero=False, bias=True):
  """nnx.Linear whose kernel carries logical axis names `axes` (in, out)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
      kernel_init=nnx.with_partitioning(init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]))


class Attention(nnx.Module):
  """Multi-head attention with RMS QK-normalisation; self-attention gets 3D RoPE."""

  def __init__(self, width, num_heads, *, rngs, dtype=jnp.float32, context_width=None):
    self.num_heads, self.head_dim = num_heads, width // num_heads
    self.q = linear(width, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.kv = linear(context_width or width, 2 * width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.out = linear(width, width, ('heads', 'embed'), rngs=rngs, dtype=dtype)
    self.q_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, rngs=rngs)
    self.k_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, context=None, *, mask=None, rope_cs=None):
    context = x if context is None else context
    b, n, _ = x.shape
    heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, self.head_dim)
    q = self.q_norm(heads(self.q(x)))
    k, v = jnp.split(self.kv(context), 2, axis=-1)
    k, v = self.k_norm(heads(k)), heads(v)
    if rope_cs is not None:
      q, k = rope.apply(q, *rope_cs), rope.apply(k, *rope_cs)
    q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
    out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), mask=mask)
    return self.out(out.reshape(b, n, -1))


class Mlp(nnx.Module):

  def __init__(self, width, hidden, *, rngs, dtype=jnp.float32):
    self.up = linear(width, hidden, ('embed', 'mlp'), rngs=rngs, dtype=dtype)
    self.down = linear(hidden, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    h = jax.nn.gelu(self.up(x), approximate=True)
    return self.down(sharding.constrain(h, ('batch', 'length', 'act_mlp')))


def layer_norm(width, *, rngs, affine=False, dtype=jnp.float32):
  return nnx.LayerNorm(width, epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def padding_mask(mask):
  """[B, L] key validity -> [B, 1, 1, L] attention mask."""
  return mask[:, None, None, :].astype(bool)

"""Shared building blocks: sharded linear layers and multi-head attention with QK-norm."""

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.config import schema
from sora_jax.models import rope
from sora_jax.parallel import attention, sharding


def linear(din, dout, axes, *, rngs, dtype=jnp.float32, zero=False, bias=True, fan_out=None):
  """nnx.Linear whose kernel carries logical axis names `axes` (in, out). fan_out: draw the kernel
  with the Xavier scale of a [din, fan_out] one (a slice of a fused projection keeps its init)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
  if fan_out is not None and not zero:  # xavier: uniform, variance 2 / (fan_in + fan_out)
    init = nnx.initializers.variance_scaling((din + dout) / (din + fan_out), 'fan_avg', 'uniform')
  return nnx.Linear(
      din, dout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
      kernel_init=nnx.with_partitioning(init, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]))


class Attention(nnx.Module):
  """Multi-head attention with RMS QK-normalisation; self-attention gets 3D RoPE.

  impl: the attention backend (attention.IMPLS) of self-attention; cross-attention to the (short)
  context runs `attention.cross_attention_impl(impl)`. context_parallel: None, 'ring' or
  'all_to_all': how self-attention runs when the mesh shards the sequence ('context' axis > 1);
  cross-attention then attends each query shard to the whole context, without communication.
  """

  def __init__(self, width, num_heads, *, rngs, dtype=jnp.float32, context_width=None,
               impl='auto', context_parallel=None):
    if impl not in schema.ATTENTION_IMPLS:
      raise ValueError(f'attention impl={impl!r}: expected one of {schema.ATTENTION_IMPLS}')
    if context_parallel not in attention.CONTEXT_PARALLEL:
      raise ValueError(f'context_parallel={context_parallel!r}: expected one of '
                       f'{attention.CONTEXT_PARALLEL}')
    self.num_heads, self.head_dim = num_heads, width // num_heads
    self.impl, self.context_parallel = impl, context_parallel
    self.q = linear(width, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    # Separate K and V kernels: a fused [in, 2 * width] one split in half would put K and V on
    # different tensor shards once 'heads' is sharded, and each head needs both. They keep the fused
    # kernel's init scale (Xavier over 2 * width outputs): at the separate kernels' own, 1.22x
    # larger, the demo trained worse (judged all-correct 0.70 -> 0.52 seen, 0.71 -> 0.42 held-out;
    # docs/results.md).
    kv = dict(rngs=rngs, dtype=dtype, fan_out=2 * width)
    self.k = linear(context_width or width, width, ('embed', 'heads'), **kv)
    self.v = linear(context_width or width, width, ('embed', 'heads'), **kv)
    self.out = linear(width, width, ('heads', 'embed'), rngs=rngs, dtype=dtype)
    self.q_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, rngs=rngs)
    self.k_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, context=None, *, mask=None, segment_ids=None, kv_segment_ids=None,
               rope_cs=None):
    """mask: boolean, broadcastable to [B, heads, N, keys]; segment_ids [B, N] / kv_segment_ids
    [B, keys]: attend within equal ids (packed sequences)."""
    self_attention = context is None
    context = x if context is None else context
    b, n, _ = x.shape
    heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, self.head_dim)
    q = self.q_norm(heads(self.q(x)))
    k, v = self.k_norm(heads(self.k(context))), heads(self.v(context))
    if rope_cs is not None:
      q, k = rope.apply(q, *rope_cs), rope.apply(k, *rope_cs)
    q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
    out = attention.attention(
        q, k, v, mask=mask, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
        impl=self.impl if self_attention else attention.cross_attention_impl(self.impl),
        context_parallel=self.context_parallel, kv_sharded=self_attention)
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

"""Multi-head attention behind one function: backends chosen by name, context (sequence) parallelism.

`attention(q, k, v, ...)` on [B, L, heads, head_dim] inputs. Backends (`impl`):
  'xla'      jax.nn.dot_product_attention(implementation='xla'): materialises the [B, heads, Lq, Lk]
             scores (quadratic memory), the fastest on CPU and for short sequences.
  'cudnn'    jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention, GPU only,
             bf16/fp16 only. A mask or segment ids become a dense additive bias (quadratic again).
  'splash'   Pallas TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), TPU
             only: flash attention with segment ids; no dense mask. Any length: q, k, v are padded
             to a multiple of 128, padded keys get a segment id no real query has, and the padded
             query rows are sliced off. A Mosaic kernel cannot be partitioned by XLA, so under a
             mesh it runs in a `jax.shard_map` over the batch and heads axes (or, inside the
             context-parallel shard_map, as its local kernel).
  'chunked'  pure JAX flash attention: online softmax over key/value blocks (`jax.lax.scan`) for each
             query block, with a hand-written blockwise backward pass (`jax.custom_vjp`) that keeps
             only the output and the row log-sum-exp, so forward and backward both use
             O(L * block) memory. Exact up to float summation order; any backend, any dtype.
  'auto'     cudnn on a GPU (bf16/fp16, head_dim % 8 == 0 and <= 128, no mask/segment ids); splash
             on a TPU (no dense mask, head_dim a multiple of 128); else 'xla' while the score
             matrix has at most AUTO_XLA_MAX_SCORES entries per (batch, head), i.e. up to
             2048 x 2048 (16 MiB of float32 scores per head), and 'chunked' beyond. The platform
             is that of the devices of the mesh being traced for (`jax.set_mesh`), so a program
             compiled ahead of time for a TPU topology from a CPU host picks the TPU's kernels;
             without a mesh, jax.default_backend().

Masking: `mask` is a boolean array broadcastable to [B, heads, Lq, Lk] (True = attend);
`segment_ids` [B, Lq] / `kv_segment_ids` [B, Lk] (packed sequences: a query attends to the keys of
its own segment; kv_segment_ids defaults to segment_ids). A query row with every key masked gets the
XLA backend's answer in every backend but splash: masked scores are filled with -0.7 * float32 max
rather than -inf, so such a row averages all values uniformly instead of producing NaN.

Context parallelism (`context_parallel`), active inside a mesh (`jax.set_mesh`) whose 'length'
axes (sharding.RULES: 'context') have more than one device; a no-op otherwise:
  'ring'        ring attention: each device keeps its query block while the key/value blocks (and
                their segment ids) travel around the ring with `jax.lax.ppermute`; partial results
                are merged by their log-sum-exp. Each step runs the 'chunked' kernel (it needs the
                log-sum-exp), whatever `impl` says. Memory per device O(L / n * block).
  'all_to_all'  DeepSpeed-Ulysses: an all-to-all turns the sequence-sharded q, k, v into
                head-sharded ones (full sequence, heads / n heads), `impl` attends locally, and an
                all-to-all turns the output back. Needs the (per tensor shard) heads divisible by n.
Both run under `jax.shard_map` over every mesh axis; batch and heads keep their 'batch' /
'act_heads' sharding (axes that do not divide the dimension are replicated instead).
Cross-attention (kv_sharded=False: short text keys replicated over the context axis) needs no
communication: each device attends its query shard to all keys.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sora_jax.config import schema
from sora_jax.parallel import sharding

CONTEXT_PARALLEL = (None, 'ring', 'all_to_all')
# 'auto' keeps XLA's materialised scores up to this many per (batch, head): 2048 x 2048.
AUTO_XLA_MAX_SCORES = 2048 * 2048
# jax.nn.dot_product_attention's (and splash's) fill for masked scores: finite, so a fully masked
# row is a uniform average rather than NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def attention(q, k, v, *, mask=None, segment_ids=None, kv_segment_ids=None, impl='auto',
              context_parallel=None, kv_sharded=True, scale=None, block_q=512, block_kv=512):
  """softmax(q k^T * scale + masking) v for q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D].

  mask: boolean, broadcastable to [B, H, Lq, Lk]. segment_ids [B, Lq], kv_segment_ids [B, Lk]
  (integers; default: segment_ids, for self-attention). impl: one of IMPLS (None: 'xla', as in
  jax.nn.dot_product_attention). context_parallel: None, 'ring' or 'all_to_all' (see the module
  docstring). kv_sharded: False for cross-attention, whose keys/values are replicated over the
  context axis. scale: default 1 / sqrt(D). block_q / block_kv: the 'chunked' kernel's tile sizes.
  """
  impl = 'xla' if impl is None else impl
  if impl not in schema.ATTENTION_IMPLS:
    raise ValueError(f'attention impl={impl!r}: expected one of {schema.ATTENTION_IMPLS}')
  if context_parallel not in CONTEXT_PARALLEL:
    raise ValueError(f'context_parallel={context_parallel!r}: expected one of {CONTEXT_PARALLEL}')
  mask, segment_ids, kv_segment_ids = _check_inputs(q, k, v, mask, segment_ids, kv_segment_ids)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  local = functools.partial(_local, impl=impl, scale=scale, block_q=block_q, block_kv=block_kv)
  axes = _context_axes() if context_parallel else ()
  if not axes:
    return local(q, k, v, mask, segment_ids, kv_segment_ids)
  # The splash kernel (the local kernel of all-to-all and of cross-attention) cannot declare how
  # its outputs vary over the mesh axes: its shard_map runs unchecked.
  local_impl = select_impl(q, k, dense_mask=mask is not None) if impl == 'auto' else impl
  ring_self = context_parallel == 'ring' and kv_sharded
  return _context_parallel(q, k, v, mask, segment_ids, kv_segment_ids, axes=axes,
                           strategy=context_parallel, kv_sharded=kv_sharded, local=local,
                           scale=scale, block_q=block_q, block_kv=block_kv,
                           check_vma=ring_self or local_impl != 'splash')


def select_impl(q, k, *, dense_mask=False, segments=False) -> str:
  """The backend 'auto' runs for these (local) shapes on the platform being traced for."""
  platform = target_platform()
  lq, lk, d = q.shape[1], k.shape[1], q.shape[-1]
  if (platform == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128
      and not dense_mask and not segments):
    return 'cudnn'
  # Splash pads any length to its blocks. It also compiles for head_dim 64 or 192 (v5p, forward
  # and backward), but only a multiple of the 128 lanes fills its tiles; unmeasured otherwise.
  if platform == 'tpu' and not dense_mask and d % 128 == 0:
    return 'splash'
  return 'xla' if lq * lk <= AUTO_XLA_MAX_SCORES else 'chunked'


def target_platform() -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the ambient mesh's devices (`jax.set_mesh`, also
  inside jit and shard_map, and for a TPU topology compiled from a CPU host), else the default
  backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  platform = jax.default_backend() if device is None else device.platform
  return 'gpu' if platform in ('cuda', 'rocm') else platform


def cross_attention_impl(impl):
  """The backend for cross-attention to a short caption when self-attention runs `impl`: fused
  kernels (cudnn, splash) take no dense mask (and cudnn has shape constraints), which caption
  padding masks and text lengths often need or miss, so those become 'auto' (which picks them
  where they fit)."""
  return 'auto' if impl in ('cudnn', 'splash') else impl


def _check_inputs(q, k, v, mask, segment_ids, kv_segment_ids):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f'attention takes q, k, v of shape [B, L, heads, head_dim]; got {q.shape}, '
                     f'{k.shape}, {v.shape}')
  if k.shape != v.shape:
    raise ValueError(f'k {k.shape} and v {v.shape} must have the same shape')
  if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
    raise ValueError(f'q {q.shape} and k {k.shape} must agree on batch, heads and head_dim')
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.ndim > 4:
      raise ValueError(f'mask must broadcast to [B, H, Lq, Lk] = {(b, h, lq, lk)}, got {mask.shape}')
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if any(m not in (1, n) for m, n in zip(mask.shape, (b, h, lq, lk))):
      raise ValueError(f'mask must broadcast to [B, H, Lq, Lk] = {(b, h, lq, lk)}, got {mask.shape}')
    mask = mask.astype(bool)
  if segment_ids is None and kv_segment_ids is not None:
    raise ValueError('kv_segment_ids given without segment_ids (the queries\' segments)')
  if segment_ids is not None:
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    if segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
      raise ValueError(f'segment_ids must be [B, Lq] = {(b, lq)} and kv_segment_ids [B, Lk] = '
                       f'{(b, lk)}; got {segment_ids.shape} and {kv_segment_ids.shape}')
    segment_ids = segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
  return mask, segment_ids, kv_segment_ids


def _combined_mask(mask, segment_ids, kv_segment_ids):
  """Dense boolean mask [B or 1, H or 1, Lq or 1, Lk or 1] from a mask and segment ids."""
  if segment_ids is None:
    return mask
  same = (segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
  return same if mask is None else mask & same


def _local(q, k, v, mask, segment_ids, kv_segment_ids, *, impl, scale, block_q, block_kv):
  """Attention of whole (or this device's) arrays with one backend."""
  if impl == 'auto':
    impl = select_impl(q, k, dense_mask=mask is not None, segments=segment_ids is not None)
  if impl == 'chunked':
    return chunked_attention(q, k, v, mask, segment_ids, kv_segment_ids, scale=scale,
                             block_q=block_q, block_kv=block_kv)
  if impl == 'splash':
    return _splash(q, k, v, mask, segment_ids, kv_segment_ids, scale=scale)
  if impl == 'cudnn' and target_platform() != 'gpu':
    raise ValueError(
        f"attention impl='cudnn' (cuDNN flash attention) needs a GPU; the target platform (the "
        f"mesh's devices, else the default backend) is {target_platform()!r}. Use 'xla', "
        f"'chunked' or 'auto'.")
  return jax.nn.dot_product_attention(
      q, k, v, mask=_combined_mask(mask, segment_ids, kv_segment_ids), scale=scale,
      implementation=impl)


# ---------------------------------------------------------------------------------------------
# 'chunked': flash attention in pure JAX.


def chunked_attention(q, k, v, mask=None, segment_ids=None, kv_segment_ids=None, *, scale=None,
                      block_q=512, block_kv=512):
  """The 'chunked' backend on its own: -> out [B, Lq, H, D] in q's dtype."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  out, _, _ = _chunked(q, k, v, mask, segment_ids, kv_segment_ids, scale, block_q, block_kv)
  return out.astype(q.dtype)


def _chunked(q, k, v, mask, segment_ids, kv_segment_ids, scale, block_q, block_kv):
  """-> out [B, Lq, H, D] float32 and each query row's log-sum-exp of its (masked, scaled) scores
  as m + r (both [B, H, Lq] float32): m the row maximum (a constant shift, no gradient), r =
  log(sum(exp(s - m))) (gradient: the softmax). Kept apart because a fully masked row has
  m = MASK_VALUE ~ -2.4e38, beside which log(L) vanishes in float32. Lengths need not divide the
  blocks (padded)."""
  lq, lk = q.shape[1], k.shape[1]
  bq, bk = min(block_q, lq), min(block_kv, lk)
  pq, pk = -lq % bq, -lk % bk

  def pad(x, axis, n):
    if x is None or n == 0 or x.shape[axis] == 1:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n)
    return jnp.pad(x, widths)

  q, segment_ids = pad(q, 1, pq), pad(segment_ids, 1, pq)
  k, v, kv_segment_ids = pad(k, 1, pk), pad(v, 1, pk), pad(kv_segment_ids, 1, pk)
  mask = pad(pad(mask, 2, pq), 3, pk)
  out, m, r = _flash(q, k, v, mask, segment_ids, kv_segment_ids, scale, bq, bk, lk)
  return out[:, :lq], m[:, :, :lq], r[:, :, :lq]


def _block(x, i, size, axis):
  """Block i of `size` along `axis`; a broadcast (size-1) axis is left alone."""
  if x is None or x.shape[axis] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis)


def _scores(qb, kb, maskb, qseg, kseg, key_ok, scale):
  """Masked scores [B, H, bq, bk] float32 of a q block and a k block, and the validity mask."""
  s = jnp.einsum('bqhd,bkhd->bhqk', qb, kb, preferred_element_type=jnp.float32) * scale
  valid = maskb
  if qseg is not None:
    same = (qseg[:, :, None] == kseg[:, None, :])[:, None]
    valid = same if valid is None else valid & same
  if valid is not None:
    s = jnp.where(valid, s, MASK_VALUE)
  if key_ok is not None:  # keys that only pad the last block: excluded outright
    s = jnp.where(key_ok[None, None, None, :], s, -jnp.inf)
  return s, valid


def _key_ok(j, bk, kv_len, padded_len):
  if kv_len == padded_len:
    return None
  return j * bk + jnp.arange(bk) < kv_len


def _loop(body, init, n):
  """jax.lax.scan over block indices 0..n-1; a single block runs without a loop (smaller
  programs: local blocks in the ring are often one block)."""
  if n == 1:
    carry, y = body(init, jnp.int32(0))
    return carry, jax.tree.map(lambda x: x[None], y)
  return jax.lax.scan(body, init, jnp.arange(n))


def _bqh(x):
  """[B, H, q] -> [B, q, H, 1], to scale [B, q, H, D] rows."""
  return jnp.swapaxes(x, 1, 2)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, mask, qseg, kseg, scale, bq, bk, kv_len):
  return _flash_forward(q, k, v, mask, qseg, kseg, scale, bq, bk, kv_len)


def _flash_forward(q, k, v, mask, qseg, kseg, scale, bq, bk, kv_len):
  b, lq, h, d = q.shape
  nq, nk = lq // bq, k.shape[1] // bk

  def q_block(_, i):
    qb, qsb, mq = _block(q, i, bq, 1), _block(qseg, i, bq, 1), _block(mask, i, bq, 2)

    def kv_step(carry, j):
      o, m, l = carry
      s, _ = _scores(qb, _block(k, j, bk, 1), _block(mq, j, bk, 3), qsb, _block(kseg, j, bk, 1),
                     _key_ok(j, bk, kv_len, k.shape[1]), scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), _block(v, j, bk, 1),
                      preferred_element_type=jnp.float32)
      return (o * _bqh(corr) + pv, m_new, l * corr + p.sum(-1)), None

    rows = jnp.swapaxes(qb[..., 0], 1, 2)  # [B, H, bq]: the shape (and sharding) of m and l
    init = (jnp.zeros_like(qb, jnp.float32), jnp.full_like(rows, -jnp.inf, jnp.float32),
            jnp.zeros_like(rows, jnp.float32))
    (o, m, l), _ = _loop(kv_step, init, nk)
    return None, (o / _bqh(l), m, jnp.log(l))

  _, (o, m, r) = _loop(q_block, None, nq)  # [nq, B, bq, H, D], [nq, B, H, bq] x 2
  rows = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, h, lq)
  return jnp.moveaxis(o, 0, 1).reshape(b, lq, h, d), rows(m), rows(r)


def _flash_fwd(q, k, v, mask, qseg, kseg, scale, bq, bk, kv_len):
  o, m, r = _flash_forward(q, k, v, mask, qseg, kseg, scale, bq, bk, kv_len)
  return (o, m, r), (q, k, v, mask, qseg, kseg, o, m, r)


def _flash_bwd(scale, bq, bk, kv_len, res, g):
  """FlashAttention-2 backward: recompute each score block from q, k and the saved m, r.

  With p = softmax(s) = exp(s - m - r), o = p v: ds = p * (do.v - do.o + dr) (m, a constant
  shift, gets none); scores filled by the mask get no gradient (as in XLA's `where`).
  """
  q, k, v, mask, qseg, kseg, o, m, r = res
  do, _, dr = g
  b, lq, h, d = q.shape
  nq, nk = lq // bq, k.shape[1] // bk
  delta = jnp.einsum('bqhd,bqhd->bhq', do, o) - dr  # [B, H, Lq]

  def kv_block(dq, j):
    kb, vb, ksb, mk = _block(k, j, bk, 1), _block(v, j, bk, 1), _block(kseg, j, bk, 1), _block(
        mask, j, bk, 3)
    key_ok = _key_ok(j, bk, kv_len, k.shape[1])

    def q_step(carry, i):
      dk, dv = carry
      # Matmul operands in the input dtype (bf16 MXU/tensor-core rate), float32 accumulation.
      qb, dob = _block(q, i, bq, 1), _block(do, i, bq, 1).astype(q.dtype)
      s, valid = _scores(qb, kb, _block(mk, i, bq, 2), _block(qseg, i, bq, 1), ksb, key_ok, scale)
      p = jnp.exp(s - _block(m, i, bq, 2)[..., None] - _block(r, i, bq, 2)[..., None])
      dv = dv + jnp.einsum('bhqk,bqhd->bkhd', p.astype(q.dtype), dob,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum('bqhd,bkhd->bhqk', dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - _block(delta, i, bq, 2)[..., None])
      if valid is not None:
        ds = jnp.where(valid, ds, 0.0)
      ds = (ds * scale).astype(q.dtype)
      dk = dk + jnp.einsum('bhqk,bqhd->bkhd', ds, qb, preferred_element_type=jnp.float32)
      return (dk, dv), jnp.einsum('bhqk,bkhd->bqhd', ds, kb, preferred_element_type=jnp.float32)

    init = (jnp.zeros_like(kb, jnp.float32), jnp.zeros_like(vb, jnp.float32))
    (dk, dv), dq_blocks = _loop(q_step, init, nq)
    return dq + jnp.moveaxis(dq_blocks, 0, 1).reshape(dq.shape), (dk, dv)

  dq, (dk, dv) = _loop(kv_block, jnp.zeros_like(q, jnp.float32), nk)
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(k.shape)
  return (dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
          None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# 'splash': Pallas TPU kernel.


SPLASH_LANES = 128  # splash blocks are multiples of this; lengths are padded up to one


def _splash_block(n):
  """The largest of 512, 256, 128 dividing n (a multiple of 128)."""
  return next(block for block in (512, 256, 128) if n % block == 0)


def _splash(q, k, v, mask, segment_ids, kv_segment_ids, *, scale, interpret=False):
  """Splash attention of q [B, Lq, H, D], k, v [B, Lk, H, D]: under a mesh with more than one
  device (and outside a shard_map), a shard_map over the batch and heads axes runs the kernel on
  each device's examples and heads (whole sequences); otherwise the kernel runs directly."""
  if target_platform() != 'tpu' and not interpret:
    raise ValueError(
        f"attention impl='splash' (Pallas TPU splash attention) needs a TPU; the target platform "
        f"(the mesh's devices, else the default backend) is {target_platform()!r}. Use 'xla', "
        f"'chunked' or 'auto'.")
  if mask is not None:
    raise ValueError("attention impl='splash' takes segment ids, not a dense mask; use 'auto', "
                     "'chunked' or 'xla' for masked attention.")
  local = functools.partial(_splash_local, scale=scale, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  # Axes already manual (inside the context-parallel shard_map) are whole-device local here.
  free = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
  if math.prod(mesh.shape[a] for a in free) <= 1:
    return local(q, k, v, segment_ids, kv_segment_ids)
  shape = dict(mesh.shape)
  names = lambda name: tuple(a for a in _as_tuple(sharding.logical_to_spec((name,))[0])
                             if a in free)
  batch = _fit(q.shape[0], names('batch'), shape)
  heads = _fit(q.shape[2], tuple(a for a in names('act_heads') if a not in (batch or ())), shape)
  # Other axes (e.g. 'context' without context parallelism) are gathered: splash needs the
  # whole sequence on each device.
  qkv, seg = P(batch, None, heads, None), P(batch, None)
  seg_spec = None if segment_ids is None else seg
  # check_vma=False: the kernel's pallas_call declares no per-axis variance of its outputs.
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg_spec, seg_spec),
                       out_specs=qkv, axis_names=set(free), check_vma=False)(
                           q, k, v, segment_ids, kv_segment_ids)


def _splash_local(q, k, v, segment_ids, kv_segment_ids, *, scale, interpret):
  """The splash kernel on this device's arrays, lengths padded up to a multiple of 128 (512 beyond
  512 tokens)."""
  from jax.experimental.pallas.ops.tpu import \
      splash_attention as splash  # pylint: disable=g-import-not-at-top
  _, lq, h, _ = q.shape
  lk = k.shape[1]
  # Long sequences pad to whole 512-blocks: with 128-blocks the kernel's block-mask tables
  # ((L / block)^2 entries) overflow the TPU's 1 MiB SMEM near 75k tokens (Wan 14B at 720p).
  mult = lambda n: SPLASH_LANES if n <= 4 * SPLASH_LANES else 4 * SPLASH_LANES
  pq, pk = -lq % mult(lq), -lk % mult(lk)
  if pq or pk:
    # Padded keys (and queries) get an id no real query (or key) has: real queries never see
    # them; padded queries attend to padded keys (no empty softmax row) and are sliced off.
    if segment_ids is None:
      segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
      kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
    pad_id = jnp.maximum(segment_ids.max(), kv_segment_ids.max()) + 1
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    segment_ids = jnp.concatenate(
        [segment_ids, jnp.broadcast_to(pad_id, (q.shape[0], pq))], axis=1)
    kv_segment_ids = jnp.concatenate(
        [kv_segment_ids, jnp.broadcast_to(pad_id, (k.shape[0], pk))], axis=1)
    q, k, v = pad(q, pq), pad(k, pk), pad(v, pk)
  bq, bk = _splash_block(lq + pq), _splash_block(lk + pk)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                             block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                             block_kv_dq=bk)
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([splash.FullMask((lq + pq, lk + pk))] * h), block_sizes=blocks,
      head_shards=1, q_seq_shards=1, interpret=interpret)
  # The kernel takes one example [heads, L, D] and does not scale the scores.
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q, k, v = heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v)
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
        q, k, v, segment_ids, kv_segment_ids)
  return heads_first(out)[:, :lq]


# ---------------------------------------------------------------------------------------------
# Context parallelism.


def _as_tuple(axes):
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _context_axes():
  """Mesh axes the sequence ('length') is sharded over in the ambient mesh, if any is > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(a for a in _as_tuple(sharding.logical_to_spec(('length',))[0]) if a in mesh.shape)
  return axes if math.prod(mesh.shape[a] for a in axes) > 1 else ()


def _fit(size, axes, mesh_shape):
  """The longest prefix of `axes` whose product divides `size` (the rest: replicated)."""
  kept = []
  for a in axes:
    if size % (math.prod(mesh_shape[x] for x in kept) * mesh_shape[a]):
      break
    kept.append(a)
  return tuple(kept) or None


def _context_parallel(q, k, v, mask, segment_ids, kv_segment_ids, *, axes, strategy, kv_sharded,
                      local, scale, block_q, block_kv, check_vma=True):
  mesh = jax.sharding.get_abstract_mesh()
  shape = dict(mesh.shape)
  n = math.prod(shape[a] for a in axes)
  b, lq, h, _ = q.shape
  if lq % n or (kv_sharded and k.shape[1] % n):
    raise ValueError(
        f'context_parallel={strategy!r}: sequence lengths (q {lq}, kv {k.shape[1]}) must be '
        f'divisible by the context mesh axes {dict((a, shape[a]) for a in axes)} (product {n}).')
  rest = lambda name: tuple(a for a in _as_tuple(sharding.logical_to_spec((name,))[0])
                            if a in shape and a not in axes)
  batch = _fit(b, rest('batch'), shape)
  heads = _fit(h, tuple(a for a in rest('act_heads') if a not in (batch or ())), shape)
  seq, kv_seq = axes, (axes if kv_sharded else None)
  qkv_spec = lambda s: P(batch, s, heads, None)
  seg_spec = lambda s: P(batch, s)
  mask_spec = None
  if mask is not None:
    mask_spec = P(batch if mask.shape[0] > 1 else None, heads if mask.shape[1] > 1 else None,
                  seq if mask.shape[2] > 1 else None, None)

  def body(q, k, v, mask, qseg, kseg):
    if not kv_sharded:
      # Cross-attention: the keys are whole on every device. Marking them as varying over the
      # context axes makes their gradient the sum over the query shards (pcast's transpose;
      # unchecked, shard_map's transpose sums over the axes their spec leaves out).
      if check_vma:
        k, v, kseg = (x if x is None else jax.lax.pcast(x, axes, to='varying')
                      for x in (k, v, kseg))
      return local(q, k, v, mask, qseg, kseg)
    if strategy == 'ring':
      return _ring(q, k, v, mask, qseg, kseg, axes=axes, n=n, scale=scale, block_q=block_q,
                   block_kv=block_kv).astype(q.dtype)
    return _all_to_all(q, k, v, mask, qseg, kseg, axes=axes, n=n, local=local)

  in_specs = (qkv_spec(seq), qkv_spec(kv_seq), qkv_spec(kv_seq), mask_spec,
              None if segment_ids is None else seg_spec(seq),
              None if kv_segment_ids is None else seg_spec(kv_seq))
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec(seq),
                       check_vma=check_vma)(
      q, k, v, mask, segment_ids, kv_segment_ids)


def _ring(q, k, v, mask, qseg, kseg, *, axes, n, scale, block_q, block_kv):
  """Ring attention on this device's blocks: q [B, Lq/n, H, D] stays, k/v/kseg rotate."""
  idx = jax.lax.axis_index(axes)
  block_len = k.shape[1]

  def attend_block(k, v, kseg, src):
    # The mask's key axis is whole on every device: take the block that came from device `src`.
    msk = mask
    if msk is not None and msk.shape[3] > 1:
      msk = jax.lax.dynamic_slice_in_dim(msk, src * block_len, block_len, axis=3)
    o, m, r = _chunked(q, k, v, msk, qseg, kseg, scale, block_q, block_kv)
    return o, jax.lax.stop_gradient(m), r

  perm = [(i, (i + 1) % n) for i in range(n)]

  def step(carry, s):
    o, m, r, kv = carry
    kv = jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), kv)  # now from device idx - s
    o_s, m_s, r_s = attend_block(*kv, (idx - s) % n)
    # Merge two softmax partials by their log-sum-exps m + r, relative to the larger m.
    m_new = jnp.maximum(m, m_s)
    w, w_s = jnp.exp(m - m_new + r), jnp.exp(m_s - m_new + r_s)
    o = (o * _bqh(w) + o_s * _bqh(w_s)) / _bqh(w + w_s)
    return (o, m_new, jnp.log(w + w_s), kv), None

  o, m, r = attend_block(k, v, kseg, idx)
  (o, _, _, _), _ = jax.lax.scan(step, (o, m, r, (k, v, kseg)), jnp.arange(1, n))
  return o


def _all_to_all(q, k, v, mask, qseg, kseg, *, axes, n, local):
  """DeepSpeed-Ulysses: sequence-sharded -> head-sharded, local attention, and back."""
  h = q.shape[2]
  if h % n:
    raise ValueError(f"context_parallel='all_to_all' needs the heads on each device ({h}) "
                     f'divisible by the context axes size {n}; use ring.')
  to_heads = lambda x: jax.lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True)
  gather = lambda x: x if x is None else jax.lax.all_gather(x, axes, axis=1, tiled=True)
  if mask is not None:
    if mask.shape[1] > 1:  # this device now holds heads [idx * h/n, (idx + 1) * h/n)
      mask = jax.lax.dynamic_slice_in_dim(mask, jax.lax.axis_index(axes) * (h // n), h // n, 1)
    if mask.shape[2] > 1:
      mask = jax.lax.all_gather(mask, axes, axis=2, tiled=True)
  out = local(to_heads(q), to_heads(k), to_heads(v), mask, gather(qseg), gather(kseg))
  return jax.lax.all_to_all(out, axes, split_axis=1, concat_axis=2, tiled=True)

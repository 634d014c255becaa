"""Video diffusion transformer over 3D spacetime patches.

Input: channels-last video [B, T, H, W, C] (pixels or VAE latents: the DiT does not care), flow time
t in [0, 1], and text embeddings with their mask. Output: the predicted velocity, same shape as the input.
Blocks: adaLN-zero modulated self-attention (3D RoPE, QK-norm) -> cross-attention to text -> MLP.
Blocks are stacked on a leading 'layers' axis and run with `jax.lax.scan` (one compiled block).

Packed input (`VideoDiT.packed`, NaViT-style): several clips of any shape share one token sequence. Each
token carries its segment id (0 = padding, 1..S = clip) and its (t, h, w) patch coordinates within its
own clip. The same weights and block code then restrict self-attention to the token's segment, take
RoPE from the explicit coordinates, modulate with the segment's own timestep + pooled text (adaLN per
token) and cross-attend only to the segment's caption, so a packed clip gets the output it gets alone.

Conditioning on given frames (`condition_channel=True`; sora_jax/diffusion/given_frames.py): image-to-video,
forward/backward extension, connecting clips and sliding-window long videos all give the model some
frames of the clip. Given frames are kept CLEAN in the input and their temporal tokens get flow time
t = 0 through the per-frame times above; one extra input channel (channel concat: C + 1 in, C out) is 1
on given frames and 0 elsewhere, so the model can tell a given frame from one that is merely nearly
clean. The loss covers only the other frames. Why per-frame times rather than a separate reference
branch: a clean frame at t = 0 is exactly what per-frame training (diffusion.frame_noise_prob) already
teaches the model to read, with no new weights beyond the mask channel's patch-embedding rows. A given
"frame" is a whole temporal patch (patch_size[0] frames): one token carries one time.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.common import spacetime
from sora_jax.models import layers, rope
from sora_jax.parallel import sharding


def timestep_embedding(t, dim, max_period=10000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled to [0, 1000] as in DiT)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


def segment_index(segment_ids):
  """[B, N] segment ids (0 = padding, 1..S) -> 0-based index of each token's segment.

  Padding tokens borrow segment 1's conditioning (and caption): they self-attend only to padding and no
  real token attends to them, so what they compute never reaches a real token, but it stays finite.
  """
  return jnp.maximum(segment_ids.astype(jnp.int32) - 1, 0)


def per_token(values, index):
  """Per-segment values [B, S, ...] -> per-token [B, N, ...] for 0-based segment indices [B, N]."""
  index = index.reshape(index.shape + (1,) * (values.ndim - 2))
  return jnp.take_along_axis(values, index, axis=1)


def _per_token_modulation(mod, index):
  """[B, k*D] (one clip per row: broadcast over tokens) or [B, S, k*D] + index -> [B, 1 or N, k*D].

  Modulation is computed per segment, then gathered: the same values as computing it on each token's
  gathered conditioning, at S rather than N matmul rows.
  """
  return mod[:, None] if index is None else per_token(mod, index)


class DiTBlock(nnx.Module):

  def __init__(self, width, num_heads, mlp_ratio, *, rngs, dtype, attention_impl='auto',
               context_parallel=None):
    # adaLN-zero: modulation starts at zero, so every block starts as the identity.
    self.modulation = layers.linear(width, 6 * width, ('embed', 'mlp'), zero=True, rngs=rngs,
                                    dtype=dtype)
    self.norm1 = layers.layer_norm(width, rngs=rngs, dtype=dtype)
    attn = dict(rngs=rngs, dtype=dtype, impl=attention_impl, context_parallel=context_parallel)
    self.self_attn = layers.Attention(width, num_heads, **attn)
    self.norm2 = layers.layer_norm(width, affine=True, rngs=rngs, dtype=dtype)
    self.cross_attn = layers.Attention(width, num_heads, **attn)
    self.norm3 = layers.layer_norm(width, rngs=rngs, dtype=dtype)
    self.mlp = layers.Mlp(width, int(width * mlp_ratio), rngs=rngs, dtype=dtype)

  def __call__(self, x, c, context, rope_cs, *, cross_mask=None, self_segments=None,
               cross_segments=None, index=None):
    """x [B, N, D]; c [B, D] (one clip per row) or [B, S, D] with `index` [B, N] (packed segments);
    cross_mask: boolean, broadcastable to [B, heads, N, keys]; self_segments [B, N]: tokens attend
    within their segment; cross_segments: (query [B, N], key [B, keys]) segment ids."""
    mod = _per_token_modulation(self.modulation(jax.nn.silu(c)), index)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    x = x + gate1 * self.self_attn(modulate(self.norm1(x), shift1, scale1),
                                   segment_ids=self_segments, rope_cs=rope_cs)
    q_seg, kv_seg = cross_segments or (None, None)
    x = x + self.cross_attn(self.norm2(x), context, mask=cross_mask, segment_ids=q_seg,
                            kv_segment_ids=kv_seg)
    x = x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))
    return sharding.constrain(x, ('batch', 'length', 'act_embed'))


REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_blocks(blocks, x, *, remat: str, scan_layers: bool, **block_args):
  """Applies stacked blocks (params on a leading 'layers' axis) in turn: one compiled block under
  `jax.lax.scan`, or unrolled; each block rematerialised per `remat`. Shared by every DiT family."""
  graphdef, params = nnx.split(blocks)

  def body(x, block_params):
    block = nnx.merge(graphdef, block_params)
    return block(x, **block_args), None

  if remat != 'none':
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  if scan_layers:
    x, _ = jax.lax.scan(body, x, params)
  else:
    for i in range(jax.tree.leaves(params)[0].shape[0]):
      x, _ = body(x, jax.tree.map(lambda p, i=i: p[i], params))
  return x


class VideoDiT(nnx.Module):

  def __init__(self, *, channels, patch_size, width, depth, num_heads, mlp_ratio, context_width,
               rope_theta=256.0, scan_layers=True, remat='none', dtype=jnp.float32,
               attention_impl='auto', context_parallel=None, condition_channel=False,
               lowres_channels=0, rngs):
    """attention_impl: attention backend (parallel/attention.py IMPLS); context_parallel: None, 'ring'
    or 'all_to_all', used when the mesh shards the token sequence ('context' axis > 1);
    condition_channel: takes the given-frame mask as an extra input channel (module docstring);
    lowres_channels: channels of an upsampled low-resolution video concatenated to the input (the
    super-resolution stage, sora_jax/inference/upscale.py)."""
    self.channels, self.patch_size = channels, tuple(patch_size)
    self.condition_channel, self.lowres_channels = condition_channel, lowres_channels
    self.num_heads, self.rope_theta = num_heads, rope_theta
    self.scan_layers, self.remat = scan_layers, remat
    patch_dim = math.prod(self.patch_size) * channels
    in_dim = math.prod(self.patch_size) * (channels + int(condition_channel) + lowres_channels)
    self.patch_embed = layers.linear(in_dim, width, ('patch', 'embed'), rngs=rngs, dtype=dtype)
    self.time_embed1 = layers.linear(256, width, ('patch', 'embed'), rngs=rngs, dtype=dtype)
    self.time_embed2 = layers.linear(width, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype)
    self.context_embed1 = layers.linear(context_width, width, ('patch', 'embed'), rngs=rngs,
                                        dtype=dtype)
    self.context_embed2 = layers.linear(width, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype)
    # Pooled text joins the timestep in the adaLN conditioning (as in SD3): a cheap global signal.
    self.pooled_embed = layers.linear(context_width, width, ('patch', 'embed'), rngs=rngs,
                                      dtype=dtype)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return DiTBlock(width, num_heads, mlp_ratio, rngs=rngs, dtype=dtype,
                      attention_impl=attention_impl, context_parallel=context_parallel)

    self.blocks = make_blocks(rngs)
    self.final_norm = layers.layer_norm(width, rngs=rngs, dtype=dtype)
    self.final_modulation = layers.linear(width, 2 * width, ('embed', 'mlp'), zero=True,
                                          rngs=rngs, dtype=dtype)
    self.final = layers.linear(width, patch_dim, ('embed', 'patch'), zero=True, rngs=rngs,
                               dtype=dtype)

  def __call__(self, video, t, context, context_mask, given=None, lowres=None):
    """video [B, T, H, W, C], t [B] (or [B, T]: a flow time per frame, constant within each temporal
    patch), context [B, L, Dc], context_mask [B, L], given [B, T]: the given-frame mask (models with
    condition_channel; None: nothing given), lowres [B, T, H, W, lowres_channels] (upscalers only)
    -> [B, T, H, W, C]."""
    dtype = self.patch_embed.dtype
    if (lowres is None) != (self.lowres_channels == 0):
      raise ValueError(f'This VideoDiT takes {self.lowres_channels} low-resolution channels; got'
                       f' lowres={None if lowres is None else lowres.shape}.')
    if lowres is not None:
      video = jnp.concatenate([video.astype(dtype), lowres.astype(dtype)], axis=-1)
    if self.condition_channel:
      b, frames = video.shape[:2]
      given = jnp.zeros((b, frames), dtype) if given is None else given.astype(dtype)
      channel = jnp.broadcast_to(given[:, :, None, None, None], (*video.shape[:4], 1))
      video = jnp.concatenate([video.astype(dtype), channel], axis=-1)
    elif given is not None:
      raise ValueError('This VideoDiT was built without condition_channel: it cannot take given'
                       ' frames (train it with config.condition.mix).')
    x, grid = spacetime.patchify(video.astype(dtype), self.patch_size)
    x = sharding.constrain(self.patch_embed(x), ('batch', 'length', 'act_embed'))
    c_text, context = self._condition(context, context_mask)
    index = None
    if t.ndim == 2:
      # Per-frame times: adaLN conditioning per temporal token, gathered like packed segments.
      tg = t[:, ::self.patch_size[0]]
      c = self._time(tg.reshape(-1)).reshape(*tg.shape, -1) + c_text[:, None]
      index = jnp.broadcast_to(jnp.arange(x.shape[1]) // (grid[1] * grid[2]), x.shape[:2])
    else:
      c = self._time(t) + c_text
    head_dim = x.shape[-1] // self.num_heads
    rope_cs = rope.frequencies(rope.grid_positions(grid), head_dim, self.rope_theta)
    x = self._blocks(x, c=c, context=context, cross_mask=layers.padding_mask(context_mask),
                     rope_cs=rope_cs, index=index)
    x = self._head(x, c, index)
    return spacetime.unpatchify(x, grid, self.patch_size, self.channels).astype(jnp.float32)

  def packed(self, tokens_in, positions, segment_ids, t, context, context_mask):
    """Packed sequences of clips -> predicted patch tokens [B, N, patch_dim] (float32).

    tokens_in [B, N, patch_dim]: patch tokens (patchify order within each clip); positions [B, N, 3]
    int: (t, h, w) patch coordinates of each token within its own clip; segment_ids [B, N] int:
    0 = padding, 1..S = the clip; t [B, S]: flow time per segment; context [B, S, Lc, Dc] and
    context_mask [B, S, Lc]: each segment's caption embeddings (slots of absent segments need any
    non-empty mask, e.g. the empty caption's BOS/EOS).
    """
    dtype = self.patch_embed.dtype
    b, s = t.shape
    lc = context_mask.shape[-1]
    x = sharding.constrain(self.patch_embed(tokens_in.astype(dtype)),
                           ('batch', 'length', 'act_embed'))
    c_text, context = self._condition(context.reshape(b * s, lc, -1),
                                      context_mask.reshape(b * s, lc))
    c = self._time(t.reshape(b * s)) + c_text
    c, context = c.reshape(b, s, -1), context.reshape(b, s * lc, -1)
    segment_ids = segment_ids.astype(jnp.int32)
    index = segment_index(segment_ids)
    # Self-attention within a segment (padding attends to padding); cross-attention to the token's
    # own caption among the S flattened ones: caption positions carry their slot's 0-based index,
    # padded positions -1 (matches no token). Segment ids, not [N, N] masks: the attention
    # backends build the mask blockwise (or never).
    key_segment = jnp.repeat(jnp.arange(s, dtype=jnp.int32), lc)
    key_segment = jnp.where(context_mask.reshape(b, s * lc).astype(bool), key_segment[None], -1)
    head_dim = x.shape[-1] // self.num_heads
    rope_cs = rope.frequencies(positions, head_dim, self.rope_theta)
    x = self._blocks(x, c=c, context=context, rope_cs=rope_cs, self_segments=segment_ids,
                     cross_segments=(index, key_segment), index=index)
    return self._head(x, c, index).astype(jnp.float32)

  def _time(self, t):
    """t [M] -> timestep part of the adaLN conditioning [M, D]."""
    dtype = self.patch_embed.dtype
    return self.time_embed2(jax.nn.silu(self.time_embed1(timestep_embedding(t, 256).astype(dtype))))

  def _condition(self, context, context_mask):
    """context [M, L, Dc], mask [M, L] -> text part of the adaLN conditioning [M, D], embedded
    context."""
    context = context.astype(self.patch_embed.dtype)
    count = jnp.maximum(context_mask.sum(1, keepdims=True), 1)  # an all-padding caption pools to 0
    pooled = (context * context_mask[..., None]).sum(1) / count
    c_text = self.pooled_embed(pooled)
    context = self.context_embed2(jax.nn.gelu(self.context_embed1(context), approximate=True))
    return c_text, context

  def _blocks(self, x, **block_args):
    return run_blocks(self.blocks, x, remat=self.remat, scan_layers=self.scan_layers, **block_args)

  def _head(self, x, c, index=None):
    mod = _per_token_modulation(self.final_modulation(jax.nn.silu(c)), index)
    shift, scale = jnp.split(mod, 2, axis=-1)
    return self.final(modulate(self.final_norm(x), shift, scale))

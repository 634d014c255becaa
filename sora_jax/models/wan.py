"""Wan 2.1 transformer (diffusers `WanTransformer3DModel`: text-to-video and image-to-video) in Flax NNX.

Same computation as diffusers/models/transformers/transformer_wan.py, so released Wan weights load
unchanged (sora_jax/interop/wan_transformer.py maps them):
  patch embedding: Conv3d with kernel = stride = patch, done as `dit.patchify` + a linear (identical
    token order: (t, h, w) row-major; features (pt, ph, pw, c));
  3D RoPE, theta 10000, head dim split t/h/w as `rope.axis_dims` (h = w = 2*(d//6)), rotating
    interleaved channel pairs (2i, 2i+1): diffusers' repeat_interleave_real convention;
  conditioning: sinusoidal timestep embedding (cos first: flip_sin_to_cos=True, shift 0) of the
    timestep on Wan's 0..1000 scale -> time MLP (SiLU) = temb -> time_proj(SiLU(temb)) = 6 modulation
    vectors per block; text: linear -> tanh-GELU -> linear;
  block: x += gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)      (RoPE, RMSNorm over full q/k width)
         x += CrossAttn(LN_affine(x), text)                        (attends to every text position)
         x += gate2 * FFN(LN(x) * (1 + scale2) + shift2)           (tanh-GELU)
    with (shift1, scale1, gate1, shift2, scale2, gate2) = block.scale_shift_table + time_proj output;
  head: LN(x) * (1 + scale) + shift with (shift, scale) = scale_shift_table + temb, then proj_out.
Image-to-video (Wan 2.1 I2V: config image_dim, added_kv_proj_dim): the input is 36 channels (noisy
latents, a 4-channel frame mask, the first frame's latents: WanImageToVideoPipeline), and the CLIP
image tokens (CLIP ViT-H/14 hidden_states[-2], [B, 257, 1280]) go through an image embedding
(LN -> linear -> GELU -> linear -> LN, float32 norms) to width D. In each cross-attention the queries
also attend to them, with their own K/V projections (add_k_proj with RMSNorm norm_added_k,
add_v_proj), and the two attention outputs are summed before to_out: what diffusers computes for its
[image tokens; text tokens] concatenation, kept as two inputs here (no 512-token text assumption).

Precision: parameters float32 by default; matmuls in `dtype` (bf16 for training). The residual
stream, layer norms, modulation and the whole timestep path stay float32, as in diffusers'
_keep_in_fp32_modules and the original Wan code's float32 autocast regions: bf16 rounding of a
residual summed over 30-40 blocks costs accuracy and saves little.

Wan 2.2 TI2V-5B (one transformer, text- and image-to-video, in the Wan 2.2 VAE's 48 channels): the
Wan 2.1 T2V architecture at width 3072 whose pipeline (diffusers `expand_timesteps`) conditions on
an image by keeping the first latent frame clean with timestep 0 on its tokens; no mask channel, no
CLIP. That is sora_jax's given-frames conditioning (diffusion/given_frames.py) with a per-frame
timestep [B, T], so a model built with `expand_timesteps=True` takes `given` and the existing
objective and sampler run it.

Blocks are stacked on a leading 'layers' axis and run by `jax.lax.scan` (one compiled block, so the
30/40-layer models compile in seconds), optionally rematerialised, as in dit.VideoDiT.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.common import spacetime
from sora_jax.config import schema
from sora_jax.models import dit, rope
from sora_jax.parallel import attention, sharding

ROPE_THETA = 10000.0

# diffusers config.json fields that only the image-to-video variants set (CLIP image tokens with
# their own K/V projections). pos_embed_seq_len (first-last-frame-to-video) is not implemented.
_I2V_FIELDS = ('image_dim', 'added_kv_proj_dim', 'pos_embed_seq_len')
# The 4-channel frame mask WanImageToVideoPipeline puts between the noisy and the image latents.
I2V_MASK_CHANNELS = 4


@dataclasses.dataclass(frozen=True)
class WanConfig:
  """The fields of a diffusers WanTransformer3DModel config.json (same names, same defaults)."""
  patch_size: tuple[int, int, int] = (1, 2, 2)
  num_attention_heads: int = 40
  attention_head_dim: int = 128
  in_channels: int = 16
  out_channels: int = 16
  text_dim: int = 4096
  freq_dim: int = 256
  ffn_dim: int = 13824
  num_layers: int = 40
  cross_attn_norm: bool = True
  # diffusers always applies RMSNorm over the full q/k width whatever this says; kept for the record.
  qk_norm: str | None = 'rms_norm_across_heads'
  eps: float = 1e-6
  rope_max_seq_len: int = 1024
  # Image-to-video (Wan 2.1 I2V): CLIP feature width (1280) and the added K/V input width (= inner_dim).
  image_dim: int | None = None
  added_kv_proj_dim: int | None = None

  def __post_init__(self):
    i2v = dict(image_dim=self.image_dim, added_kv_proj_dim=self.added_kv_proj_dim)
    if any(v is not None for v in i2v.values()) and (
        self.image_dim is None or self.added_kv_proj_dim != self.inner_dim):
      raise NotImplementedError(
          f'Wan image-to-video settings {i2v} are not supported: Wan 2.1 I2V sets both, with '
          f'added_kv_proj_dim = num_attention_heads * attention_head_dim (= {self.inner_dim} '
          'here), the width its image embedding projects the CLIP tokens to.')

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def is_i2v(self) -> bool:
    """Image-to-video: CLIP image tokens in cross-attention (and a 36-channel input)."""
    return self.image_dim is not None

  @classmethod
  def from_diffusers(cls, config: dict) -> 'WanConfig':
    """From a config.json dict. Private keys ('_class_name', ...) are ignored; unknown keys and the
    first-last-frame variant are errors rather than silently different models."""
    fields = {f.name for f in dataclasses.fields(cls)}
    public = {k: v for k, v in config.items() if not k.startswith('_')}
    if public.get('pos_embed_seq_len') is not None:
      raise NotImplementedError(
          f'pos_embed_seq_len={public["pos_embed_seq_len"]}: this is the Wan 2.1 first-last-frame '
          'transformer (FLF2V: position embeddings over two images\' CLIP tokens), which is not '
          'supported; Wan 2.1 T2V and I2V are.')
    public.pop('pos_embed_seq_len', None)
    unknown = sorted(set(public) - fields)
    if unknown:
      raise ValueError(f'Unknown WanTransformer3DModel config fields {unknown}; known: '
                       f'{sorted(fields | set(_I2V_FIELDS))}')
    if public.get('qk_norm', 'rms_norm_across_heads') not in ('rms_norm_across_heads', None):
      raise ValueError(f"qk_norm={public['qk_norm']!r}: only 'rms_norm_across_heads' exists in Wan")
    if public.get('out_channels') is None:  # diffusers: out_channels = out_channels or in_channels
      public['out_channels'] = public.get('in_channels', cls.in_channels)
    if 'patch_size' in public:
      public['patch_size'] = tuple(public['patch_size'])
    cfg = cls(**public)
    if len(cfg.patch_size) != 3:
      raise ValueError(f'patch_size must be (t, h, w), got {cfg.patch_size}')
    return cfg


def i2v_frame_mask(latents_shape, dtype=jnp.float32):
  """WanImageToVideoPipeline's frame mask for latents [B, T, H, W, C], channels-last
  [B, T, H, W, 4]: the pixel-frame mask (1 for the first frame, 0 after) with the first frame repeated
  to the VAE's temporal factor 4 and reshaped into 4 channels per latent frame, i.e. ones on latent
  frame 0 and zeros on the others."""
  b, t, h, w = latents_shape[:4]
  first = (jnp.arange(t) == 0).astype(dtype)[None, :, None, None, None]
  return jnp.broadcast_to(first, (b, t, h, w, I2V_MASK_CHANNELS))


def i2v_condition(image_latents):
  """The condition channels of the I2V input: [frame mask (4); VAE latents of [first frame, zero
  frames]] (normalised, [B, T, H, W, C]) -> [B, T, H, W, 4 + C], in diffusers' order."""
  mask = i2v_frame_mask(image_latents.shape, image_latents.dtype)
  return jnp.concatenate([mask, image_latents], axis=-1)


def i2v_input(noisy, condition):
  """The I2V transformer input: [noisy latents (C); condition (4 + C)] on the channel axis, as
  WanImageToVideoPipeline's torch.cat([latents, condition], dim=1)."""
  return jnp.concatenate([noisy, condition.astype(noisy.dtype)], axis=-1)


def is_ti2v(cfg: WanConfig) -> bool:
  """A Wan 2.2 TI2V-5B transformer by its config alone: 48 latent channels in and out (the Wan 2.2
  VAE's). Its pipeline's model_index.json says so too (`expand_timesteps`), which is what
  interop/wan_transformer.py reads (tiny test models have fewer channels)."""
  return cfg.in_channels == cfg.out_channels == 48 and not cfg.is_i2v


def image_condition_only(cfg: WanConfig) -> bool:
  """Wan 2.2 I2V-A14B's experts: the image-to-video input (noisy latents, frame mask, first-frame
  latents: 2C + 4 channels) and no CLIP image tokens (no image_dim)."""
  return not cfg.is_i2v and cfg.in_channels == 2 * cfg.out_channels + I2V_MASK_CHANNELS


def _linear(din, dout, axes, *, rngs, dtype, param_dtype):
  """nnx.Linear whose kernel carries logical axis names `axes` (in, out) (layers.linear with a
  configurable parameter dtype: a 14B model is loaded for inference with bf16 parameters)."""
  return nnx.Linear(
      din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]))


def _param(init, shape, axes, *, rngs, param_dtype):
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, param_dtype))


def layer_norm(x, eps, scale=None, bias=None):
  """float32 LayerNorm over the last axis (diffusers FP32LayerNorm)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y


def rms_norm(x, scale, eps):
  """RMSNorm over the last axis in float32, cast back to x's dtype (torch.nn.RMSNorm)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps) * scale.astype(jnp.float32)
  return y.astype(x.dtype)


def timestep_embedding(timestep, dim, max_period=10000.0):
  """diffusers Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0) of timesteps [M] on the
  0..1000 scale -> [M, dim] (cos half first)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timestep.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _grouped(x, g):
  """[B, N, D] -> [B, G, N/G, D]: tokens are t-major, so group i is temporal patch i when G = Tp."""
  b, n, d = x.shape
  return x.reshape(b, g, n // g, d)


def _modulate(x, shift, scale):
  """x [B, N, D] float32; shift/scale [B, G, D] (G = 1, or one per temporal patch)."""
  g = shift.shape[1]
  return (_grouped(x, g) * (1 + scale[:, :, None]) + shift[:, :, None]).reshape(x.shape)


def _gate(y, gate):
  return (_grouped(y.astype(jnp.float32), gate.shape[1]) * gate[:, :, None]).reshape(y.shape)


class WanAttention(nnx.Module):
  """Attention with RMSNorm over the full q and k width (all heads together: Wan's
  'rms_norm_across_heads'), and RoPE on self-attention. attention_impl / context_parallel: as
  layers.Attention (self-attention runs the backend; cross-attention its cross_attention_impl)."""

  def __init__(self, width, num_heads, eps, *, rngs, dtype, param_dtype, attention_impl='auto',
               context_parallel=None, added_kv=False):
    attention_impl = 'xla' if attention_impl is None else attention_impl
    if attention_impl not in schema.ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={attention_impl!r}: expected one of {schema.ATTENTION_IMPLS}')
    if context_parallel not in attention.CONTEXT_PARALLEL:
      raise ValueError(f'context_parallel={context_parallel!r}: expected one of '
                       f'{attention.CONTEXT_PARALLEL}')
    self.num_heads, self.eps = num_heads, eps
    self.attention_impl, self.context_parallel = attention_impl, context_parallel
    lin = lambda a, b, axes: _linear(a, b, axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.to_q = lin(width, width, ('embed', 'heads'))
    self.to_k = lin(width, width, ('embed', 'heads'))
    self.to_v = lin(width, width, ('embed', 'heads'))
    self.to_out = lin(width, width, ('heads', 'embed'))
    ones = nnx.initializers.ones_init()
    self.norm_q = _param(ones, (width,), ('heads',), rngs=rngs, param_dtype=param_dtype)
    self.norm_k = _param(ones, (width,), ('heads',), rngs=rngs, param_dtype=param_dtype)
    if added_kv:  # image-to-video cross-attention: K/V of the image tokens
      self.add_k_proj = lin(width, width, ('embed', 'heads'))
      self.add_v_proj = lin(width, width, ('embed', 'heads'))
      self.norm_added_k = _param(ones, (width,), ('heads',), rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x, context=None, *, rope_cs=None, image_context=None):
    self_attention = context is None
    context = x if context is None else context
    heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, -1)
    q = heads(rms_norm(self.to_q(x), self.norm_q[...], self.eps))
    k = heads(rms_norm(self.to_k(context), self.norm_k[...], self.eps))
    v = heads(self.to_v(context))
    if rope_cs is not None:
      q, k = rope.apply(q, *rope_cs), rope.apply(k, *rope_cs)
    q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
    impl = self.attention_impl
    out = attention.attention(
        q, k, v, impl=impl if self_attention else attention.cross_attention_impl(impl),
        context_parallel=self.context_parallel, kv_sharded=self_attention)
    if image_context is not None:  # I2V: the queries also attend to the image tokens; outputs summed
      k_img = heads(rms_norm(self.add_k_proj(image_context), self.norm_added_k[...], self.eps))
      v_img = heads(self.add_v_proj(image_context))
      out = out + attention.attention(
          q, k_img, v_img, impl=attention.cross_attention_impl(impl),
          context_parallel=self.context_parallel, kv_sharded=False)
    return self.to_out(out.reshape(*x.shape[:2], -1))


class WanFeedForward(nnx.Module):

  def __init__(self, width, hidden, *, rngs, dtype, param_dtype):
    self.up = _linear(width, hidden, ('embed', 'mlp'), rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)
    self.down = _linear(hidden, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype,
                        param_dtype=param_dtype)

  def __call__(self, x):
    h = jax.nn.gelu(self.up(x), approximate=True)
    return self.down(sharding.constrain(h, ('batch', 'length', 'act_mlp')))


class WanBlock(nnx.Module):

  def __init__(self, cfg: WanConfig, *, rngs, dtype, param_dtype, attention_impl='auto',
               context_parallel=None):
    d = cfg.inner_dim
    self.eps, self.dtype = cfg.eps, dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    attn = dict(kw, attention_impl=attention_impl, context_parallel=context_parallel)
    self.scale_shift_table = _param(nnx.initializers.normal(d ** -0.5), (6, d), (None, 'embed'),
                                    rngs=rngs, param_dtype=param_dtype)
    self.attn1 = WanAttention(d, cfg.num_attention_heads, cfg.eps, **attn)
    if cfg.cross_attn_norm:
      self.norm2_scale = _param(nnx.initializers.ones_init(), (d,), ('embed',), rngs=rngs,
                                param_dtype=param_dtype)
      self.norm2_bias = _param(nnx.initializers.zeros_init(), (d,), ('embed',), rngs=rngs,
                               param_dtype=param_dtype)
    else:
      self.norm2_scale = self.norm2_bias = None
    self.attn2 = WanAttention(d, cfg.num_attention_heads, cfg.eps, **attn,
                              added_kv=cfg.added_kv_proj_dim is not None)
    self.ffn = WanFeedForward(d, cfg.ffn_dim, **kw)

  def __call__(self, x, e, context, rope_cs, image_context=None):
    """x [B, N, D] float32 residual stream; e [B, G, 6, D] float32 time projection (G = 1, or one
    per temporal patch); context [B, L, D] embedded text; image_context [B, I, D] embedded image
    tokens (I2V) or None."""
    mod = self.scale_shift_table[...].astype(jnp.float32) + e
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, :, i] for i in range(6))
    h = _modulate(layer_norm(x, self.eps), shift1, scale1).astype(self.dtype)
    x = x + _gate(self.attn1(h, rope_cs=rope_cs), gate1)
    if self.norm2_scale is not None:
      h = layer_norm(x, self.eps, self.norm2_scale[...], self.norm2_bias[...])
    else:
      h = x
    x = x + self.attn2(h.astype(self.dtype), context,
                       image_context=image_context).astype(jnp.float32)
    h = _modulate(layer_norm(x, self.eps), shift2, scale2).astype(self.dtype)
    x = x + _gate(self.ffn(h), gate2)
    return sharding.constrain(x, ('batch', 'length', 'act_embed'))


class WanImageEmbedding(nnx.Module):
  """diffusers WanImageEmbedding: CLIP tokens [B, I, image_dim] -> LN -> linear -> GELU (exact) ->
  linear -> LN -> [B, I, D] float32 (affine float32 norms, eps 1e-5 as torch.nn.LayerNorm's)."""

  EPS = 1e-5

  def __init__(self, image_dim, width, *, rngs, dtype, param_dtype):
    self.dtype = dtype
    p = dict(rngs=rngs, param_dtype=param_dtype)
    ones, zeros = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
    self.norm1_scale = _param(ones, (image_dim,), ('patch',), **p)
    self.norm1_bias = _param(zeros, (image_dim,), ('patch',), **p)
    self.ff_1 = _linear(image_dim, image_dim, ('patch', 'mlp'), dtype=dtype, **p)
    self.ff_2 = _linear(image_dim, width, ('mlp', 'embed'), dtype=dtype, **p)
    self.norm2_scale = _param(ones, (width,), ('embed',), **p)
    self.norm2_bias = _param(zeros, (width,), ('embed',), **p)

  def __call__(self, image_embeds):
    h = layer_norm(image_embeds, self.EPS, self.norm1_scale[...], self.norm1_bias[...])
    h = self.ff_2(jax.nn.gelu(self.ff_1(h.astype(self.dtype)), approximate=False))
    return layer_norm(h, self.EPS, self.norm2_scale[...], self.norm2_bias[...])


REMAT_POLICIES = dit.REMAT_POLICIES


class WanDiT(nnx.Module):
  """Wan 2.1 T2V / I2V transformer with the call signature of dit.VideoDiT (video, flow time, text;
  I2V models also take image_embeds: the CLIP tokens, sora_jax.models.clip_vision).

  `__call__` takes flow time t in [0, 1] (x_t = (1 - t) x0 + t noise, velocity target noise - x0,
  the sora_jax.diffusion.flow convention, which is Wan's with sigma = t) and feeds Wan its timestep
  1000 * t. `forward_wan` takes Wan's timestep directly.

  attention_impl: the attention backend (parallel/attention.py): 'auto' (default) picks cuDNN flash
  attention on GPU (bf16), splash on TPU, XLA for short and 'chunked' (O(N) memory) for long
  sequences elsewhere; 'xla' (or None) always builds the full [heads, N, N] score matrix, too big
  at 480p x 81 frames (N = 32760). context_parallel: None, 'ring' or 'all_to_all', used when the
  mesh shards the token sequence ('context' axis > 1).
  """

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, scan_layers=True, remat='none', attention_impl='auto',
               context_parallel=None, expand_timesteps=False):
    if expand_timesteps and (config.is_i2v or image_condition_only(config)):
      raise ValueError('expand_timesteps (Wan 2.2 TI2V: given frames through their timesteps) is '
                       'for a text-to-video input; this transformer takes the image-to-video one.')
    self.expand_timesteps = expand_timesteps
    if remat != 'none' and remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r}: expected one of none, {", ".join(REMAT_POLICIES)}')
    cfg = self.config = config
    self.dtype, self.scan_layers, self.remat = dtype, scan_layers, remat
    d = cfg.inner_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    f32 = dict(kw, dtype=jnp.float32)  # timestep path in float32 (B rows: costs nothing)
    self.patch_embedding = _linear(math.prod(cfg.patch_size) * cfg.in_channels, d,
                                   ('patch', 'embed'), **kw)
    self.time_embedder_1 = _linear(cfg.freq_dim, d, ('patch', 'embed'), **f32)
    self.time_embedder_2 = _linear(d, d, ('mlp', 'embed'), **f32)
    self.time_proj = _linear(d, 6 * d, ('embed', 'mlp'), **f32)
    self.text_embedder_1 = _linear(cfg.text_dim, d, ('patch', 'embed'), **kw)
    self.text_embedder_2 = _linear(d, d, ('mlp', 'embed'), **kw)
    if cfg.is_i2v:
      self.image_embedder = WanImageEmbedding(cfg.image_dim, d, **kw)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return WanBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                      attention_impl=attention_impl, context_parallel=context_parallel)

    self.blocks = make_blocks(rngs)
    self.scale_shift_table = _param(nnx.initializers.normal(d ** -0.5), (2, d), (None, 'embed'),
                                    rngs=rngs, param_dtype=param_dtype)
    self.proj_out = _linear(d, math.prod(cfg.patch_size) * cfg.out_channels, ('embed', 'patch'),
                            **kw)

  @classmethod
  def from_config(cls, config: dict, **kwargs) -> 'WanDiT':
    """From a diffusers config.json dict; kwargs as __init__ (rngs, dtype, scan_layers, ...)."""
    return cls(WanConfig.from_diffusers(config), **kwargs)

  def __call__(self, video, t, context, context_mask=None, image_embeds=None, given=None):
    """video [B, T, H, W, C], flow time t [B] (or [B, T]: one per frame, constant within each
    temporal patch) in [0, 1], context [B, L, text_dim], context_mask [B, L] or None, image_embeds
    [B, I, image_dim] (I2V models only), given [B, T] the given-frame mask (models built with
    expand_timesteps only: Wan 2.2 TI2V, whose given frames are told apart by t = 0 alone, which
    the caller's per-frame t carries; checked for shape here, not used) -> velocity
    [B, T, H, W, out_channels] float32.

    Wan attends to every text position: its pipeline zero-pads the T5 embeddings to 512 tokens and
    the model was trained on that. So with a mask the padded embeddings are zeroed (exactly what
    the pipeline feeds the model) rather than masked out of attention, which would change the
    output of the released weights. context_mask=None uses the context as given.
    """
    if given is not None:
      self._check_given(video, t, given)
    if context_mask is not None:
      context = context * context_mask[..., None].astype(context.dtype)
    return self.forward_wan(video, 1000.0 * jnp.asarray(t, jnp.float32), context, image_embeds)

  def _check_given(self, video, t, given):
    if not self.expand_timesteps:
      raise ValueError('This Wan transformer takes no given frames: only Wan 2.2 TI2V (built with '
                       'expand_timesteps, config.model.wan.expand_timesteps) conditions on them, '
                       'through a timestep of 0 on their frames.')
    if given.shape != video.shape[:2] or jnp.ndim(t) != 2:
      raise ValueError(f'given must be [B, T] = {video.shape[:2]} with a per-frame t [B, T] (0 on '
                       f'the given frames); got given {given.shape}, t {jnp.shape(t)}')

  def forward_wan(self, latents, timestep, context, image_embeds=None):
    """latents [B, T, H, W, C], timestep [B] or [B, T] on Wan's 0..1000 scale, context
    [B, L, text_dim], image_embeds [B, I, image_dim] for an I2V model (CLIP hidden_states[-2]), None
    for T2V -> [B, T, H, W, out_channels] float32 (Wan's flow prediction)."""
    cfg = self.config
    self._check_inputs(latents, timestep, context, image_embeds)
    x, grid = spacetime.patchify(latents.astype(self.dtype), cfg.patch_size)
    x = sharding.constrain(self.patch_embedding(x).astype(jnp.float32),
                           ('batch', 'length', 'act_embed'))
    if timestep.ndim == 2:  # per frame -> per temporal patch
      timestep = timestep[:, ::cfg.patch_size[0]]
    temb, e = self._time(timestep.reshape(latents.shape[0], -1))
    context = self.text_embedder_2(
        jax.nn.gelu(self.text_embedder_1(context.astype(self.dtype)), approximate=True))
    rope_cs = rope.frequencies(rope.grid_positions(grid), cfg.attention_head_dim, ROPE_THETA)
    image = {}
    if cfg.is_i2v:
      image['image_context'] = self.image_embedder(image_embeds).astype(self.dtype)
    x = self._blocks(x, e=e, context=context, rope_cs=rope_cs, **image)
    mod = self.scale_shift_table[...].astype(jnp.float32) + temb[:, :, None]
    x = _modulate(layer_norm(x, cfg.eps), mod[:, :, 0], mod[:, :, 1]).astype(self.dtype)
    x = self.proj_out(x)
    return spacetime.unpatchify(x, grid, cfg.patch_size, cfg.out_channels).astype(jnp.float32)

  def _time(self, timestep):
    """timestep [B, G] -> temb [B, G, D] and the blocks' time projection [B, G, 6, D]."""
    b, g = timestep.shape
    emb = timestep_embedding(timestep.reshape(-1), self.config.freq_dim)
    temb = self.time_embedder_2(jax.nn.silu(self.time_embedder_1(emb)))
    e = self.time_proj(jax.nn.silu(temb))
    return temb.reshape(b, g, -1), e.reshape(b, g, 6, -1)

  def _check_inputs(self, latents, timestep, context, image_embeds=None):
    cfg = self.config
    if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
      hint = ''
      if ((cfg.is_i2v or image_condition_only(cfg)) and latents.ndim == 5
          and latents.shape[-1] == cfg.out_channels):
        hint = (f' (an image-to-video model: noisy latents, the {I2V_MASK_CHANNELS}-channel frame '
                'mask and the first-frame latents, concatenated on channels)')
      raise ValueError(f'latents must be [B, T, H, W, {cfg.in_channels}]{hint}, got '
                       f'{latents.shape}')
    if any(n % p for n, p in zip(latents.shape[1:4], cfg.patch_size)):
      raise ValueError(f'latent (T, H, W) = {latents.shape[1:4]} not divisible by patch_size '
                       f'{cfg.patch_size}')
    grid = [n // p for n, p in zip(latents.shape[1:4], cfg.patch_size)]
    if max(grid) > cfg.rope_max_seq_len:
      raise ValueError(f'patch grid {grid} exceeds rope_max_seq_len={cfg.rope_max_seq_len}')
    if timestep.shape not in ((latents.shape[0],), latents.shape[:2]):
      raise ValueError(f'timestep must be [B] or [B, T] = {latents.shape[:2]}, got '
                       f'{timestep.shape}')
    if context.ndim != 3 or context.shape[0] != latents.shape[0] or context.shape[-1] != cfg.text_dim:
      raise ValueError(f'context must be [B={latents.shape[0]}, L, text_dim={cfg.text_dim}], got '
                       f'{context.shape}')
    if cfg.is_i2v and image_embeds is None:
      raise ValueError(f'This Wan transformer is image-to-video (image_dim={cfg.image_dim}): pass '
                       'image_embeds, the CLIP image tokens [B, 257, image_dim] '
                       '(sora_jax.interop.load_clip_vision_encoder)')
    if not cfg.is_i2v and image_embeds is not None:
      raise ValueError('This Wan transformer is text-to-video (its config has no image_dim): it '
                       'takes no image_embeds; an image-to-video checkpoint (e.g. '
                       'Wan2.1-I2V-14B-480P-Diffusers) does')
    if image_embeds is not None and (
        image_embeds.ndim != 3 or image_embeds.shape[0] != latents.shape[0]
        or image_embeds.shape[-1] != cfg.image_dim):
      raise ValueError(f'image_embeds must be [B={latents.shape[0]}, I, image_dim={cfg.image_dim}], '
                       f'got {image_embeds.shape}')

  def _blocks(self, x, **block_args):
    return dit.run_blocks(self.blocks, x, remat=self.remat, scan_layers=self.scan_layers,
                          **block_args)

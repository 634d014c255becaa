"""Wan 2.1 / 2.2 causal 3D video VAE (diffusers' `AutoencoderKLWan` architecture), channels-last.

Video [B, T, H, W, 3] in [-1, 1] <-> latents [B, 1 + (T - 1) / 4, H / 8, W / 8, z_dim] (with Wan's
config: the factors follow `dim_mult` / `temperal_downsample`). Time is causal everywhere: 3D convs
pad only on the past side, so latent frame 0 sees only video frame 0 and a single image is a 1-frame
video in the same latent space.

Wan 2.2 (TI2V-5B's VAE: `is_residual=True`, `patch_size=2`, z_dim 48, H / 16, W / 16) adds, as
diffusers does: pixels folded 2x2 into channels before the encoder (`patchify`, 3 -> 12 channels)
and unfolded after the decoder; encoder stages that add a parameter-free shortcut (AvgDown3D: the
stage's input space-/time-to-channel folded and group-averaged to its output shape) and decoder
stages with the mirror shortcut (DupUp3D: channels repeated and unfolded into space / time), and
decoder upsamplers that keep their width (Wan 2.1's halve it). Both shortcuts are stateless per
chunk: AvgDown3D zero-pads the front of a chunk to a multiple of its time factor (only the 1-frame
first chunk, exactly as the full sequence's leading pad), DupUp3D drops the first factor - 1
frames of the video's first chunk (as the upsampler does), so the chunking argument below holds.

Causality is what makes chunking exact. Every module takes `cache` (its state from the previous
chunk, or None at the start of a video) and returns (output, new cache):
  * a causal conv with a k-frame time kernel caches the last k - 1 frames of its input; None means
    zero frames, which is exactly the causal zero padding of the full sequence;
  * a temporal downsample keeps frame 0 alone ([x0] ++ stride-2 valid conv over x) and caches the
    last input frame for the next chunk's first window;
  * a temporal upsample keeps frame 0 alone and doubles the rest with a causal conv ([x0] ++
    interleave(conv(x[1:])), frame 0 never enters that conv's history).
So the full sequence is just "one chunk starting the video" (cache=None), and encoding the first
frame then chunks of 4 frames (decoding one latent frame at a time) with the caches carried gives
the same result, as in diffusers' `feat_cache` loop. The chunked paths run the first chunk, then a
`jax.lax.scan` over the remaining chunks with the caches as carry: one compiled step, memory that
does not grow with video length. The full-sequence path (`chunked=False`) is the one to train with.

Spatial tiling (diffusers' `enable_tiling`): `encode_tiled` / `decode_tiled` (and `tiled_moments` /
`tiled_decode` around any per-tile function) process overlapping tiles and blend them as diffusers
does.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# diffusers AutoencoderKLWan config fields (config.json) and their defaults (Wan 2.1).
CONFIG_DEFAULTS = dict(
    base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
    attn_scales=(), temperal_downsample=(False, True, True), dropout=0.0,
    latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134,
                  -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
    latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526,
                 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
    is_residual=False, in_channels=3, out_channels=3, patch_size=None, scale_factor_temporal=4,
    scale_factor_spatial=8)

# Fields released configs carry that current diffusers (0.42) no longer reads: accepted, ignored.
# `clip_output` (false in Wan2.2-TI2V-5B-Diffusers' vae/config.json) switched off the decode clamp
# in diffusers 0.35; diffusers now always clamps to [-1, 1], and so do we (WanVAE.decode).
IGNORED_FIELDS = ('clip_output',)


def config_from_dict(config: dict) -> dict:
  """diffusers config.json dict -> CausalVAE keyword arguments; unknown/unsupported fields raise."""
  # Drop diffusers' bookkeeping (_class_name, _diffusers_version, _name_or_path).
  config = {k: v for k, v in config.items()
            if not k.startswith('_') and k not in IGNORED_FIELDS}
  unknown = sorted(set(config) - set(CONFIG_DEFAULTS))
  if unknown:
    raise ValueError(f'Unknown AutoencoderKLWan config fields: {unknown}; '
                     f'known: {sorted(CONFIG_DEFAULTS)}')
  kwargs = {**CONFIG_DEFAULTS, **config}
  for k in ('dim_mult', 'attn_scales', 'temperal_downsample', 'latents_mean', 'latents_std'):
    kwargs[k] = tuple(kwargs[k]) if kwargs[k] is not None else None
  kwargs['is_residual'] = bool(kwargs['is_residual'])
  return kwargs


# PyTorch's default conv init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))).
_KERNEL_INIT = nnx.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _channel_axes(din, dout, base):
  """Logical names for (in, out) channels: hidden widths (multiples of the base width) are fsdp
  sharded on the output side; small ends (RGB, latent channels) stay replicated."""
  return (None, 'embed' if dout % base == 0 and dout >= base else None)


class Conv(nnx.Module):
  """Plain conv over the trailing spatial dims of channels-last input ([N, *spatial, C]).

  Kernel [*kernel_size, in, out] (PyTorch's [out, in, *k] transposed on load).
  """

  def __init__(self, din, dout, kernel_size, *, axes, rngs, stride=None, padding=None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.kernel_size = tuple(kernel_size)
    nd = len(self.kernel_size)
    self.stride = tuple(stride or (1,) * nd)
    self.padding = tuple(padding or ((0, 0),) * nd)
    self.dtype = dtype
    shape = (*self.kernel_size, din, dout)
    self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), shape, param_dtype),
                            out_sharding=(None,) * nd + tuple(axes))
    self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), out_sharding=tuple(axes[1:]))

  def __call__(self, x):
    return self.conv(x)

  def conv(self, x):
    """The convolution itself (valid in time for CausalConv3d: no causal padding, no cache)."""
    nd = len(self.kernel_size)
    spatial = 'DHW'[3 - nd:]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding,
        dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))
    return y + self.bias[...].astype(self.dtype)


class CausalConv3d(Conv):
  """3D conv, [B, T, H, W, C]; time is padded (or fed from the cache) on the past side only."""

  def __init__(self, din, dout, kernel_size=3, *, axes, rngs, stride=1, spatial_padding=None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
    s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    p = k[1] // 2 if spatial_padding is None else spatial_padding
    super().__init__(din, dout, k, axes=axes, rngs=rngs, stride=s,
                     padding=((0, 0), (p, p), (p, p)), dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, cache=None):
    """Causal conv with its cache: the last kt - 1 input frames of the previous chunk (None: zeros,
    i.e. the start of the video). Returns (y, new cache); new cache is None for 1-frame kernels."""
    past = self.kernel_size[0] - 1
    if past == 0:
      return self.conv(x), None
    if cache is None:
      cache = jnp.zeros((x.shape[0], past, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return self.conv(x), x[:, -past:]


class RMSNorm(nnx.Module):
  """Wan's RMS norm: F.normalize over channels (L2, eps 1e-12) * sqrt(C) * gamma, no bias."""

  def __init__(self, dim, *, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,))

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = xf / jnp.maximum(norm, 1e-12) * math.sqrt(xf.shape[-1])
    return (y * self.gamma[...].astype(jnp.float32)).astype(x.dtype)


def _dropout(x, rate, rng):
  if rate == 0.0 or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _fold(rng, i):
  return None if rng is None else jax.random.fold_in(rng, i)


class ResidualBlock(nnx.Module):

  def __init__(self, din, dout, dropout, *, base, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dropout = dropout
    self.norm1 = RMSNorm(din, param_dtype=param_dtype)
    self.conv1 = CausalConv3d(din, dout, 3, axes=_channel_axes(din, dout, base), **kw)
    self.norm2 = RMSNorm(dout, param_dtype=param_dtype)
    self.conv2 = CausalConv3d(dout, dout, 3, axes=_channel_axes(dout, dout, base), **kw)
    self.conv_shortcut = (CausalConv3d(din, dout, 1, axes=_channel_axes(din, dout, base), **kw)
                          if din != dout else None)

  def __call__(self, x, cache=None, rng=None):
    c1, c2 = cache if cache is not None else (None, None)
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
    x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
    x = _dropout(jax.nn.silu(self.norm2(x)), self.dropout, rng)
    x, c2 = self.conv2(x, c2)
    return x + h, (c1, c2)


class AttentionBlock(nnx.Module):
  """Single-head spatial self-attention within each frame (no temporal mixing, so no cache)."""

  def __init__(self, dim, *, base, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = RMSNorm(dim, param_dtype=param_dtype)
    self.to_qkv = Conv(dim, 3 * dim, (1, 1), axes=_channel_axes(dim, 3 * dim, base), **kw)
    self.proj = Conv(dim, dim, (1, 1), axes=_channel_axes(dim, dim, base), **kw)

  def __call__(self, x, cache=None, rng=None):
    b, t, h, w, c = x.shape
    y = self.norm(x).reshape(b * t, h, w, c)
    q, k, v = jnp.split(self.to_qkv(y).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
    y = jax.nn.dot_product_attention(q, k, v).reshape(b * t, h, w, c)
    return x + self.proj(y).reshape(b, t, h, w, c), None


def _interleave_time(y):
  """[B, T, H, W, 2C] (two output frames per input frame, stacked on channels) -> [B, 2T, H, W, C]
  """
  b, t, h, w, c2 = y.shape
  y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
  return y.reshape(b, 2 * t, h, w, c2 // 2)


class Resample(nnx.Module):
  """Spatial x2 down/up-sampling per frame (2d) plus, for '3d' modes, causal temporal x2.

  Modes as in diffusers: upsample2d / upsample3d (nearest x2 + 3x3 conv to `out` channels: dim // 2
  in Wan 2.1, dim in Wan 2.2's residual decoder; 3d: a (3,1,1) causal conv to 2*dim channels doubles
  the frames first), downsample2d / downsample3d (pad right/bottom, 3x3 stride-2 conv; 3d: then a
  (3,1,1) stride-2 conv over time).
  """

  def __init__(self, dim, mode, *, base, rngs, dtype, param_dtype, out=None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mode = mode
    if mode.startswith('upsample'):
      out = dim // 2 if out is None else out
      self.resample = Conv(dim, out, (3, 3), padding=((1, 1), (1, 1)),
                           axes=_channel_axes(dim, out, base), **kw)
      self.time_conv = (CausalConv3d(dim, 2 * dim, (3, 1, 1),
                                     axes=_channel_axes(dim, 2 * dim, base), **kw)
                        if mode == 'upsample3d' else None)
    elif mode.startswith('downsample'):
      self.resample = Conv(dim, dim, (3, 3), stride=(2, 2), padding=((0, 1), (0, 1)),
                           axes=_channel_axes(dim, dim, base), **kw)
      self.time_conv = (CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1),
                                     axes=_channel_axes(dim, dim, base), **kw)
                        if mode == 'downsample3d' else None)
    else:
      raise ValueError(f'Unknown resample mode {mode!r}')

  def _spatial(self, x):
    b, t, h, w, c = x.shape
    x = x.reshape(b * t, h, w, c)
    if self.mode.startswith('upsample'):
      # nearest-exact x2 == repeat each pixel (done in float32, as diffusers' WanUpsample).
      x = jnp.repeat(jnp.repeat(x.astype(jnp.float32), 2, axis=1), 2, axis=2).astype(x.dtype)
    y = self.resample(x)
    return y.reshape(b, t, *y.shape[1:])

  def __call__(self, x, cache=None, rng=None):
    if self.mode == 'upsample3d':
      x, cache = self._time_up(x, cache)
    x = self._spatial(x)
    if self.mode == 'downsample3d':
      x, cache = self._time_down(x, cache)
    return x, cache

  def _time_up(self, x, cache):
    if cache is None:  # start of the video: frame 0 passes alone, the rest is doubled
      first, rest = x[:, :1], x[:, 1:]
      cache = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
      if rest.shape[1] == 0:
        return first, cache
      y, cache = self.time_conv(rest, cache)
      return jnp.concatenate([first, _interleave_time(y)], axis=1), cache
    y, cache = self.time_conv(x, cache)
    return _interleave_time(y), cache

  def _time_down(self, x, cache):
    conv = self.time_conv.conv  # valid stride-2 conv over time, no padding
    if cache is None:  # start of the video: [x0] ++ windows (x0,x1,x2), (x2,x3,x4), ...
      if x.shape[1] % 2 != 1:
        raise ValueError(f'Temporal downsampling at the start of a video needs 1 + 2k frames, '
                         f'got {x.shape[1]}')
      out = x[:, :1] if x.shape[1] == 1 else jnp.concatenate([x[:, :1], conv(x)], axis=1)
      return out, x[:, -1:]
    if x.shape[1] % 2 != 0:
      raise ValueError(f'Temporal downsampling of a continuation chunk needs an even frame count, '
                       f'got {x.shape[1]}')
    return conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1)), x[:, -1:]


class MidBlock(nnx.Module):

  def __init__(self, dim, dropout, *, base, rngs, dtype, param_dtype):
    kw = dict(base=base, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResidualBlock(dim, dim, dropout, **kw) for _ in range(2)])
    self.attentions = nnx.List([AttentionBlock(dim, **kw)])

  def __call__(self, x, cache=None, rng=None):
    cache = cache or (None, None)
    x, c0 = self.resnets[0](x, cache[0], _fold(rng, 0))
    x, _ = self.attentions[0](x)
    x, c1 = self.resnets[1](x, cache[1], _fold(rng, 1))
    return x, (c0, c1)


def patchify(x, p):
  """[B, T, H, W, C] -> [B, T, H/p, W/p, C p^2]: each p x p pixel block folded into channels in
  diffusers' order (channel c * p^2 + dw * p + dh, the block's column offset before its row)."""
  if p == 1:
    return x
  b, t, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f'patchify needs H, W multiples of patch_size={p}, got shape {x.shape}')
  x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
  return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x, p):
  """The inverse of `patchify`: [B, T, h, w, C p^2] -> [B, T, h p, w p, C]."""
  if p == 1:
    return x
  b, t, h, w, cp = x.shape
  x = x.reshape(b, t, h, w, cp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
  return x.reshape(b, t, h * p, w * p, cp // (p * p))


def _avg_down(x, dout, ft, fs):
  """diffusers' AvgDown3D: zero-pad the front of time to a multiple of ft, fold each ft x fs x fs
  block into channels (c, t, h, w order) and average groups of consecutive channels down to dout."""
  pad = -x.shape[1] % ft
  if pad:
    x = jnp.concatenate([jnp.zeros((x.shape[0], pad, *x.shape[2:]), x.dtype), x], axis=1)
  b, t, h, w, c = x.shape
  x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
  return x.reshape(b, t // ft, h // fs, w // fs, dout, -1).mean(axis=-1)


def _dup_up(x, dout, ft, fs, first):
  """diffusers' DupUp3D: repeat each channel, unfold (c, t, h, w) blocks into ft frames and fs x fs
  pixels; at the start of a video (first) the first ft - 1 frames are dropped, as the temporal
  upsampler passes frame 0 alone."""
  b, t, h, w, c = x.shape
  x = jnp.repeat(x, dout * ft * fs * fs // c, axis=-1).reshape(b, t, h, w, dout, ft, fs, fs)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, dout)
  return x[:, ft - 1:] if first else x


class ResidualDownBlock(nnx.Module):
  """Wan 2.2 encoder stage: residual blocks then (optionally) a Resample downsampler, plus the
  AvgDown3D shortcut of the stage's input (diffusers' WanResidualDownBlock)."""

  def __init__(self, din, dout, dropout, num_res_blocks, temporal, down, *, base, rngs, dtype,
               param_dtype):
    kw = dict(base=base, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dout, self.ft, self.fs = dout, 2 if temporal else 1, 2 if down else 1
    if din * self.ft * self.fs ** 2 % dout:
      raise ValueError(f'Residual (Wan 2.2) encoder stage {din} -> {dout} channels: the AvgDown3D '
                       f'shortcut needs in_channels x {self.ft * self.fs ** 2} divisible by the '
                       f'output channels (check dim_mult)')
    self.resnets = nnx.List([ResidualBlock(din if j == 0 else dout, dout, dropout, **kw)
                             for j in range(num_res_blocks)])
    self.downsampler = (Resample(dout, 'downsample3d' if temporal else 'downsample2d', **kw)
                        if down else None)

  def __call__(self, x, cache=None, rng=None):
    cache = cache or (None, None)
    skip = _avg_down(x, self.dout, self.ft, self.fs)
    x, c_res = _run_sequence(self.resnets, x, cache[0], _fold(rng, 0))
    c_down = None
    if self.downsampler is not None:
      x, c_down = self.downsampler(x, cache[1])
    return x + skip, (c_res, c_down)


class ResidualUpBlock(nnx.Module):
  """Wan 2.2 decoder stage: residual blocks then (optionally) a width-keeping Resample upsampler,
  plus the DupUp3D shortcut of the stage's input (diffusers' WanResidualUpBlock)."""

  def __init__(self, din, dout, num_res_blocks, dropout, temporal, up, *, base, rngs, dtype,
               param_dtype):
    kw = dict(base=base, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.dout, self.ft = dout, 2 if temporal else 1
    if up and dout * self.ft * 4 % din:
      raise ValueError(f'Residual (Wan 2.2) decoder stage {din} -> {dout} channels: the DupUp3D '
                       f'shortcut needs out_channels x {self.ft * 4} divisible by the input '
                       f'channels (check dim_mult)')
    self.resnets = nnx.List([ResidualBlock(din if j == 0 else dout, dout, dropout, **kw)
                             for j in range(num_res_blocks + 1)])
    self.upsampler = (Resample(dout, 'upsample3d' if temporal else 'upsample2d', out=dout, **kw)
                      if up else None)

  def __call__(self, x, cache=None, rng=None):
    first = cache is None  # the start of the video (diffusers' first_chunk)
    cache = cache or (None, None)
    h, c_res = _run_sequence(self.resnets, x, cache[0], _fold(rng, 0))
    c_up = None
    if self.upsampler is not None:
      h, c_up = self.upsampler(h, cache[1])
      h = h + _dup_up(x, self.dout, self.ft, 2, first)
    return h, (c_res, c_up)


def _run_sequence(layers, x, cache, rng):
  """Apply cached layers in order; returns (x, list of their caches)."""
  cache = cache or [None] * len(layers)
  new = []
  for i, layer in enumerate(layers):
    x, c = layer(x, cache[i], _fold(rng, i))
    new.append(c)
  return x, new


class Encoder(nnx.Module):

  def __init__(self, *, in_channels, dim, z_dim, dim_mult, num_res_blocks, attn_scales,
               temperal_downsample, dropout, is_residual, rngs, dtype, param_dtype):
    kw = dict(base=dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    dims = [dim * u for u in (1, *dim_mult)]
    self.conv_in = CausalConv3d(in_channels, dims[0], 3,
                                axes=_channel_axes(in_channels, dims[0], dim), rngs=rngs,
                                dtype=dtype, param_dtype=param_dtype)
    blocks, scale = [], 1.0
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      if is_residual:  # Wan 2.2: one block per stage (attn_scales unused, as in diffusers)
        last = i == len(dim_mult) - 1
        blocks.append(ResidualDownBlock(din, dout, dropout, num_res_blocks,
                                        not last and temperal_downsample[i], not last, **kw))
        continue
      for _ in range(num_res_blocks):
        blocks.append(ResidualBlock(din, dout, dropout, **kw))
        if scale in attn_scales:
          blocks.append(AttentionBlock(dout, **kw))
        din = dout
      if i != len(dim_mult) - 1:
        blocks.append(Resample(dout, 'downsample3d' if temperal_downsample[i] else 'downsample2d',
                               **kw))
        scale /= 2.0
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], dropout, **kw)
    self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
    self.conv_out = CausalConv3d(dims[-1], z_dim, 3, axes=_channel_axes(dims[-1], z_dim, dim),
                                 rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, cache=None, rng=None):
    cache = cache or (None, None, None, None)
    x, c_in = self.conv_in(x, cache[0])
    x, c_down = _run_sequence(self.down_blocks, x, cache[1], _fold(rng, 0))
    x, c_mid = self.mid_block(x, cache[2], _fold(rng, 1))
    x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), cache[3])
    return x, (c_in, c_down, c_mid, c_out)


class UpBlock(nnx.Module):

  def __init__(self, din, dout, num_res_blocks, dropout, upsample_mode, *, base, rngs, dtype,
               param_dtype):
    kw = dict(base=base, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.resnets = nnx.List([ResidualBlock(din if j == 0 else dout, dout, dropout, **kw)
                             for j in range(num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample(dout, upsample_mode, **kw)] if upsample_mode else [])

  def __call__(self, x, cache=None, rng=None):
    cache = cache or (None, None)
    x, c_res = _run_sequence(self.resnets, x, cache[0], _fold(rng, 0))
    x, c_up = _run_sequence(self.upsamplers, x, cache[1], _fold(rng, 1))
    return x, (c_res, c_up)


class Decoder(nnx.Module):

  def __init__(self, *, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, dropout,
               out_channels, is_residual, rngs, dtype, param_dtype):
    kw = dict(base=dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    self.conv_in = CausalConv3d(z_dim, dims[0], 3, axes=_channel_axes(z_dim, dims[0], dim),
                                rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.mid_block = MidBlock(dims[0], dropout, **kw)
    blocks = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      up = i != len(dim_mult) - 1
      if is_residual:  # Wan 2.2: upsamplers keep the width, a DupUp3D shortcut per stage
        blocks.append(ResidualUpBlock(din, dout, num_res_blocks, dropout,
                                      up and temperal_upsample[i], up, **kw))
        continue
      if i > 0:
        din //= 2  # the previous block's upsampler halves the channels (Wan 2.1)
      mode = ('upsample3d' if temperal_upsample[i] else 'upsample2d') if up else None
      blocks.append(UpBlock(din, dout, num_res_blocks, dropout, mode, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
    self.conv_out = CausalConv3d(dims[-1], out_channels, 3,
                                 axes=_channel_axes(dims[-1], out_channels, dim), rngs=rngs,
                                 dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x, cache=None, rng=None):
    cache = cache or (None, None, None, None)
    x, c_in = self.conv_in(x, cache[0])
    x, c_mid = self.mid_block(x, cache[1], _fold(rng, 0))
    x, c_up = _run_sequence(self.up_blocks, x, cache[2], _fold(rng, 1))
    x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), cache[3])
    return x, (c_in, c_mid, c_up, c_out)


def _scan_chunks(net, x, chunk_in, chunk_out):
  """Causal chunked application of `net` (Encoder / Decoder) over time: frame 0 alone (the cache
  starts empty), then `chunk_in`-frame chunks -> `chunk_out` frames each under a scan whose carry is
  (caches, output buffer). Input chunks are sliced and outputs written in place, so nothing but the
  input and output scales with the number of frames."""
  b, t = x.shape[:2]
  out0, cache = net(x[:, :1])
  n = (t - 1) // chunk_in
  out = jnp.zeros((b, 1 + n * chunk_out, *out0.shape[2:]), out0.dtype)
  out = jax.lax.dynamic_update_slice_in_dim(out, out0, 0, axis=1)

  def step(carry, i):
    cache, out = carry
    chunk = jax.lax.dynamic_slice_in_dim(x, 1 + i * chunk_in, chunk_in, axis=1)
    y, cache = net(chunk, cache)
    return (cache, jax.lax.dynamic_update_slice_in_dim(out, y, 1 + i * chunk_out, axis=1)), None

  (_, out), _ = jax.lax.scan(step, (cache, out), jnp.arange(n))
  return out


def split_moments(moments):
  """[..., 2z] -> (mean, logvar clipped to [-30, 20]) as diffusers' DiagonalGaussianDistribution."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, -30.0, 20.0)


def _blend(a, b, extent, axis):
  """b's first `extent` rows along `axis` faded in from a's last ones (diffusers' blend_v / h)."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  if extent <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = extent
  w = (jnp.arange(extent, dtype=b.dtype) / extent).reshape(shape)
  head = (jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * (1 - w)
          + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w)
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)], axis)


def _tile_and_blend(fn, x, tile_in, stride_in, blend_out, stride_out, size_out):
  """Apply fn to overlapping tiles of x [B, T, H, W, C] (axes 2, 3) and stitch the results: each
  tile blended with its upper and left neighbours (already blended, as diffusers' in-place loop
  does), cropped to the stride, concatenated, cropped to size_out."""
  rows = []
  for i in range(0, x.shape[2], stride_in[0]):
    row = []
    for j in range(0, x.shape[3], stride_in[1]):
      out = fn(x[:, :, i:i + tile_in[0], j:j + tile_in[1]])
      if rows:
        out = _blend(rows[-1][len(row)], out, blend_out[0], axis=2)
      if row:
        out = _blend(row[-1], out, blend_out[1], axis=3)
      row.append(out)
    rows.append(row)
  stitched = jnp.concatenate(
      [jnp.concatenate([t[:, :, :stride_out[0], :stride_out[1]] for t in row], axis=3)
       for row in rows], axis=2)
  return stitched[:, :, :size_out[0], :size_out[1]]


def tiled_moments(moments_fn, video, spatial_factor, tile=(256, 256), stride=(192, 192)):
  """diffusers' tiled_encode: moments_fn (video tile -> moments) over pixel tiles of `tile` every
  `stride`, blended in latent space over (tile - stride) / spatial_factor latent pixels."""
  s = spatial_factor
  lat_tile, lat_stride = [d // s for d in tile], [d // s for d in stride]
  blend = [a - b for a, b in zip(lat_tile, lat_stride)]
  size = (video.shape[2] // s, video.shape[3] // s)
  return _tile_and_blend(moments_fn, video, tile, stride, blend, lat_stride, size)


def tiled_decode(decode_fn, z, spatial_factor, tile=(256, 256), stride=(192, 192)):
  """diffusers' tiled_decode: decode_fn (latent tile -> unclamped video) over latent tiles of
  tile / spatial_factor every stride / spatial_factor, blended over (tile - stride) pixels."""
  s = spatial_factor
  lat_tile, lat_stride = [d // s for d in tile], [d // s for d in stride]
  blend = [a - b for a, b in zip(tile, stride)]
  size = (z.shape[2] * s, z.shape[3] * s)
  return _tile_and_blend(decode_fn, z, lat_tile, lat_stride, blend, stride, size)


def tiled_decode_patches(decode_fn, z, spatial_factor, patch_size, tile=(256, 256),
                         stride=(192, 192)):
  """diffusers' tiled_decode with patch_size: decode_fn (latent tile -> patchified unclamped video)
  over latent tiles of tile / spatial_factor every stride / spatial_factor, blended in patchified
  pixels over tile / p - stride / p; the caller unpatchifies. patch_size 1 is `tiled_decode`."""
  p = patch_size
  return tiled_decode(decode_fn, z, spatial_factor // p, [d // p for d in tile],
                      [d // p for d in stride])


class CausalVAE(nnx.Module):
  """Wan 2.1 / 2.2 video VAE. Constructor fields = diffusers AutoencoderKLWan config fields.

  encode(video [B, T, H, W, 3] in [-1, 1], T = 1 + 4k) -> (mean, logvar) [B, 1 + k, H/s, W/s, z]
  (s = spatial_factor: 8 for Wan 2.1, 16 for Wan 2.2's patch_size 2);
  decode(z) -> video [B, 1 + 4(T' - 1), H, W, 3]; __call__(video, rng) -> (recon, mean, logvar).
  With patch_size p, in_channels / out_channels count the patchified channels (video channels x
  p^2, as in diffusers' config), and the encoder / decoder run on patchified frames.
  """

  def __init__(self, *, base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=(1, 2, 4, 4),
               num_res_blocks=2, attn_scales=(), temperal_downsample=(False, True, True),
               dropout=0.0, latents_mean=CONFIG_DEFAULTS['latents_mean'],
               latents_std=CONFIG_DEFAULTS['latents_std'], in_channels=3, out_channels=3,
               is_residual=False, patch_size=None, scale_factor_temporal=None,
               scale_factor_spatial=None, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    dim_mult, temperal_downsample = tuple(dim_mult), tuple(temperal_downsample)
    if len(temperal_downsample) != len(dim_mult) - 1:
      raise ValueError(f'temperal_downsample needs len(dim_mult) - 1 = {len(dim_mult) - 1} '
                       f'entries, got {temperal_downsample}')
    p = 1 if patch_size is None else patch_size
    if not isinstance(p, int) or p < 1:
      raise ValueError(f'patch_size must be a positive int or None, got {patch_size!r}')
    for name, c in (('in_channels', in_channels), ('out_channels', out_channels)):
      if c % (p * p):
        raise ValueError(f'{name}={c} is not a multiple of patch_size^2={p * p} (with patch_size '
                         'it counts the patchified channels: video channels x patch_size^2)')
    self.z_dim, self.patch_size = z_dim, p
    self.video_channels = in_channels // (p * p)
    self.temporal_factor = 2 ** sum(map(bool, temperal_downsample))
    self.spatial_factor = 2 ** (len(dim_mult) - 1) * p
    for name, given, actual in (
        ('scale_factor_temporal', scale_factor_temporal, self.temporal_factor),
        ('scale_factor_spatial', scale_factor_spatial, self.spatial_factor)):
      if given is not None and given != actual:
        raise ValueError(f'{name}={given} disagrees with the architecture ({actual})')
    self.latents_mean = None if latents_mean is None else tuple(map(float, latents_mean))
    self.latents_std = None if latents_std is None else tuple(map(float, latents_std))
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = Encoder(in_channels=in_channels, dim=base_dim, z_dim=2 * z_dim,
                           dim_mult=dim_mult, num_res_blocks=num_res_blocks,
                           attn_scales=tuple(attn_scales),
                           temperal_downsample=temperal_downsample, dropout=dropout,
                           is_residual=is_residual, **kw)
    self.quant_conv = CausalConv3d(2 * z_dim, 2 * z_dim, 1, axes=(None, None), **kw)
    self.post_quant_conv = CausalConv3d(z_dim, z_dim, 1, axes=(None, None), **kw)
    self.decoder = Decoder(dim=decoder_base_dim or base_dim, z_dim=z_dim, dim_mult=dim_mult,
                           num_res_blocks=num_res_blocks,
                           temperal_upsample=temperal_downsample[::-1], dropout=dropout,
                           out_channels=out_channels, is_residual=is_residual, **kw)

  def patchify(self, video):
    """Video [B, T, H, W, C] -> the encoder's input (identity without patch_size)."""
    return patchify(video, self.patch_size)

  def unpatchify(self, x):
    """The decoder's output -> video (identity without patch_size)."""
    return unpatchify(x, self.patch_size)

  # ----- encode ---------------------------------------------------------------------------------

  def encode(self, video, *, chunked=True, rng=None):
    """video [B, T, H, W, C] in [-1, 1], T = 1 + k * temporal_factor -> (mean, logvar) float32.

    chunked: first frame, then `temporal_factor`-frame chunks under a scan (constant memory in T);
    otherwise the whole sequence at once (same values; use for training). rng: dropout (training).
    """
    return split_moments(self.moments(video, chunked=chunked, rng=rng))

  def moments(self, video, *, chunked=True, rng=None):
    """The encoder + quant_conv output [B, T', h, w, 2 z_dim] float32 (mean ++ unclipped logvar)."""
    self._check_encode(video.shape, self.spatial_factor, 'video')
    return self._moments(self.patchify(video), chunked, rng)

  def patch_moments(self, x, *, chunked=True, rng=None):
    """`moments` of an already patchified video (diffusers' tiled_encode tiles after patchify)."""
    self._check_encode(x.shape, self.spatial_factor // self.patch_size, 'patchified video')
    return self._moments(x, chunked, rng)

  def _check_encode(self, shape, spatial, what):
    f = self.temporal_factor
    if (shape[1] - 1) % f or shape[2] % spatial or shape[3] % spatial:
      raise ValueError(f'encode needs T = 1 + {f}k frames and H, W multiples of {spatial}; got '
                       f'{what} of shape {shape}')

  def _moments(self, x, chunked, rng):
    x = x.astype(self.dtype)
    if not chunked or x.shape[1] == 1:
      out, _ = self.encoder(x, None, rng)
    else:
      out = _scan_chunks(self.encoder, x, self.temporal_factor, 1)
    return self.quant_conv(out)[0].astype(jnp.float32)

  # ----- decode ---------------------------------------------------------------------------------

  def decode(self, z, *, chunked=True, clamp=True, rng=None):
    """z [B, T', h, w, z_dim] (unnormalised) -> video [B, 1 + temporal_factor (T' - 1), H, W, C].

    chunked: one latent frame at a time under a scan. clamp: to [-1, 1] like diffusers (training
    leaves it off so the gradient does not vanish outside the range).
    """
    out = self.unpatchify(self.decode_patches(z, chunked=chunked, rng=rng))
    return jnp.clip(out, -1.0, 1.0) if clamp else out

  def decode_patches(self, z, *, chunked=True, rng=None):
    """The decoder's output before unpatchify, unclamped float32 (diffusers' tiled_decode blends
    tiles in this space)."""
    if z.ndim != 5 or z.shape[-1] != self.z_dim:
      raise ValueError(f'decode needs latents [B, T, h, w, {self.z_dim}], got shape {z.shape}')
    x = self.post_quant_conv(z.astype(self.dtype))[0]
    if not chunked or x.shape[1] == 1:
      out, _ = self.decoder(x, None, rng)
    else:
      out = _scan_chunks(self.decoder, x, 1, self.temporal_factor)
    return out.astype(jnp.float32)

  # ----- spatial tiling -------------------------------------------------------------------------

  def encode_tiled(self, video, *, tile=(256, 256), stride=(192, 192)):
    """Chunked encode of overlapping spatial tiles, blended like diffusers' tiled_encode.
    Under one jit all tiles are in one program; `tiled_moments` with a jitted per-tile function
    (what interop.wan_vae does) runs them one after another.

    As diffusers, tiles are cut from the patchified video, so with patch_size p `tile` / `stride`
    count patchified pixels (p video pixels each); without it, video pixels."""
    return split_moments(tiled_moments(self.patch_moments, self.patchify(video),
                                       self.spatial_factor // self.patch_size, tile, stride))

  def decode_tiled(self, z, *, tile=(256, 256), stride=(192, 192), clamp=True):
    """Chunked decode of overlapping latent tiles (sizes given in video pixels), as diffusers'
    tiled_decode: with patch_size p the tiles are blended before unpatchify, over
    (tile - stride) / p patchified pixels."""
    out = self.unpatchify(tiled_decode_patches(self.decode_patches, z, self.spatial_factor,
                                               self.patch_size, tile, stride))
    return jnp.clip(out, -1.0, 1.0) if clamp else out

  # ----- training -------------------------------------------------------------------------------

  def __call__(self, video, rng):
    """Full-sequence training pass: (recon (unclamped), mean, logvar); z ~ posterior via rng."""
    rng_z, rng_enc, rng_dec = jax.random.split(rng, 3)
    mean, logvar = self.encode(video, chunked=False, rng=rng_enc)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng_z, mean.shape)
    return self.decode(z, chunked=False, clamp=False, rng=rng_dec), mean, logvar

  # ----- latent normalisation (what the Wan pipelines apply around the DiT) ---------------------

  def latent_stats(self):
    """(latents_mean, latents_std) as float32 numpy [z_dim]; ValueError if the config has none."""
    if self.latents_mean is None or self.latents_std is None:
      raise ValueError('This VAE config has no latents_mean / latents_std')
    if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
      raise ValueError(f'latents_mean / latents_std have {len(self.latents_mean)} / '
                       f'{len(self.latents_std)} entries, z_dim is {self.z_dim}')
    return np.asarray(self.latents_mean, np.float32), np.asarray(self.latents_std, np.float32)

  _stats = latent_stats  # the name sora_jax/inference/frozen.py calls

  def normalize_latents(self, z):
    """VAE latents -> the DiT's space: (z - latents_mean) / latents_std (per channel, last axis)."""
    mean, std = self.latent_stats()
    return (z - mean) / std

  def denormalize_latents(self, z):
    """DiT-space latents -> VAE latents: z * latents_std + latents_mean."""
    mean, std = self.latent_stats()
    return z * std + mean


def vae_loss(model: CausalVAE, video, rng, *, kl_weight=1e-6, l1_weight=1.0, l2_weight=0.0):
  """Reconstruction (L1 + L2, mean per pixel) + kl_weight * KL(q(z|x) || N(0, I)) (summed over a
  latent frame's elements and averaged over latent frames and batch, as diffusers' kl() per image).

  No perceptual (LPIPS) or adversarial term. Returns (loss, metrics).
  """
  recon, mean, logvar = model(video, rng)
  diff = recon - video.astype(jnp.float32)
  l1, l2 = jnp.mean(jnp.abs(diff)), jnp.mean(diff * diff)
  kl = 0.5 * jnp.sum(mean * mean + jnp.exp(logvar) - 1.0 - logvar, axis=(2, 3, 4)).mean()
  loss = l1_weight * l1 + l2_weight * l2 + kl_weight * kl
  psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(l2, 1e-10))  # peak-to-peak range 2 in [-1, 1]
  return loss, dict(loss=loss, l1=l1, l2=l2, kl=kl, psnr=psnr)

"""CLIP ViT vision tower (transformers' `CLIPVisionModel`) in Flax NNX: Wan 2.1 I2V's image encoder.

Same computation as transformers/models/clip/modeling_clip.py, so the released weights load unchanged
(sora_jax/interop/clip_vision.py maps them):
  patch embedding: Conv2d, kernel = stride = patch, no bias, done as a patch reshape + linear (same
    token order: (h, w) row-major; features (ph, pw, c));
  tokens [class; patches] + a learned position embedding -> pre_layrnorm;
  N pre-norm layers: x += out_proj(attention(LN1(x))); x += fc2(act(fc1(LN2(x)))) (biases everywhere,
    scale 1/sqrt(head_dim), every token attends to every token);
  hidden_states[i]: the stream after i layers (hidden_states[0]: after pre_layrnorm);
  pooler_output: post_layernorm of the last layer's class token.
Wan conditions on hidden_states[-2], the stream after N-1 of the N layers, without a final norm
(diffusers' WanImageToVideoPipeline.encode_image; the original Wan code's `use_31_block`): for
ViT-H/14 at 224 x 224, [B, 257, 1280].

Precision as the other models here: parameters float32 by default, matmuls in `dtype`, the residual
stream and layer norms float32. Layers are stacked on a leading 'layers' axis and run by
`jax.lax.scan`; asking for hidden_states[i] runs only the first i layers.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.config import schema
from sora_jax.models import dit
from sora_jax.parallel import attention, sharding

# transformers' ACT2FN names CLIP configs use.
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of a transformers CLIPVisionConfig that shape the forward pass (same names).
  Defaults: ViT-H/14 at 224 x 224, the image encoder of Wan 2.1 I2V (open_clip's LAION ViT-H/14)."""
  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_hidden_layers: int = 32
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    for name in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                 'num_channels', 'image_size', 'patch_size'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'CLIPVisionConfig.{name}={getattr(self, name)!r} must be a positive '
                         'integer')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by num_attention_heads='
                       f'{self.num_attention_heads}')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size={self.image_size} is not divisible by patch_size='
                       f'{self.patch_size}')
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'hidden_act={self.hidden_act!r}: expected one of {sorted(ACTIVATIONS)}')

  @property
  def num_positions(self) -> int:
    """Tokens per image: the class token and (image_size / patch_size)^2 patches (257 for ViT-H/14)."""
    return (self.image_size // self.patch_size) ** 2 + 1


def _linear(din, dout, axes, *, rngs, dtype, param_dtype, use_bias=True):
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]))


def _param(init, shape, axes, *, rngs, param_dtype):
  return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, param_dtype))


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis, computed in float32."""

  def __init__(self, width, eps, *, rngs, param_dtype, axis_name='embed'):
    self.eps = eps
    self.scale = _param(nnx.initializers.ones_init(), (width,), (axis_name,), rngs=rngs,
                        param_dtype=param_dtype)
    self.bias = _param(nnx.initializers.zeros_init(), (width,), (axis_name,), rngs=rngs,
                       param_dtype=param_dtype)

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class CLIPLayer(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, *, rngs, dtype, param_dtype, attention_impl):
    d = cfg.hidden_size
    self.num_heads, self.dtype, self.attention_impl = cfg.num_attention_heads, dtype, attention_impl
    self.activation = cfg.hidden_act
    lin = lambda a, b, axes: _linear(a, b, axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.q_proj = lin(d, d, ('embed', 'heads'))
    self.k_proj = lin(d, d, ('embed', 'heads'))
    self.v_proj = lin(d, d, ('embed', 'heads'))
    self.out_proj = lin(d, d, ('heads', 'embed'))
    self.layer_norm2 = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)
    self.fc1 = lin(d, cfg.intermediate_size, ('embed', 'mlp'))
    self.fc2 = lin(cfg.intermediate_size, d, ('mlp', 'embed'))

  def __call__(self, x):
    """x [B, L, D] float32 residual stream."""
    b, n, _ = x.shape
    h = self.layer_norm1(x).astype(self.dtype)
    heads = lambda y: y.reshape(b, n, self.num_heads, -1)
    q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
    q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
    out = attention.attention(q, k, v, impl=self.attention_impl)
    x = x + self.out_proj(out.reshape(b, n, -1)).astype(jnp.float32)
    h = ACTIVATIONS[self.activation](self.fc1(self.layer_norm2(x).astype(self.dtype)))
    h = sharding.constrain(h, ('batch', 'length', 'act_mlp'))
    x = x + self.fc2(h).astype(jnp.float32)
    return sharding.constrain(x, ('batch', 'length', 'act_embed'))


class CLIPVisionModel(nnx.Module):
  """CLIP vision tower: images [B, S, S, C] (channels-last, normalised as CLIPImageProcessor does:
  sora_jax.interop.clip_vision.CLIPImageProcessor) -> hidden states [B, 1 + (S/p)^2, D] float32.

  attention_impl: the attention backend (parallel/attention.py; 'auto' picks per platform and
  length, 'xla' always the plain softmax). remat: as dit.VideoDiT, for training through the tower.
  """

  def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, scan_layers=True, remat='none', attention_impl='auto'):
    if remat != 'none' and remat not in dit.REMAT_POLICIES:
      raise ValueError(f'remat={remat!r}: expected one of none, {", ".join(dit.REMAT_POLICIES)}')
    attention_impl = 'xla' if attention_impl is None else attention_impl
    if attention_impl not in schema.ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={attention_impl!r}: expected one of '
                       f'{schema.ATTENTION_IMPLS}')
    cfg = self.config = config
    self.dtype, self.scan_layers, self.remat = dtype, scan_layers, remat
    d, p = cfg.hidden_size, cfg.patch_size
    self.patch_embedding = _linear(p * p * cfg.num_channels, d, ('patch', 'embed'), rngs=rngs,
                                   dtype=dtype, param_dtype=param_dtype, use_bias=False)
    self.class_embedding = _param(nnx.initializers.normal(d ** -0.5), (d,), ('embed',), rngs=rngs,
                                  param_dtype=param_dtype)
    self.position_embedding = _param(nnx.initializers.normal(0.02), (cfg.num_positions, d),
                                     (None, 'embed'), rngs=rngs, param_dtype=param_dtype)
    self.pre_layrnorm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_layers(rngs):
      return CLIPLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                       attention_impl=attention_impl)

    self.layers = make_layers(rngs)
    self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, pixel_values, *, hidden_layer=-2):
    """transformers' `hidden_states[hidden_layer]` (output_hidden_states=True): -2 (default) is
    what Wan conditions on, -1 the last_hidden_state, 0 the embeddings after pre_layrnorm."""
    n = self.config.num_hidden_layers
    if not -(n + 1) <= hidden_layer <= n:
      raise ValueError(f'hidden_layer={hidden_layer}: a {n}-layer tower has hidden states '
                       f'0..{n} (or -{n + 1}..-1)')
    return self._layers(self.embed(pixel_values), hidden_layer % (n + 1))

  def pooled_output(self, pixel_values):
    """transformers' `pooler_output`: post_layernorm of the last layer's class token [B, D]."""
    x = self._layers(self.embed(pixel_values), self.config.num_hidden_layers)
    return self.post_layernorm(x[:, 0])

  def embed(self, pixel_values):
    """[B, S, S, C] -> hidden_states[0] [B, 1 + P, D] float32."""
    cfg = self.config
    s, p, c = cfg.image_size, cfg.patch_size, cfg.num_channels
    if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s, s, c):
      raise ValueError(f'pixel_values must be [B, {s}, {s}, {c}] (channels-last, preprocessed to '
                       f'the model image_size {s}), got {pixel_values.shape}')
    b, g = pixel_values.shape[0], s // p
    patches = pixel_values.astype(self.dtype).reshape(b, g, p, g, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
    x = self.patch_embedding(patches).astype(jnp.float32)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(jnp.float32)
    return sharding.constrain(self.pre_layrnorm(x), ('batch', 'length', 'act_embed'))

  def _layers(self, x, count):
    """The first `count` layers applied to x."""
    if count == 0:
      return x
    layers = self.layers
    if count < self.config.num_hidden_layers:
      graphdef, params = nnx.split(layers)
      layers = nnx.merge(graphdef, jax.tree.map(lambda p: p[:count], params))
    return dit.run_blocks(layers, x, remat=self.remat, scan_layers=self.scan_layers)


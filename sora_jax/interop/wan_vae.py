"""Load a diffusers Wan 2.1 / 2.2 `AutoencoderKLWan` into sora_jax.models.vae.CausalVAE (no torch).

A folder holds config.json and diffusion_pytorch_model.safetensors (or shards listed by its
.index.json); a pipeline folder (its parent, with a vae/ subfolder) works too. Tensors are read with
safetensors' numpy API (bfloat16 included, via ml_dtypes). Our module tree mirrors diffusers'
names, so the name table is a rule (`diffusers_key`: 'kernel' -> 'weight', a Resample's conv
'resample' -> 'resample.1', the nn.Sequential slot; Wan 2.2's residual stages are diffusers'
`down_blocks.i.{resnets.j, downsampler}` / `up_blocks.i.{resnets.j, upsampler}`, their AvgDown3D /
DupUp3D shortcuts have no weights); every checkpoint key must be consumed and every
model parameter assigned, or the error lists what is missing / unexpected. PyTorch's NC(T)HW conv
weights are transposed to channels-last kernels as they are read.

  vae = load_wan_vae('Wan2.1-T2V-1.3B-Diffusers')        # or the .../vae folder itself
  mean = vae.encode(video)      # [B, T, H, W, 3] in [-1, 1] -> [B, 1 + (T-1)/4, H/8, W/8, 16]
  video = vae.decode(mean)      # -> [B, T, H, W, 3] in [-1, 1]
  z = vae.model.normalize_latents(mean)  # the DiT's latent space (Wan pipelines)

Wan 2.2 (TI2V-5B's VAE folder: is_residual, patch_size 2, z_dim 48) loads the same way and
encodes to [B, 1 + (T-1)/4, H/16, W/16, 48] (`vae.spatial_factor` / `vae.temporal_factor`).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.interop import safetensors_io
from sora_jax.models import vae as vae_lib
from sora_jax.parallel import sharding

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'


def vae_dir(path: str) -> str:
  """The folder holding the VAE's config.json: `path` itself or `path/vae`."""
  for candidate in (path, os.path.join(path, 'vae')):
    if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
      return candidate
  raise FileNotFoundError(
      f'No Wan VAE at {path!r}: expected {CONFIG_NAME} there or in {os.path.join(path, "vae")!r} '
      '(a diffusers AutoencoderKLWan folder)')


def load_config(path: str) -> dict:
  """config.json as a dict; the class must be AutoencoderKLWan."""
  with open(os.path.join(vae_dir(path), CONFIG_NAME)) as f:
    config = json.load(f)
  cls = config.get('_class_name', 'AutoencoderKLWan')
  if cls != 'AutoencoderKLWan':
    raise ValueError(f'{path!r} holds a {cls}, not an AutoencoderKLWan')
  return config


def weight_files(path: str) -> dict[str, str]:
  """Checkpoint key -> safetensors file holding it (single file or sharded)."""
  return safetensors_io.weight_files(vae_dir(path), WEIGHTS_NAME)


# --------------------------------------------------------------------------- name mapping


def diffusers_key(path: tuple) -> str:
  """Our parameter path (('decoder', 'up_blocks', 0, 'upsamplers', 0, 'resample', 'kernel')) -> the
  diffusers state-dict key ('decoder.up_blocks.0.upsamplers.0.resample.1.weight')."""
  parts = [str(p) for p in path]
  parts[-1] = {'kernel': 'weight'}.get(parts[-1], parts[-1])
  return '.'.join(p if p != 'resample' else 'resample.1' for p in parts)


def convert(w: np.ndarray, target_ndim: int) -> np.ndarray:
  """PyTorch layout -> ours, by the target's rank: Conv3d [O, I, t, h, w] -> [t, h, w, I, O];
  Conv2d [O, I, h, w] -> [h, w, I, O]; RMS-norm gamma [C, 1, 1(, 1)] -> [C]; biases as they are."""
  if w.ndim == 5 and target_ndim == 5:
    return w.transpose(2, 3, 4, 1, 0)
  if w.ndim == 4 and target_ndim == 4:
    return w.transpose(2, 3, 1, 0)
  if target_ndim == 1:
    return w.reshape(-1)
  raise ValueError(f'No layout conversion from a rank-{w.ndim} tensor to a rank-{target_ndim} '
                   'parameter')


def check_keys(table: dict, checkpoint_keys) -> None:
  """table: our path -> diffusers key. Raises ValueError listing keys the model needs but the
  checkpoint lacks (missing) and checkpoint keys nothing consumes (unexpected)."""
  needed, present = set(table.values()), set(checkpoint_keys)
  missing, unexpected = needed - present, present - needed
  problems = []
  if missing:
    problems.append(f'missing keys ({len(missing)}): {safetensors_io.listing(missing)}')
  if unexpected:
    problems.append(f'unexpected keys ({len(unexpected)}): {safetensors_io.listing(unexpected)}')
  if problems:
    raise ValueError('Wan VAE checkpoint does not match the model from config.json: '
                     + '; '.join(problems))


def load_vae_params(path: str, model: vae_lib.CausalVAE, mesh=None) -> vae_lib.CausalVAE:
  """`model` (concrete, or abstract from nnx.eval_shape) with the checkpoint's weights; a new model
  whose parameters take the model's parameter dtype. With `mesh`, each parameter is placed with the
  sharding of its logical axis names (sora_jax.parallel.sharding.RULES) as it is read."""
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  files = weight_files(path)
  table = {ours: diffusers_key(ours) for ours in flat}
  check_keys(table, files)
  shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh))) if mesh else {}

  with safetensors_io.reader(files) as read:
    for ours, key in table.items():
      variable = flat[ours]
      raw = read(key)
      value = convert(raw, len(variable.shape))
      if value.shape != tuple(variable.shape):
        raise ValueError(f'Shape mismatch for {key} -> {"/".join(map(str, ours))}: checkpoint '
                         f'gives {raw.shape} (-> {value.shape}), the model from config.json '
                         f'expects {tuple(variable.shape)}')
      value = value.astype(variable.dtype)
      if ours in shardings:
        target = shardings[ours].get_value()
        value = jax.make_array_from_callback(value.shape, target, lambda idx, v=value: v[idx])
      else:
        value = jnp.asarray(value)
      flat[ours] = variable.replace(value)
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


# --------------------------------------------------------------------------- inference wrapper


class WanVAE:
  """Jitted chunked encode / decode with loaded weights (diffusers semantics, channels-last).

  encode(video [B, T, H, W, 3] in [-1, 1], T = 1 + 4k) -> latent mean [B, 1 + k, H/s, W/s, z]
  (s = spatial_factor, 8 for Wan 2.1 and 16 for Wan 2.2; unnormalised: diffusers'
  `vae.encode(x).latent_dist.mean`); decode(latents) -> video clamped to [-1, 1] (diffusers'
  `vae.decode(z).sample`). `model` is the trainable CausalVAE.
  `enable_tiling()` switches to diffusers' spatial tiling for frames larger than a tile: tiles are
  encoded / decoded one after another by a jitted per-tile function, then blended. As diffusers
  does, with patch_size p the encode tiles are cut after patchify (tile sizes count patchified
  pixels, p video pixels each) and the decode tiles are blended before unpatchify.
  """

  def __init__(self, model: vae_lib.CausalVAE, config: dict):
    self.model, self.config = model, config
    graphdef, self._state = nnx.split(model)
    self._moments = jax.jit(lambda state, x: nnx.merge(graphdef, state).moments(x))
    self._patch_moments = jax.jit(lambda state, x: nnx.merge(graphdef, state).patch_moments(x))
    self._decode = jax.jit(lambda state, z: nnx.merge(graphdef, state).decode(z, clamp=False))
    self._decode_patches = jax.jit(
        lambda state, z: nnx.merge(graphdef, state).decode_patches(z))
    self.use_tiling = False
    self.tile_sample_min_size, self.tile_sample_stride = (256, 256), (192, 192)

  def enable_tiling(self, tile_sample_min_height=None, tile_sample_min_width=None,
                    tile_sample_stride_height=None, tile_sample_stride_width=None):
    """As diffusers' AutoencoderKLWan.enable_tiling (defaults: 256-pixel tiles every 192)."""
    (h, w), (sh, sw) = self.tile_sample_min_size, self.tile_sample_stride
    self.tile_sample_min_size = (tile_sample_min_height or h, tile_sample_min_width or w)
    self.tile_sample_stride = (tile_sample_stride_height or sh, tile_sample_stride_width or sw)
    self.use_tiling = True

  def disable_tiling(self):
    self.use_tiling = False

  @property
  def spatial_factor(self) -> int:
    """Video pixels per latent pixel (diffusers' scale_factor_spatial: 8, or 16 for Wan 2.2)."""
    return self.model.spatial_factor

  @property
  def temporal_factor(self) -> int:
    """Video frames per latent frame after the first (diffusers' scale_factor_temporal)."""
    return self.model.temporal_factor

  def encode(self, video):
    video = jnp.asarray(video)
    c = self.model.video_channels
    if video.ndim != 5 or video.shape[-1] != c:
      raise ValueError(f'encode needs video [B, T, H, W, {c}] (channels-last), got shape '
                       f'{video.shape}')
    tile = self.tile_sample_min_size
    if self.use_tiling and (video.shape[2] > tile[0] or video.shape[3] > tile[1]):
      m = self.model
      moments = vae_lib.tiled_moments(lambda x: self._patch_moments(self._state, x),
                                      m.patchify(video), m.spatial_factor // m.patch_size, tile,
                                      self.tile_sample_stride)
    else:
      moments = self._moments(self._state, video)
    return vae_lib.split_moments(moments)[0]

  def decode(self, latents):
    latents = jnp.asarray(latents)
    m = self.model
    s = m.spatial_factor
    tile = self.tile_sample_min_size
    if self.use_tiling and (latents.shape[2] > tile[0] // s or latents.shape[3] > tile[1] // s):
      out = m.unpatchify(vae_lib.tiled_decode_patches(
          lambda z: self._decode_patches(self._state, z), latents, s, m.patch_size, tile,
          self.tile_sample_stride))
    else:
      out = self._decode(self._state, latents)
    return jnp.clip(out, -1.0, 1.0)

  def normalize_latents(self, z):
    return self.model.normalize_latents(z)

  def denormalize_latents(self, z):
    return self.model.denormalize_latents(z)


def load_wan_vae(path: str, dtype=jnp.float32, *, param_dtype=jnp.float32, mesh=None) -> WanVAE:
  """Builds CausalVAE from `path`'s config.json (abstractly, no random init) and loads its weights.
  `dtype`: compute dtype; `param_dtype`: storage dtype of the parameters."""
  abstract = abstract_wan_vae(path, dtype, param_dtype=param_dtype)
  return WanVAE(load_vae_params(path, abstract, mesh=mesh), load_config(path))


def abstract_wan_vae(path: str, dtype=jnp.float32, *, param_dtype=jnp.float32):
  """The CausalVAE `path`'s config.json describes, with shapes but no weights (nnx.eval_shape)."""
  kwargs = vae_lib.config_from_dict(load_config(path))
  with nnx.use_eager_sharding(False):  # placed from the logical-axis metadata, not at creation
    return nnx.eval_shape(lambda: vae_lib.CausalVAE(
        **kwargs, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))

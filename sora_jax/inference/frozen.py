"""The frozen parts around a trained diffusion model: a video autoencoder and a pretrained text encoder.

`Frozen(config, mesh)` loads what the config names onto `mesh`:
  - `config.autoencoder`: the model diffuses in this VAE's latent space. Training encodes each batch
    (the posterior mean, normalised per channel); sampling decodes the generated latents.
  - `config.text.encoder='umt5'`: captions become UMT5 embeddings before the train step, so the DiT
    takes embeddings instead of byte tokens (the byte encoder is part of the trained model instead).
  - `config.image_encoder` (Wan 2.1 image-to-video, model.wan.image_dim > 0): the CLIP ViT image
    encoder; each clip's first frame becomes CLIP tokens ('image_embeds') and, through the VAE, the
    frame mask + first-frame latents ('image_condition') before the train step (Wan 2.2 I2V-A14B,
    model.wan.image_condition: 'image_condition' only).
  - Wan 2.2 A14B sampling: the partner of the run's expert (`expert_partner`, loaded on first use).
Their weights are arguments of their own jitted functions, never part of the train state (no optimizer
moments, no EMA, no checkpoint bloat), and never baked into a compiled program as constants.
They are placed once, FSDP-sharded by their logical axis names (umT5-XXL is 11 GB in bf16: on one
device, or moved onto the mesh at every call, it does not fit beside the DiT), and the jitted
functions take them and the batches with explicit shardings.
"""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import pipeline
from sora_jax.common import tokenizers
from sora_jax.config import geometry
from sora_jax.inference import restore
from sora_jax.interop import umt5
from sora_jax.models import wan
from sora_jax.parallel import sharding
from sora_jax.training import factory


class Frozen:

  def __init__(self, config, mesh=None):
    """`mesh`: where the encoders' weights live and batches are split (the train step's or the
    sampler's mesh; default `restore.inference_mesh()`, all devices on fsdp)."""
    self.config = config
    self.mesh = restore.inference_mesh() if mesh is None else mesh
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = NamedSharding(self.mesh, P())
    self._rows = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    self.vae = self.vae_params = vae_sh = None
    if config.autoencoder:
      self.vae, self.vae_params, self.latent_mean, self.latent_std = load_autoencoder(
          config.autoencoder, self.mesh)
      vae_sh = jax.tree.map(lambda x: x.sharding, self.vae_params)
    self.text_encoder = self.text_params = self.tokenizer = text_sh = None
    if config.text.encoder == 'umt5':
      with _on_host():  # read into host memory, then each device gets only its slice
        module = umt5.load_umt5_module(config.text.path, dtype=jnp.dtype(config.model.dtype))
        self.text_encoder, params = nnx.split(module)
      text_sh = sharding.state_shardings(params, self.mesh)
      self.text_params = restore.place(params, text_sh)
      self.tokenizer = tokenizers.load_umt5_tokenizer(config.text.path)
    # Wan 2.1 image-to-video: the CLIP image encoder (and the VAE) condition every clip on its
    # first frame, computed here before the train step like the other frozen encodings.
    self.image_encoder = self.image_params = self.image_processor = image_sh = None
    self._i2v, self._partner = factory.wan_i2v(config), None
    if factory.wan_clip(config):
      from sora_jax.interop import clip_vision  # pylint: disable=g-import-not-at-top
      with _on_host():
        module = clip_vision.load_clip_vision_model(config.image_encoder,
                                                    dtype=jnp.dtype(config.model.dtype))
        self.image_encoder, params = nnx.split(module)
      image_sh = sharding.state_shardings(params, self.mesh)
      self.image_params = restore.place(params, image_sh)
      self.image_processor = clip_vision.load_clip_image_processor(config.image_encoder)
    self._encode_image = self._jit(self._encode_image_impl, image_sh)
    self._image_latents = self._jit(self._image_latents_impl, vae_sh)
    self._encode_video = self._jit(self._encode_video_impl, vae_sh)
    self._encode_mean = self._jit(self._encode_mean_impl, vae_sh)
    self._normalize = self._jit(lambda _, mean: self._normalize_impl(mean), None)
    self._decode_video = self._jit(self._decode_video_impl, vae_sh)
    self._encode_text = self._jit(self._encode_text_impl, text_sh)
    self._cached_text = self._jit(lambda _, e, m: self._cached_text_impl(e, m), None)

  def _jit(self, impl, params_sh):
    """impl(params, *batch) jitted with explicit shardings: the params where they were placed, the
    batch arrays and outputs split over data x fsdp, or replicated when their rows do not divide
    (one caption, a last partial batch). One compiled program per placement."""
    compiled = {}

    def call(params, *batch):
      split = all(x.shape[0] % self._rows == 0 for x in batch)
      sh = self.batch_sharding if split else self.replicated
      if split not in compiled:
        compiled[split] = jax.jit(impl, in_shardings=(params_sh, *(sh,) * len(batch)),
                                  out_shardings=sh)
      return compiled[split](params, *jax.device_put(batch, sh))
    return call

  def expert_partner(self):
    """Wan 2.2 A14B: the parameters of the expert this run does not train (the other of its
    pipeline folder), loaded on first use onto the mesh in config.model.dtype (bf16 halves it), and
    kept: sampling switches to it at the boundary (sora_jax/inference/experts.py). Call it outside
    a jax.set_mesh block (sampling.make_generate does)."""
    if self._partner is None:
      from sora_jax.inference import experts  # pylint: disable=g-import-not-at-top
      self._partner = experts.load_partner(self.config, self.mesh)
    return self._partner

  # ---- captions
  def tokenize(self, captions):
    """Captions -> (tokens [B, L] int32, mask [B, L] bool), numpy, host side."""
    if self.tokenizer is None:
      return tokenizers.tokenize(captions, self.config.text.max_length)
    return self.tokenizer.tokenize(captions, self.config.text.max_length)

  def caption_inputs(self, tokens, mask):
    """What the model takes as its caption: the tokens, or the frozen encoder's embeddings."""
    if self.text_encoder is None:
      return tokens, mask
    return self._encode_text(self.text_params, tokens, mask)

  def null_caption(self):
    """The empty caption (classifier-free guidance's unconditional input) as the model takes it."""
    tokens, mask = self.tokenize([''])
    return self.caption_inputs(jnp.asarray(tokens), jnp.asarray(mask))

  def _encode_text_impl(self, params, tokens, mask):
    return encode_text(self.text_encoder, params, tokens, mask)

  def _cached_text_impl(self, embeddings, mask):
    mask = mask.astype(bool)
    return embeddings.astype(jnp.float32) * mask[..., None], mask

  # ---- video
  def encode_batch(self, batch, sharding=None):
    """A training batch of pixels/tokens -> what the model trains on (latents / embeddings), placed
    on `sharding` (the train step's batch sharding) when given.

    Batches from shards prepared with --cache_latents / --cache_text (data_pipelines/prepare.py)
    arrive half done: 'latents' (unnormalised posterior means) are only normalised, and
    'text_embeddings' / 'text_mask' are the caption as they are (padded rows zeroed). The result
    has the same keys either way: 'video', 'tokens', 'mask'.
    """
    cached = {'latents', 'text_embeddings'} & set(batch)
    if self.vae is None and self.text_encoder is None and not cached:
      return batch
    batch = dict(batch)
    if self._i2v:
      if 'video' not in batch:
        raise ValueError('Wan image-to-video training encodes each clip\'s first frame (CLIP tokens'
                         ' and VAE latents) from its pixels: data prepared with --cache_latents is'
                         ' not supported for it; prepare the data without --cache_latents.')
      batch['image_condition'], embeds = self.image_condition(batch['video'])
      if embeds is not None:
        batch['image_embeds'] = embeds
    if 'latents' in batch:
      if self.vae is None:
        raise ValueError('The batch holds cached latents (data prepared with --cache_latents) but'
                         ' config.autoencoder is empty: set it to the autoencoder they came from.')
      batch['video'] = self._normalize(None, batch.pop('latents'))
    elif self.vae is not None:
      batch['video'] = self._encode_video(self.vae_params, batch['video'])
    if 'text_embeddings' in batch:
      if self.text_encoder is None:
        raise ValueError('The batch holds cached caption embeddings (data prepared with'
                         " --cache_text) but config.text.encoder is not 'umt5'.")
      batch['tokens'], batch['mask'] = self._cached_text(None, batch.pop('text_embeddings'),
                                                         batch.pop('text_mask'))
    elif self.text_encoder is not None:
      batch['tokens'], batch['mask'] = self.caption_inputs(batch['tokens'], batch['mask'])
    return batch if sharding is None else jax.device_put(batch, sharding)

  def image_condition(self, video, images=None):
    """Wan 2.1 image-to-video conditioning of clips `video` [B, T, H, W, 3] (pixels in [-1, 1]):
    (condition [B, t, h, w, 4 + C]: the frame mask and the normalised VAE latents of [first frame,
    zero frames], as WanImageToVideoPipeline.prepare_latents builds them; image_embeds
    [B, 1 + P, D]: the CLIP tokens, hidden_states[-2], of the preprocessed first frame, or of
    `images` (uint8 [H, W, 3] each, any size: the image as given, as the pipeline encodes it))."""
    if not self._i2v:
      raise ValueError('This run is not Wan image-to-video (config.model.wan.image_dim = 0,'
                       ' image_condition False).')
    condition = self._image_latents(self.vae_params, video)
    if self.image_encoder is None:  # Wan 2.2 I2V-A14B: no CLIP tokens
      return condition, None
    if images is None:
      first = video[:, 0]
      if isinstance(first, jax.Array) and not first.is_fully_addressable:
        first = multihost_utils.process_allgather(first, tiled=True)
      # Back to the uint8 pixels (exact: the pipelines' x / 127.5 - 1 of integers).
      first = np.asarray(first, np.float32)
      images = list(np.clip(np.round((first + 1.0) * 127.5), 0, 255).astype(np.uint8))
    pixels = self.image_processor(images)
    return condition, self._encode_image(self.image_params, jnp.asarray(pixels))

  def _image_latents_impl(self, params, video):
    first_only = jnp.where((jnp.arange(video.shape[1]) == 0)[None, :, None, None, None], video, 0.0)
    return wan.i2v_condition(self._encode_video_impl(params, first_only))

  def _encode_image_impl(self, params, pixel_values):
    hidden = nnx.merge(self.image_encoder, params)(pixel_values, hidden_layer=-2)
    return hidden.astype(jnp.float32)

  def encode(self, video):
    """Pixels [B, T, H, W, 3] in [-1, 1] -> model space: normalised latents (identity without an
    autoencoder)."""
    if self.vae is None:
      return video
    return self._encode_video(self.vae_params, video)

  def encode_video_mean(self, video):
    """Pixels [B, T, H, W, 3] in [-1, 1] -> the autoencoder's posterior mean, unnormalised (what
    prepare --cache_latents stores: the normalisation stays with the config that trains on it)."""
    return self._encode_mean(self.vae_params, video)

  def decode(self, latents):
    """Model-space videos -> pixels in [-1, 1] (identity without an autoencoder)."""
    if self.vae is None:
      return latents
    return self._decode_video(self.vae_params, latents)

  def _encode_video_impl(self, params, video):
    return encode_video(self.vae, params, video, self.latent_mean, self.latent_std)

  def _encode_mean_impl(self, params, video):
    return nnx.merge(self.vae, params).encode(video)[0]

  def _normalize_impl(self, mean):
    return (mean.astype(jnp.float32) - self.latent_mean) / self.latent_std

  def _decode_video_impl(self, params, latents):
    z = latents * self.latent_std + self.latent_mean
    return jnp.clip(nnx.merge(self.vae, params).decode(z), -1.0, 1.0)


def encode_text(graphdef, params, tokens, mask):
  """Caption tokens -> the text encoder's embeddings, padded positions zeroed (what the Wan
  pipeline feeds its DiT)."""
  embeddings = nnx.merge(graphdef, params)(tokens, mask)
  return embeddings * mask[..., None].astype(embeddings.dtype), mask


def encode_video(graphdef, params, video, mean, std):
  """Pixels -> the autoencoder's posterior mean, normalised per channel."""
  z = nnx.merge(graphdef, params).encode(video)[0]
  return (z.astype(jnp.float32) - mean) / std


def abstract_encode_steps(config, mesh, bucket):
  """[(name, jitted step, abstract arguments)] of the frozen encoders for one batch of `bucket`
  as training runs them, from their architectures alone (no weights: ahead-of-time compilation)."""
  from sora_jax.interop import wan_vae  # pylint: disable=g-import-not-at-top
  batch_sh = sharding.batch_sharding(mesh)
  b = bucket.batch_size
  spec = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  out = []
  if config.text.encoder == 'umt5':
    graphdef, params = nnx.split(umt5.abstract_umt5_module(
        config.text.path, dtype=jnp.dtype(config.model.dtype)))
    params_sh = sharding.state_shardings(params, mesh)
    length = config.text.max_length
    step = jax.jit(lambda p, t, m, g=graphdef: encode_text(g, p, t, m),
                   in_shardings=(params_sh, batch_sh, batch_sh), out_shardings=batch_sh)
    out.append((f'text encoder (umT5) batch {b}x{length}', step,
                (spec(params, params_sh), jax.ShapeDtypeStruct((b, length), jnp.int32),
                 jax.ShapeDtypeStruct((b, length), jnp.bool_))))
  if config.autoencoder:
    if os.path.isfile(os.path.join(config.autoencoder, 'config.json')) and _is_workdir(
        config.autoencoder):
      raise ValueError('Ahead-of-time compilation of a sora_jax autoencoder workdir is not'
                       ' supported; point config.autoencoder at a diffusers AutoencoderKLWan folder.')
    graphdef, params = nnx.split(wan_vae.abstract_wan_vae(config.autoencoder))
    params_sh = sharding.state_shardings(params, mesh)
    z = geometry.autoencoder_geometry(config.autoencoder)['z_dim']
    stats = jnp.zeros((z,), jnp.float32)  # values do not matter to the compiler
    step = jax.jit(lambda p, v, g=graphdef: encode_video(g, p, v, stats, stats + 1.0),
                   in_shardings=(params_sh, batch_sh), out_shardings=batch_sh)
    out.append((f'autoencoder encode batch {b}x{"x".join(map(str, bucket.shape))}', step,
                (spec(params, params_sh),
                 jax.ShapeDtypeStruct((b, *bucket.shape, 3), jnp.float32))))
  if factory.wan_clip(config):  # the CLIP tower over each clip's preprocessed first frame
    from sora_jax.interop import clip_vision  # pylint: disable=g-import-not-at-top
    clip = clip_vision.load_clip_vision_config(config.image_encoder)
    graphdef, params = nnx.split(clip_vision.abstract_clip_vision_model(
        clip, dtype=jnp.dtype(config.model.dtype)))
    params_sh = sharding.state_shardings(params, mesh)
    step = jax.jit(lambda p, x, g=graphdef: nnx.merge(g, p)(x, hidden_layer=-2).astype(jnp.float32),
                   in_shardings=(params_sh, batch_sh), out_shardings=batch_sh)
    out.append((f'image encoder (CLIP) batch {b}x{clip.image_size}x{clip.image_size}', step,
                (spec(params, params_sh),
                 jax.ShapeDtypeStruct((b, clip.image_size, clip.image_size, 3), jnp.float32))))
  return out


def load_autoencoder(path: str, mesh=None):
  """(graphdef, params, latent mean [z], latent std [z]) of a sora_jax 'vae' workdir or a diffusers
  AutoencoderKLWan folder; with `mesh`, the params are FSDP-sharded on it by their logical axes.

  Latents are normalised per channel so the diffusion model sees roughly unit-variance inputs: Wan
  ships its statistics (latents_mean / latents_std); for our own VAE they are measured once on its
  training data and cached in the workdir (latent_stats.json).
  """
  if os.path.isfile(os.path.join(path, 'config.json')) and _is_workdir(path):
    vae_config, _, graphdef, params, _ = restore.load(path, mesh=mesh)
    mean, std = _latent_stats(path, vae_config, graphdef, params)
    return graphdef, params, mean, std
  from sora_jax.interop import wan_vae  # pylint: disable=g-import-not-at-top
  with _on_host():
    model = wan_vae.load_wan_vae(path).model
    mean, std = model.latent_stats()
    graphdef, params = nnx.split(model)
  if mesh is not None:
    params = restore.place(params, sharding.state_shardings(params, mesh))
  # Through numpy: the statistics may sit on the host CPU backend, the programs on accelerators.
  mean, std = (jnp.asarray(np.asarray(x), jnp.float32) for x in (mean, std))
  return graphdef, params, mean, std


def _on_host():
  """Arrays made inside go to host memory (the CPU backend) when there is one beside the
  accelerators; else to the default device, as before."""
  try:
    return jax.default_device(jax.devices('cpu')[0])
  except RuntimeError:
    return contextlib.nullcontext()


def _is_workdir(path):
  with open(os.path.join(path, 'config.json')) as f:
    return 'model' in json.load(f)


def _latent_stats(workdir, vae_config, graphdef, params, num_clips: int = 64):
  cache = os.path.join(workdir, 'latent_stats.json')
  if os.path.exists(cache):
    with open(cache) as f:
      stats = json.load(f)
    return jnp.asarray(stats['mean'], jnp.float32), jnp.asarray(stats['std'], jnp.float32)
  encode = jax.jit(lambda p, v: nnx.merge(graphdef, p).encode(v)[0])
  batch = min(num_clips, vae_config.eval.batch_size)
  latents = [np.asarray(encode(params, b['video']))
             for b in pipeline.eval_batches(vae_config, 'train', num_clips, batch)]
  z = np.concatenate(latents).reshape(-1, latents[0].shape[-1])
  mean, std = z.mean(0), z.std(0) + 1e-6
  if jax.process_index() == 0:
    with open(cache, 'w') as f:
      json.dump({'mean': mean.tolist(), 'std': std.tolist(), 'num_clips': num_clips}, f)
  return jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)


def model_video_shape(config) -> tuple[int, int, int, int]:
  """[T, H, W, C] of the default clip as the diffusion model sees it."""
  return (*geometry.model_clip_shape(config), factory.channels(config))

"""The jitted train step and the abstract batches it takes, one per bucket: compiled at start-up by
sora_jax/train.py (so no host stalls mid-run when the random plan first reaches a bucket) and for a
target topology by `python -m sora_jax.compile`, from the same functions.
"""

import os

import jax
import jax.numpy as jnp

from sora_jax.config import buckets as buckets_lib
from sora_jax.config import geometry
from sora_jax.models import wan
from sora_jax.parallel import sharding
from sora_jax.training import factory, update


def caption_spec(config, batch_size: int, text_dtype=jnp.float32):
  """(tokens, mask) as the train step takes them: byte tokens, or a frozen encoder's embeddings
  (`text_dtype`: what the encoder returns)."""
  length = config.text.max_length
  mask = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)
  if config.text.encoder == 'umt5':
    return jax.ShapeDtypeStruct((batch_size, length, factory.text_width(config)), text_dtype), mask
  return jax.ShapeDtypeStruct((batch_size, length), jnp.int32), mask


def video_spec(config, bucket: buckets_lib.Bucket, pixel_dtype=jnp.uint8):
  """The bucket's clips as the train step takes them: latents (float32) with an autoencoder, else
  pixels as the pipelines deliver them (uint8, normalised inside the step)."""
  shape = bucket.shape
  if config.autoencoder:
    shape = geometry.latent_shape(shape, geometry.autoencoder_geometry(config.autoencoder))
  dtype = jnp.float32 if config.autoencoder else pixel_dtype
  return jax.ShapeDtypeStruct((bucket.batch_size, *shape, factory.channels(config)), dtype)


def batch_spec(config, bucket, *, text_dtype=jnp.float32, pixel_dtype=jnp.uint8) -> dict:
  """The abstract train-step batch of one bucket (one clip per row; not for packed sequences)."""
  if config.data.packing:
    raise ValueError('config.data.packing: the packed batch layout is not compiled ahead of time;'
                     ' its shapes come from the packer at run time.')
  tokens, mask = caption_spec(config, bucket.batch_size, text_dtype)
  batch = dict(video=video_spec(config, bucket, pixel_dtype))
  if config.model.family != 'vae':
    batch.update(tokens=tokens, mask=mask)
  if factory.wan_i2v(config):  # what frozen.Frozen.image_condition adds
    video = batch['video']
    batch.update(image_condition=jax.ShapeDtypeStruct(
        (*video.shape[:-1], video.shape[-1] + wan.I2V_MASK_CHANNELS), jnp.float32))
  if factory.wan_clip(config):
    from sora_jax.interop import clip_vision  # pylint: disable=g-import-not-at-top
    clip = clip_vision.load_clip_vision_config(config.image_encoder)
    batch.update(image_embeds=jax.ShapeDtypeStruct((bucket.batch_size, clip.num_positions,
                                                    clip.hidden_size), jnp.float32))
  return batch


def jit_train_step(graphdef, config, tx, schedule, null_caption, state_sh, mesh):
  """The train step jitted as the loop runs it: explicit shardings, the state donated."""
  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(update.make_train_step(graphdef, config, tx, schedule, null_caption),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=(0,))


def _key(batch) -> tuple:
  return tuple(sorted((k, tuple(v.shape), jnp.dtype(v.dtype).name) for k, v in batch.items()))


class BucketSteps:
  """The train step compiled for every bucket before the first step (a run, and every resume after a
  preemption, pays all compilations up front, once, instead of stalling every host whenever the
  random plan first reaches a bucket). A batch of another layout (packed sequences, cached caption
  embeddings of another dtype) goes through the jitted step as before."""

  def __init__(self, step, state, config, mesh, *, text_dtype=jnp.float32):
    self.step = step
    self.compiled = {}
    if config.data.packing:
      return
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
    with jax.set_mesh(mesh):  # traced as the loop traces it
      for bucket in buckets_lib.make(config, data_parallel):
        spec = batch_spec(config, bucket, text_dtype=text_dtype)
        self.compiled[_key(spec)] = step.lower(abstract, spec).compile()

  def __call__(self, state, batch):
    return self.compiled.get(_key(batch), self.step)(state, batch)


def enable_compilation_cache(path: str):
  """XLA's persistent compilation cache in `path` ('' leaves it off): a restarted or resumed run,
  and every host of a pod, loads its programs instead of compiling them again."""
  if path and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):  # the environment's wins
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

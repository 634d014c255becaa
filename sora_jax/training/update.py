"""The train step: one objective's loss and gradient, an AdamW update, the EMA. Pure; the train loop
(sora_jax/train.py) jits it with explicit shardings and a donated state."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sora_jax.common import tokenizers
from sora_jax.config import geometry
from sora_jax.training import factory
from sora_jax.training.objectives import (autoencoder, frame_conditioned,
                                          text_to_video, upscaler, wan_i2v)


def objective(config):
  """The objective module (training/objectives/) that trains `config`."""
  if config.model.family == 'vae':
    return autoencoder
  if factory.wan_i2v(config):
    return wan_i2v
  if geometry.upscale_enabled(config):
    return upscaler
  if geometry.conditioning_enabled(config):
    return frame_conditioned
  return text_to_video


def to_model_range(video):
  """uint8 pixels -> float32 in [-1, 1]; floats (latents, already-normalised pixels) pass. The
  pipelines keep video uint8 so the host holds and sends a quarter of the bytes; this runs on device,
  inside the jitted step.

  Centred first: 0 and 255 map to exactly -1 and 1 and the map is symmetric. XLA divides by a
  constant as a multiply by its reciprocal, so this is within 6e-8 of the host's old
  x / 127.5 - 1 (which XLA would compute as 1.0000001 at 255), not bit-equal to it."""
  if video.dtype != jnp.uint8:
    return video
  return (video.astype(jnp.float32) - 127.5) / 127.5


def model_inputs(batch):
  """A batch as the objectives take it: 'video' (clips) or packed 'patches' in [-1, 1]. Packed
  padding stays 0 (as the packer wrote it, not -1), so padding tokens are what they always were."""
  batch = dict(batch)
  if 'video' in batch:
    batch['video'] = to_model_range(batch['video'])
  if 'patches' in batch and batch['patches'].dtype == jnp.uint8:
    real = (batch['segment_ids'] > 0)[..., None]
    batch['patches'] = jnp.where(real, to_model_range(batch['patches']), 0.0)
  return batch


# For frozen.Frozen.encode_batch, whose contract is pixels in [-1, 1]: train.py normalises on device
# before encoding (latent runs), so host batches stay uint8 there too.
normalize_pixels = jax.jit(to_model_range)


def make_train_step(graphdef, config, tx, schedule, null_caption=None):
  """(state, batch) -> (state, metrics); pure, jitted by the caller.

  `null_caption` = (tokens, mask) [1, ...] of the empty caption as the model takes captions (byte
  tokens, or a frozen encoder's embeddings: inference/frozen.py); default: the byte tokenizer's.
  """
  null_caption = null_caption or tokenizers.tokenize([''], config.text.max_length)
  loss_fn = objective(config).make_loss(graphdef, config, null_caption)

  def train_step(state, batch):
    batch = model_inputs(batch)  # uint8 from the host; static dtype, so no cost for floats
    rng, t_rng, noise_rng, drop_rng = jax.random.split(state['rng'], 4)
    rngs = dict(t=t_rng, noise=noise_rng, drop=drop_rng)
    # LoRA: gradients of the adapters only; the frozen base joins them inside the loss.
    frozen = state.get('frozen')
    loss_of = loss_fn if frozen is None else (
        lambda p, *a: loss_fn(nnx.merge_state(frozen, p), *a))
    (loss, extra), grads = jax.value_and_grad(loss_of, has_aux=True)(state['params'], batch, rngs)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # EMA decay warms up so that early (poor) weights fade fast in short runs.
    step = state['step']
    decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state['ema'], params)
    # A non-finite loss or gradient (an overflow, a bad batch) must not reach the weights, or every
    # later checkpoint holds NaN: such a step keeps params, optimizer state and EMA as they were
    # (its batch is consumed; step and RNG move on), and reports nonfinite=1 for the loop to count
    # (train.py stops after config.optim.max_nonfinite_steps in a row). Not optax.apply_if_finite:
    # it guards the optimizer only (the EMA would still move), checks the updates rather than the
    # loss, keeps counters in the optimizer state (another checkpoint structure) and, past its
    # limit, applies the non-finite update.
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = dict(step=step + 1, params=keep(params, state['params']),
                     ema=keep(ema, state['ema']), opt_state=keep(opt_state, state['opt_state']),
                     rng=rng)
    if frozen is not None:
      new_state['frozen'] = frozen
    return new_state, dict(extra, loss=loss, grad_norm=grad_norm, learning_rate=schedule(step),
                           nonfinite=(~finite).astype(jnp.int32))

  return train_step

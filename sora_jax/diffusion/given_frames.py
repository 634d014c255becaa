"""Conditioning on given frames: image-to-video, extension, connecting clips, SDEdit, long videos.

One model serves all of them (dit.py's docstring has the design): some frames of the clip are "given",
kept clean in the model input with flow time t = 0 for their temporal tokens, and flagged by an extra
input channel (1 on given frames). A given-frame mask is [B, T] over the model's frames (pixels, or
latents with an autoencoder) and is constant within each temporal patch: with model.patch_size[0] = 2 a
"frame" of the patterns below is a temporal patch of 2 frames.

Training draws one pattern per clip from `config.condition.mix`:
  none        nothing given (plain text-to-video)
  first       the first temporal patch (image-to-video): in pixel space every frame of that patch
              shows the clip's first frame, as `--image` gives it (train as used); with a causal
              autoencoder the first latent frame already encodes one image
  first_k     the first k patches (forward extension), k uniform in [1, config.condition.max_frames]
  last_k      the last k patches (backward extension)
  first_last  the first and the last k patches (connecting two clips / two images)"""

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.config import geometry, schema


def pattern_mask(pattern: str, k: int, num_frames: int, patch_t: int = 1) -> np.ndarray:
  """Given-frame mask [num_frames] float32 of one pattern with k temporal patches (host side)."""
  if pattern not in schema.CONDITION_PATTERNS:
    raise ValueError(f'Unknown conditioning pattern {pattern!r}; expected one of {schema.CONDITION_PATTERNS}.')
  patches = num_frames // patch_t
  m = np.zeros(patches, np.float32)
  if pattern in ('first', 'first_k', 'first_last'):
    m[:1 if pattern == 'first' else k] = 1
  if pattern in ('last_k', 'first_last'):
    m[patches - k:] = 1
  return np.repeat(m, patch_t)


def sample_given(rng, config, batch: int, num_frames: int):
  """Training: a pattern per clip from config.condition.mix -> (given-frame mask [B, T] float32,
  image [B] bool: the clip drew 'first', see `as_image`).

  k is uniform in [1, max_frames], clamped per pattern so that at least one temporal patch is left to
  generate (1-frame image clips then get nothing given)."""
  pt = config.model.patch_size[0]
  patches = num_frames // pt
  pairs = geometry.condition_mix(config)
  pick_rng, k_rng = jax.random.split(rng)
  pattern = jax.random.choice(pick_rng, len(pairs), (batch,),
                              p=jnp.asarray([q for _, q in pairs], jnp.float32))
  k = jax.random.randint(k_rng, (batch,), 1, config.condition.max_frames + 1)
  idx = jnp.arange(patches)[None]
  masks = []
  for name, _ in pairs:
    kk = {'none': 0, 'first': 1, 'first_k': k, 'last_k': k, 'first_last': k}[name]
    limit = (patches - 1) // 2 if name == 'first_last' else patches - 1
    kk = jnp.minimum(jnp.broadcast_to(kk, (batch,)), limit)[:, None]
    first = idx < kk if name in ('first', 'first_k', 'first_last') else jnp.zeros_like(idx, bool)
    last = idx >= patches - kk if name in ('last_k', 'first_last') else jnp.zeros_like(idx, bool)
    masks.append(jnp.broadcast_to(first | last, (batch, patches)))
  given = jnp.stack(masks)[pattern, jnp.arange(batch)]  # [B, patches]
  names = [name for name, _ in pairs]
  image = (pattern == names.index('first')) if 'first' in names else jnp.zeros(batch, bool)
  image = image & (given.sum(-1) > 0)
  return jnp.repeat(given, pt, axis=1).astype(jnp.float32), image


def as_image(x0, image, patch_t: int):
  """Clips that drew 'first' in pixel space: their first temporal patch becomes copies of frame 0 (an
  image is one frame; `cli_inputs` fills the first patch with it the same way). x0 [B, T, ...]."""
  if patch_t == 1:
    return x0
  still = jnp.broadcast_to(x0[:, :1], x0[:, :patch_t].shape)
  first = jnp.concatenate([still, x0[:, patch_t:]], axis=1)
  return jnp.where(image.reshape((-1,) + (1,) * (x0.ndim - 1)), first, x0)


def masked_loss(v_pred, x0, noise, weight, given):
  """Per-example mean squared velocity error over the non-given frames only [B].

  weight: [B] or [B, T] loss weights (flow.loss_weight); given [B, T]. Given frames are inputs, not
  predictions: their outputs get no gradient. Equals flow.loss when nothing is given."""
  err = jnp.square(v_pred.astype(jnp.float32) - (noise - x0))
  keep = 1.0 - given.astype(jnp.float32)
  w = keep if weight is None else keep * jnp.broadcast_to(
      weight.reshape(weight.shape + (1,) * (2 - weight.ndim)), keep.shape)
  err = err * w.reshape(w.shape + (1,) * (err.ndim - 2))
  per_frame = err.reshape(*err.shape[:2], -1).mean(-1)  # [B, T]
  return per_frame.sum(-1) / jnp.maximum(keep.sum(-1), 1.0)


def check_mask(given, patch_t: int):
  """A given-frame mask must be constant within each temporal patch (one flow time per token)."""
  g = np.asarray(given)
  blocks = g.reshape(g.shape[0], -1, patch_t)
  if not (blocks == blocks[..., :1]).all():
    raise ValueError(f'Given frames must fill whole temporal patches of {patch_t} frames'
                     f' (model.patch_size[0]); got the mask {g.astype(int).tolist()}.')

"""Text-to-video generation: an ODE sampler (Euler, Heun, DPM-Solver++(2M)) with classifier-free
guidance, negative prompts and a guidance schedule, compiled once."""


import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from sora_jax.common import progress as progress_lib
from sora_jax.common import video_io
from sora_jax.config import geometry
from sora_jax.diffusion import cascade, flow, samplers
from sora_jax.inference import frozen as frozen_lib
from sora_jax.parallel import sharding
from sora_jax.training import factory
from sora_jax.training.objectives import wan_i2v


def settings(config, *, num_steps=None, guidance_scale=None, sampler=None, negative_prompt=None,
             guidance_schedule=None, guidance_interval=None, guidance_scale_2=None) -> dict:
  """make_generate's keyword arguments: each given value, else config.sample's, else the plain-CFG
  Euler default (workdirs written before the sampler options existed lack those keys)."""
  c = config.sample
  pick = lambda value, key, default: c.get(key, default) if value is None else value
  out = {'num_steps': int(pick(num_steps, 'num_steps', None)),
         'guidance_scale': float(pick(guidance_scale, 'guidance_scale', None)),
         'sampler': pick(sampler, 'sampler', 'euler'),
         'negative_prompt': pick(negative_prompt, 'negative_prompt', ''),
         'guidance_schedule': pick(guidance_schedule, 'guidance_schedule', 'constant'),
         'guidance_interval': tuple(float(v) for v in pick(guidance_interval, 'guidance_interval',
                                                           (0.0, 1.0)))}
  if factory.wan_expert(config):  # Wan 2.2 A14B: the low-noise expert's scale
    out['guidance_scale_2'] = float(pick(guidance_scale_2, 'guidance_scale_2', 0.0))
  elif guidance_scale_2:
    raise ValueError('guidance_scale_2 is the low-noise expert\'s CFG scale of a Wan 2.2 A14B run'
                     ' (config.model.wan.expert); this run has one transformer.')
  if out['num_steps'] <= 0:
    raise ValueError(f'num_steps={out["num_steps"]} must be positive.')
  samplers.get(out['sampler'])
  flow.guidance_schedule(out['guidance_scale'], out['guidance_schedule'], out['guidance_interval'])
  return out


def make_generate(graphdef, config, *, num_steps: int, guidance_scale, frozen=None,
                  sampler: str = 'euler', negative_prompt: str = '',
                  guidance_schedule: str = 'constant', guidance_interval=(0.0, 1.0),
                  edit_strength=None, guidance_scale_2: float = 0.0):
  """jitted (params, captions [B, L(, D)], mask [B, L], keys [B], video=None, given=None,
  lowres=None) -> model-space videos [B, T, H, W, C] (pixels in [-1, 1], or latents: decode with
  `frozen.decode`).

  Upscaler runs (config.upscale.factor > 1, sora_jax/inference/upscale.py) take `lowres` [B, T, H / f, W / f, C]
  low-resolution videos in [-1, 1], upsampled and noised to config.upscale.sample_noise.

  Conditioning (sora_jax/diffusion/given_frames.py): `video` [B, T, H, W, C] model-space frames and `given`
  [B, T] their given-frame mask (whole temporal patches). At every sampler step the given frames are
  reset to their clean values with t = 0 for their tokens; they come out exactly as given. Given frames
  need a model trained with config.condition.mix (else ValueError).
  edit_strength s in (0, 1] (SDEdit): start from `video` noised to t = s, (1 - s) video + s noise, and
  integrate from s to 0 (num_steps steps) under the prompts; `given` may be None then.

  Captions are what the model takes (`frozen.caption_inputs`). Noise comes from one key per video, so
  a prompt's video does not depend on what it is batched with.

  sampler: a name in `samplers.SAMPLERS` ('euler', 'heun', 'dpm++2m'), `num_steps` steps on the shifted
    schedule. negative_prompt: the caption CFG guides away from (the empty caption: plain CFG).
  guidance_scale: a float, shaped over t by `guidance_schedule` ('constant', 'linear', 'hat',
    'interval' over `guidance_interval`, see `flow.guidance_schedule`), or a function t [B] -> scale
    [B] used as is.

  Wan 2.2 A14B runs (config.model.wan.expert): each step runs the high-noise expert where
  t * 1000 >= boundary_ratio * 1000 and the low-noise one elsewhere (diffusers' switch; `lax.cond`,
  so a step computes one expert), one of them the run's `params`, the other its partner from the
  pipeline folder (frozen.expert_partner, loaded here and passed to the compiled function, not baked
  into it); the
  low-noise steps guide with `guidance_scale_2` (0: guidance_scale), as diffusers' guidance_scale_2.
  """
  frozen = frozen or frozen_lib.Frozen(config)
  neg_tokens, neg_mask = frozen.tokenize([negative_prompt])
  neg_tokens, neg_mask = frozen.caption_inputs(jnp.asarray(neg_tokens), jnp.asarray(neg_mask))
  timesteps = flow.sampling_schedule(num_steps, geometry.timestep_shift(config))
  shape = frozen_lib.model_video_shape(config)
  solve = samplers.get(sampler)
  if callable(guidance_scale):
    scale = guidance_scale
  else:
    scale = flow.guidance_schedule(guidance_scale, guidance_schedule, guidance_interval)

  if edit_strength is not None:
    if not 0.0 < edit_strength <= 1.0:
      raise ValueError(f'edit_strength={edit_strength} must be in (0, 1].')
    # The same shifted schedule, started at t = s: invert the shift at s, space evenly below it.
    a = geometry.timestep_shift(config)
    start = edit_strength / (a - (a - 1.0) * edit_strength)
    timesteps = flow.shift_timesteps(jnp.linspace(start, 0.0, num_steps + 1), a)
  conditioned = geometry.conditioning_enabled(config)

  upscaler = geometry.upscale_enabled(config)
  i2v, clip = factory.wan_i2v(config), factory.wan_clip(config)
  expert = factory.wan_expert(config)
  if expert:
    from sora_jax.inference import experts as experts_lib  # pylint: disable=g-import-not-at-top
    ratio = float(config.model.wan.boundary_ratio)
    partner_graphdef = experts_lib.partner_graphdef(config)
    partner_params = frozen.expert_partner()  # loaded here: outside any jax.set_mesh block
    low_scale = scale if not guidance_scale_2 else flow.guidance_schedule(
        guidance_scale_2, guidance_schedule, guidance_interval)
    scale = _switched_scale(scale, low_scale, ratio)

  @jax.jit
  def generate(params, tokens, mask, keys, video=None, given=None, lowres=None,
               image_condition=None, image_embeds=None, partner=None):
    if i2v != (image_condition is not None) or clip != (image_embeds is not None):
      raise ValueError('A Wan image-to-video run (config.model.wan.image_dim > 0 or image_condition)'
                       ' samples from an image: pass image_condition (and, with CLIP, image_embeds:'
                       ' frozen.image_condition), and only it takes them.')
    if given is not None and not conditioned:
      raise ValueError('Given frames need a model trained with conditioning (config.condition.mix'
                       ' beyond "none"); this one was trained without.')
    if (lowres is not None) != upscaler:
      raise ValueError('An upscaler run (config.upscale.factor > 1) samples from `lowres` videos,'
                       ' and only it takes them.')
    model = nnx.merge(graphdef, params)
    if expert:  # Wan 2.2 A14B: the expert each step's t falls to
      other = nnx.merge(partner_graphdef, partner)
      high, low = (model, other) if expert == 'high_noise' else (other, model)
      model = _Switched(high, low, ratio)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    both_tokens = jnp.concatenate([tokens, jnp.broadcast_to(neg_tokens, tokens.shape)])
    both_mask = jnp.concatenate([mask, jnp.broadcast_to(neg_mask, mask.shape)])
    if lowres is not None:
      # Each video's own augmentation noise; the same input for both halves of CFG.
      aug = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(keys)
      up, base = cascade.condition(lowres, config, config.upscale.sample_noise, aug)
      both_up = jnp.concatenate([up, up])
      both_base = None if base is None else jnp.concatenate([base, base])
      velocity = flow.guided_velocity(
          lambda x, t: model(x, t, both_tokens, both_mask, lowres=both_up, base=both_base), scale)
      return solve(velocity, noise, timesteps)
    if i2v:  # Wan 2.1 I2V: both CFG halves see the image; the negative prompt drops the caption
      if video is not None:
        raise ValueError('Wan image-to-video conditions on its image channels, not on given frames'
                         ' or an edited video.')
      both_cond = jnp.concatenate([image_condition, image_condition])
      both_image = None if image_embeds is None else jnp.concatenate([image_embeds, image_embeds])
      velocity = flow.guided_velocity(lambda x, t: _call(
          model, lambda m, x2, t2: wan_i2v.velocity(m, x2, t2, both_tokens, both_mask, both_cond,
                                                    both_image), x, t), scale)
      return solve(velocity, noise, timesteps)
    if video is None:
      velocity = flow.guided_velocity(lambda x, t: model(x, t, both_tokens, both_mask), scale)
      return solve(velocity, noise, timesteps)
    # SDEdit (edit_strength s): start from the given video noised to t = s.
    x = noise if edit_strength is None else flow.interpolate(video, noise, timesteps[0])
    if given is None:
      both_given = None
      keep = jnp.zeros(video.shape[:2] + (1, 1, 1), bool)
    else:
      both_given = jnp.concatenate([given, given]) if conditioned else None
      keep = (given > 0)[:, :, None, None, None]

    # Given frames: their values at flow time t_ctx (0 unless the model was trained with context
    # noise), flagged by the mask channel.
    t_ctx = config.condition.sample_context_noise if conditioned else 0.0
    context = video
    if t_ctx > 0:
      ctx_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), shape))(keys)
      context = flow.interpolate(video, ctx_noise, jnp.full(video.shape[:1], t_ctx))

    def model_fn(x2, t2):
      if given is None:
        return model(x2, t2, both_tokens, both_mask)
      t_frames = jnp.where(jnp.concatenate([given, given]) > 0, t_ctx, t2[:, None])
      return model(x2, t_frames, both_tokens, both_mask, given=both_given)

    guided = flow.guided_velocity(model_fn, scale)

    def velocity(x, t):
      # Reset the given frames at every step, and never move them.
      return jnp.where(keep, 0.0, guided(jnp.where(keep, context, x), t))

    return jnp.where(keep, video, solve(velocity, jnp.where(keep, video, x), timesteps))

  if not expert:
    return generate

  def with_partner(params, *args, **kwargs):
    return generate(params, *args, partner=partner_params, **kwargs)
  return with_partner


class _Switched:
  """Two Wan 2.2 A14B experts called as one model: `model(x, t, ...)` runs `high` where
  experts.is_high_noise(t) (the step's t, shared by the batch) and `low` elsewhere."""

  def __init__(self, high, low, ratio):
    self.high, self.low, self.ratio = high, low, ratio

  def __call__(self, x, t, *args, **kwargs):
    return _call(self, lambda m, x2, t2: m(x2, t2, *args, **kwargs), x, t)


def _call(model, fn, x, t):
  """fn(model, x, t), or for _Switched the expert of t: one branch runs (lax.cond)."""
  if not isinstance(model, _Switched):
    return fn(model, x, t)
  from sora_jax.diffusion import experts  # pylint: disable=g-import-not-at-top
  t_step = t.reshape(t.shape[0], -1)[0, 0]
  return jax.lax.cond(experts.is_high_noise(t_step, model.ratio),
                      lambda: fn(model.high, x, t), lambda: fn(model.low, x, t))


def _switched_scale(high_scale, low_scale, ratio):
  """The CFG scale of flow time t [B]: the high-noise expert's above the boundary, else the low's."""
  from sora_jax.diffusion import experts  # pylint: disable=g-import-not-at-top
  value = lambda s, t: jnp.broadcast_to(jnp.asarray(s(t) if callable(s) else s, jnp.float32),
                                        t.shape)
  return lambda t: jnp.where(experts.is_high_noise(t, ratio), value(high_scale, t),
                             value(low_scale, t))


def generate_videos(generate, params, prompts, *, config, mesh, seed: int,
                    batch_size: int, frozen=None, video=None, given=None, lowres=None,
                    decode: bool = True, image=None) -> np.ndarray:
  """All prompts, in fixed-size (padded) batches: one compilation. Returns uint8 [N, T, H, W, 3].

  video: model-space frames [T, H, W, C] shared by all prompts, or [N, T, H, W, C] one per prompt;
  given [T]: their given-frame mask (see make_generate). lowres [N, T, h, w, C]: one low-resolution
  video per prompt (upscaler runs). decode=False: the model-space float videos [N, T, H, W, C].
  image: the first frame of every video of a Wan image-to-video run, an image file (resized to the
  run's frame size for the VAE condition, as it is for CLIP, as WanImageToVideoPipeline does) or
  uint8 [H, W, 3] at the frame size; without one such a run conditions on a mid-grey frame
  (training previews), with a warning."""
  frozen = frozen or frozen_lib.Frozen(config, mesh)
  i2v_inputs = {}
  if factory.wan_i2v(config):
    i2v_inputs = {k: v for k, v in image_inputs(config, frozen, image).items() if v is not None}
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  batch_size = -(-min(batch_size, len(prompts)) // shards) * shards
  data_sharding = sharding.batch_sharding(mesh)
  base = jax.random.PRNGKey(seed)
  if video is not None:
    video = np.asarray(video, np.float32)
    if video.ndim == 4:
      video = np.broadcast_to(video, (len(prompts), *video.shape))
  out = []
  progress = progress_lib.Progress(len(prompts), 'Sampled videos')
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [''] * (batch_size - n)
    tokens, mask = frozen.tokenize(chunk)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + batch_size))
    pad = lambda v: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)])
    extra = {}
    if video is not None:
      extra['video'] = pad(video[start:start + n])
      if given is not None:
        extra['given'] = np.broadcast_to(np.asarray(given, np.float32), (batch_size, len(given)))
    if lowres is not None:
      extra['lowres'] = pad(np.asarray(lowres[start:start + n], np.float32))
    for key, value in i2v_inputs.items():
      extra[key] = np.broadcast_to(value, (batch_size, *value.shape[1:]))
    tokens, mask, keys, extra = jax.device_put((tokens, mask, keys, extra), data_sharding)
    videos = generate(params, *frozen.caption_inputs(tokens, mask), keys, **extra)
    videos = frozen.decode(videos) if decode else videos
    # Every process gets all videos (its devices hold only some rows on a multi-host mesh).
    videos = np.asarray(multihost_utils.process_allgather(videos, tiled=True))[:n]
    out.append(video_io.to_uint8(videos) if decode else videos)
    if len(prompts) > batch_size:  # one batch: nothing to estimate
      progress.update(start + n)
  return np.concatenate(out)


def image_inputs(config, frozen, image=None) -> dict:
  """{'image_condition' [1, ...], 'image_embeds' [1, ...]} (host arrays) of one first frame for a Wan
  image-to-video run: `image` an image file or uint8 [H, W, 3] at the frame size, or mid-grey
  without one."""
  t, h, w = config.data.num_frames, config.data.height, config.data.width
  if image is None:
    logging.warning('Wan image-to-video samples without an image (training previews): each video'
                    ' starts from a mid-grey first frame; pass an image (sample --image) instead.')
    image = np.full((h, w, 3), 128, np.uint8)
  if isinstance(image, str):
    original = video_io.read_video(image)[0]
    frame = video_io.read_frames(image, h, w)[0]
  else:
    original = np.asarray(image)
    if original.dtype != np.uint8 or original.shape != (h, w, 3):
      raise ValueError(f'image: expected uint8 [{h}, {w}, 3] (the run\'s frame size) or a file,'
                       f' got {original.dtype} {original.shape}')
    frame = original.astype(np.float32) / 127.5 - 1.0
  clip = np.zeros((1, t, h, w, 3), np.float32)
  clip[0, 0] = frame
  condition, embeds = frozen.image_condition(jnp.asarray(clip), images=[original])
  gather = lambda x: None if x is None else np.asarray(
      multihost_utils.process_allgather(x, tiled=True))
  return {'image_condition': gather(condition), 'image_embeds': gather(embeds)}


def long_windows(generate, params, prompts, *, config, mesh, seed: int, batch_size: int,
                 num_frames: int, overlap: int, frozen=None, video=None, given=None,
                 direction: str = 'forward') -> list[np.ndarray]:
  """Sliding windows in model space: a list of [N, T, H, W, C] windows of the training length T.

  Window k + 1 is conditioned on the `overlap` frames of window k nearest to it (its last frames going
  forward, its first going backward) and reproduces them exactly; `video` / `given` condition the first
  window. Windows run one at a time through the same compiled `generate`, so device memory stays that
  of one window whatever `num_frames` (model frames in all) is; windows are kept on the host.
  """
  t_len = geometry.model_clip_shape(config)[0]
  if direction not in ('forward', 'backward'):
    raise ValueError(f'direction={direction!r}: expected forward or backward.')
  if not overlap:
    raise ValueError(f'overlap={overlap!r}: sliding windows need a positive overlap.')
  geometry.resolve_overlap(config, overlap)
  count = window_count(num_frames, t_len, overlap)
  g = np.zeros(t_len, np.float32)
  if direction == 'forward':
    g[:overlap] = 1
  else:
    g[t_len - overlap:] = 1
  windows = []
  for k in range(count):
    if k:
      prev = windows[-1]
      video = np.zeros_like(prev)
      if direction == 'forward':
        video[:, :overlap] = prev[:, t_len - overlap:]
      else:
        video[:, t_len - overlap:] = prev[:, :overlap]
      given = g
    windows.append(generate_videos(generate, params, prompts, config=config, mesh=mesh,
                                   seed=seed + k, batch_size=batch_size, frozen=frozen,
                                   video=video, given=given, decode=False))
  return windows


def window_count(num_frames: int, window: int, overlap: int) -> int:
  """Windows of `window` frames overlapping by `overlap` that cover `num_frames` frames."""
  return 1 + max(0, -(-(num_frames - window) // (window - overlap)))


def join_windows(windows, overlap: int, num_frames: int, direction: str = 'forward'):
  """Windows from `long_windows` -> one [N, num_frames, ...] sequence (each overlap counted once)."""
  if direction == 'backward':
    parts = [w[:, :w.shape[1] - overlap] for w in windows[:0:-1]] + [windows[0]]
    return np.concatenate(parts, axis=1)[:, -num_frames:]
  parts = [windows[0]] + [w[:, overlap:] for w in windows[1:]]
  return np.concatenate(parts, axis=1)[:, :num_frames]


def generate_long(generate, params, prompts, *, config, mesh, seed: int, batch_size: int,
                  num_frames: int, overlap: int, frozen=None, video=None, given=None,
                  direction: str = 'forward') -> np.ndarray:
  """Videos longer than the training length by sliding windows (`long_windows`): uint8
  [N, num_frames, H, W, 3] (num_frames in model frames; latent frames with an autoencoder, decoded
  window by window, each window's overlap frames dropped after decoding)."""
  frozen = frozen or frozen_lib.Frozen(config, mesh)
  windows = long_windows(generate, params, prompts, config=config, mesh=mesh, seed=seed,
                         batch_size=batch_size, num_frames=num_frames, overlap=overlap,
                         frozen=frozen, video=video, given=given, direction=direction)
  if frozen.vae is None:
    return video_io.to_uint8(join_windows(windows, overlap, num_frames, direction))
  temporal = geometry.autoencoder_geometry(config.autoencoder)['temporal']
  cut = geometry.pixel_frames(overlap, temporal, at_start=direction == 'forward')
  pixels = []
  for k, w in enumerate(windows):
    p = np.asarray(frozen.decode(jnp.asarray(w)))
    if k:
      p = p[:, cut:] if direction == 'forward' else p[:, :p.shape[1] - cut]
    pixels.append(video_io.to_uint8(p))
  if direction == 'backward':
    return np.concatenate(pixels[::-1], axis=1)
  return np.concatenate(pixels, axis=1)



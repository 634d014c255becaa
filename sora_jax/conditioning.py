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
  first_last  the first and the last k patches (connecting two clips / two images)
"""

import jax
import jax.numpy as jnp
import numpy as np

PATTERNS = ('none', 'first', 'first_k', 'last_k', 'first_last')


def mix(config) -> tuple[tuple[str, float], ...]:
  """config.condition.mix as ((pattern, probability), ...); workdirs saved before conditioning existed
  (or a JSON round trip: lists) read as today's default."""
  cond = config.get('condition')
  if cond is None:
    return (('none', 1.0),)
  return tuple((str(p), float(q)) for p, q in cond.mix)


def enabled(config) -> bool:
  """Whether the model conditions on given frames (and so has the extra mask input channel)."""
  return any(p != 'none' and q > 0 for p, q in mix(config))


def check(config, model_frames: list[int]) -> None:
  """Validates config.condition for clips of `model_frames` frames (as the model sees them)."""
  pairs = config.condition.mix
  try:
    pairs = mix(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.condition.mix={pairs!r} must be a tuple of (pattern, probability)'
                     f' pairs: {e}.') from None
  if not pairs:
    raise ValueError('config.condition.mix is empty; use (("none", 1.0),) for no conditioning.')
  for p, q in pairs:
    if p not in PATTERNS:
      raise ValueError(f'config.condition.mix: unknown pattern {p!r}; expected one of'
                       f' {", ".join(PATTERNS)}.')
    if q < 0:
      raise ValueError(f'config.condition.mix: probability {q} of {p!r} is negative.')
  if abs(sum(q for _, q in pairs) - 1.0) > 1e-6:
    raise ValueError(f'config.condition.mix: probabilities sum to {sum(q for _, q in pairs):g},'
                     ' not 1.')
  k = config.condition.max_frames
  if not isinstance(k, int) or k < 1:
    raise ValueError(f'config.condition.max_frames={k!r} must be an int >= 1.')
  for key in ('context_noise', 'sample_context_noise'):
    if not 0.0 <= config.condition[key] < 1.0:
      raise ValueError(f'config.condition.{key}={config.condition[key]} not in [0, 1).')
  if not enabled(config):
    return
  if config.model.family != 'dit' or config.data.packing:
    raise ValueError('config.condition.mix conditions on given frames with model.family="dit" and'
                     ' data.packing=False only.')
  pt = config.model.patch_size[0]
  used = {p for p, q in pairs if q > 0}
  for frames in model_frames:
    patches = frames // pt
    if frames == 1:
      continue  # image clips: nothing given (sample_given clamps k)
    need = {'first': 1, 'first_k': k, 'last_k': k, 'first_last': 2 * k}
    for p in used - {'none'}:
      if need[p] >= patches:
        raise ValueError(
            f'config.condition.max_frames={k} with pattern {p!r} gives {need[p]} temporal patch(es),'
            f' but a clip of {frames} model frames has only {patches} temporal patches'
            f' (model.patch_size[0]={pt}): at least one must stay to generate. max_frames counts'
            f' temporal patches.')


def pattern_mask(pattern: str, k: int, num_frames: int, patch_t: int = 1) -> np.ndarray:
  """Given-frame mask [num_frames] float32 of one pattern with k temporal patches (host side)."""
  if pattern not in PATTERNS:
    raise ValueError(f'Unknown conditioning pattern {pattern!r}; expected one of {PATTERNS}.')
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
  pairs = mix(config)
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


def pixel_frames(model_frames: int, temporal: int, *, at_start: bool) -> int:
  """Pixel frames that make `model_frames` latent frames of a causal autoencoder (temporal = its
  compression; 1 without one): the first latent frame encodes one pixel frame alone."""
  if temporal == 1 or model_frames == 0:
    return model_frames
  return 1 + (model_frames - 1) * temporal if at_start else model_frames * temporal


def check_mask(given, patch_t: int):
  """A given-frame mask must be constant within each temporal patch (one flow time per token)."""
  g = np.asarray(given)
  blocks = g.reshape(g.shape[0], -1, patch_t)
  if not (blocks == blocks[..., :1]).all():
    raise ValueError(f'Given frames must fill whole temporal patches of {patch_t} frames'
                     f' (model.patch_size[0]); got the mask {g.astype(int).tolist()}.')


def read_frames(path, height: int, width: int) -> np.ndarray:
  """Frames of a video or an image file (anything PyAV reads: mp4, png, jpg, ...) resized to
  height x width, as float32 [T, H, W, 3] in [-1, 1]."""
  import av  # pylint: disable=g-import-not-at-top
  try:
    with av.open(str(path)) as container:
      frames = [f.reformat(width=width, height=height, format='rgb24').to_ndarray()
                for f in container.decode(video=0)]
  except (OSError, av.error.FFmpegError, ValueError) as e:  # pytype: disable=module-attr
    raise ValueError(f'Cannot read {path!r} as an image or video: {e}') from None
  if not frames:
    raise ValueError(f'{path!r} holds no video frames.')
  return np.stack(frames).astype(np.float32) / 127.5 - 1.0


def cli_inputs(config, *, image=None, end_image=None, video=None, extend=None, edit_strength=None,
               overlap=None):
  """The sample CLI's conditioning flags (file paths) -> (pixel clip [T, H, W, 3], pixel given mask
  [T] or None, model given mask [T_model] or None). Checks everything (files, lengths, the
  checkpoint's training) before anything compiles; raises ValueError naming the flag.

  --image: the first temporal patch (its pixel frames all show the image); --end_image: the last one;
  --video --extend=forward: its last `overlap` model frames start the clip; backward: its first ones
  end it; --video --edit_strength: SDEdit of its first T frames (nothing given)."""
  t_pix, h, w = config.data.num_frames, config.data.height, config.data.width
  if extend is not None and video is None:
    raise ValueError('--extend needs --video.')
  if edit_strength is not None and (video is None or extend is not None):
    raise ValueError('--edit_strength needs --video (and no --extend).')
  if video is not None and extend is None and edit_strength is None:
    raise ValueError('--video needs --extend=forward|backward or --edit_strength.')
  if video is not None and (image or end_image):
    raise ValueError('--video cannot be combined with --image / --end_image.')
  if (image or end_image or extend) and not enabled(config):
    given_inputs(config, image=np.zeros((h, w, 3)))  # raises the "trained without" error
  if edit_strength is not None:
    frames = read_frames(video, h, w)
    if len(frames) < t_pix:
      raise ValueError(f'--video={video!r} has {len(frames)} frames; --edit_strength needs'
                       f' {t_pix} (config.data.num_frames).')
    return frames[:t_pix], None, None
  read = lambda path: None if not path else read_frames(path, h, w)
  try:
    return given_inputs(config, image=None if not image else read(image)[0],
                        end_image=None if not end_image else read(end_image)[0],
                        video=read(video), extend=extend, overlap=overlap)
  except ValueError as e:
    raise ValueError(str(e).replace('the video', f'--video={video!r}')) from None


def given_inputs(config, *, image=None, end_image=None, video=None, extend=None, overlap=None):
  """Arrays in [-1, 1] at the run's frame size -> (pixel clip [T, H, W, 3], pixel given mask [T],
  model given mask [T_model]), or (None, None, None) when nothing is given.

  image / end_image [H, W, 3]: the first / last temporal patch shows it (every pixel frame of it);
  video [N, H, W, 3] with extend='forward': its last `overlap` model frames start the clip;
  'backward': its first ones end it."""
  t_pix, h, w = config.data.num_frames, config.data.height, config.data.width
  t_model = config_lib_model_frames(config)
  pt = config.model.patch_size[0]
  temporal = temporal_factor(config)
  if image is None and end_image is None and extend is None:
    return None, None, None
  if not enabled(config):
    raise ValueError('This checkpoint was trained without conditioning (config.condition.mix has'
                     ' only "none"): it cannot take --image, --end_image or --extend. Train with a'
                     ' conditioning mix, e.g. configs/demo_conditioned.py.')
  clip = np.zeros((t_pix, h, w, 3), np.float32)
  given_pix = np.zeros(t_pix, np.float32)
  given_model = np.zeros(t_model, np.float32)
  if image is not None:
    n = pixel_frames(pt, temporal, at_start=True)
    clip[:n] = image
    given_pix[:n], given_model[:pt] = 1, 1
  if end_image is not None:
    n = pixel_frames(pt, temporal, at_start=False)
    clip[t_pix - n:] = end_image
    given_pix[t_pix - n:], given_model[t_model - pt:] = 1, 1
  if extend is not None:
    if extend not in ('forward', 'backward'):
      raise ValueError(f'extend={extend!r}: expected forward or backward.')
    k = resolve_overlap(config, overlap)
    forward = extend == 'forward'
    n = pixel_frames(k, temporal, at_start=forward)
    if len(video) < n:
      raise ValueError(f'the video has {len(video)} frames, shorter than the overlap of {n} frames'
                       ' to continue from.')
    if forward:
      clip[:n], given_pix[:n], given_model[:k] = video[-n:], 1, 1
    else:
      clip[t_pix - n:], given_pix[t_pix - n:] = video[:n], 1
      given_model[t_model - k:] = 1
  return clip, given_pix, given_model


def config_lib_model_frames(config) -> int:
  from sora_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.model_clip_shape(config)[0]


def resolve_overlap(config, overlap=None) -> int:
  """Model frames shared by consecutive windows / taken from an extended video: `overlap`, else
  patch_size[0] * config.condition.max_frames (the most training gave). Must be whole temporal
  patches, fewer than the clip's frames."""
  pt = config.model.patch_size[0]
  k = overlap or pt * config.condition.max_frames
  t_model = config_lib_model_frames(config)
  if k % pt or not 0 < k < t_model:
    raise ValueError(f'--overlap={k} must be a multiple of model.patch_size[0]={pt} below the'
                     f' clip length {t_model} (model frames).')
  return k


def temporal_factor(config) -> int:
  """Pixel frames per latent frame of the run's causal autoencoder (1 in pixel space)."""
  if not config.autoencoder:
    return 1
  from sora_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.autoencoder_geometry(config.autoencoder)['temporal']

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

import numpy as np

from sora_jax.common import video_io
from sora_jax.config import geometry


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
  if (image or end_image or extend) and not geometry.conditioning_enabled(config):
    given_inputs(config, image=np.zeros((h, w, 3)))  # raises the "trained without" error
  if edit_strength is not None:
    frames = video_io.read_frames(video, h, w)
    if len(frames) < t_pix:
      raise ValueError(f'--video={video!r} has {len(frames)} frames; --edit_strength needs'
                       f' {t_pix} (config.data.num_frames).')
    return frames[:t_pix], None, None
  read = lambda path: None if not path else video_io.read_frames(path, h, w)
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
  t_model = geometry.model_frames(config)
  pt = config.model.patch_size[0]
  temporal = geometry.temporal_factor(config)
  if image is None and end_image is None and extend is None:
    return None, None, None
  if not geometry.conditioning_enabled(config):
    raise ValueError('This checkpoint was trained without conditioning (config.condition.mix has'
                     ' only "none"): it cannot take --image, --end_image or --extend. Train with a'
                     ' conditioning mix, e.g. configs/demo_conditioned.py.')
  clip = np.zeros((t_pix, h, w, 3), np.float32)
  given_pix = np.zeros(t_pix, np.float32)
  given_model = np.zeros(t_model, np.float32)
  if image is not None:
    n = geometry.pixel_frames(pt, temporal, at_start=True)
    clip[:n] = image
    given_pix[:n], given_model[:pt] = 1, 1
  if end_image is not None:
    n = geometry.pixel_frames(pt, temporal, at_start=False)
    clip[t_pix - n:] = end_image
    given_pix[t_pix - n:], given_model[t_model - pt:] = 1, 1
  if extend is not None:
    if extend not in ('forward', 'backward'):
      raise ValueError(f'extend={extend!r}: expected forward or backward.')
    k = geometry.resolve_overlap(config, overlap)
    forward = extend == 'forward'
    n = geometry.pixel_frames(k, temporal, at_start=forward)
    if len(video) < n:
      raise ValueError(f'the video has {len(video)} frames, shorter than the overlap of {n} frames'
                       ' to continue from.')
    if forward:
      clip[:n], given_pix[:n], given_model[:k] = video[-n:], 1, 1
    else:
      clip[t_pix - n:], given_pix[t_pix - n:] = video[:n], 1
      given_model[t_model - k:] = 1
  return clip, given_pix, given_model

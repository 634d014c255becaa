"""Decoding layer for user media datasets: probe a file, decode one clip.

Inputs are whatever users have: any container/codec FFmpeg reads, any size, frame rate (constant or
variable), length, rotation metadata, and still images (png/jpg/webp/bmp/...). Everything goes through
PyAV (FFmpeg); numpy only crops and rotates small arrays.

* `probe` reads headers plus the first frame: PyAV 18 exposes the display matrix (rotation) only on
  decoded frames, and decoding one frame also proves the file decodes at all.
* `decode_clip` seeks to the keyframe before the clip and decodes forward. Output frame i is the latest
  source frame whose own ``pts * time_base`` is <= ``start + i / fps``, so variable-frame-rate input is
  sampled by time, not by index. Decoding stops one frame after the last needed one.
* Each picked frame is scaled and converted to RGB in one swscale pass (`VideoFrame.reformat`) straight
  to the size that covers the output, in stored orientation (target dims swapped for 90/270), so 1080p
  sources never become full-size RGB arrays; then np.rot90 makes it upright and numpy crops the window.
* Every failure is a `DecodeError` whose ``reason`` is one of `REASONS`, so a pipeline can skip and count
  bad files; no ``av.error.*`` escapes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import av
import numpy as np

REASONS = ('missing', 'empty', 'not_media', 'no_video_stream', 'undecodable', 'too_short',
           'image_not_video')

_MESSAGES = {
    'missing': 'file does not exist',
    'empty': 'file is empty (0 bytes)',
    'not_media': 'not a media file FFmpeg can open',
    'no_video_stream': 'no video stream (audio-only or cover art only)',
    'undecodable': 'video stream does not decode (truncated or corrupt)',
    'too_short': 'video ends before the requested clip does',
    'image_not_video': 'a still image where a clip of several frames is wanted',
}

# A frame at pts time p is taken for target time t when p <= t + _TIME_EPS: containers with a 1 ms
# time base (mkv, webm) round 1/24 s to 0.042 s, which must still count as "at" 0.041667 s.
_TIME_EPS = 1e-3
# Seconds to seek before the clip start; a seek that lands after the start (B-frame delays, sparse
# indexes) is retried further back, and finally from the beginning (None).
_SEEK_BACKOFFS = (0.25, 3.0, None)
# Consecutive packets the decoder may reject (corrupt data is skipped, like the ffmpeg CLI does).
_MAX_BAD_PACKETS = 32
# Signatures of containers FFmpeg reads: a file that has one but fails to open is a broken video
# (e.g. an mp4 truncated before its moov atom), not a non-media file.
_MEDIA_MAGIC = (b'\x1aE\xdf\xa3', b'RIFF', b'OggS', b'FLV', b'\x89PNG', b'\xff\xd8\xff', b'GIF8',
                b'\x00\x00\x01\xba', b'\x00\x00\x01\xb3', b'0&\xb2u')
_MP4_BOXES = (b'ftyp', b'moov', b'mdat', b'free', b'wide', b'skip')
# swscale failures on odd frames (broken sizes, pixel formats it cannot convert) surface as either.
_CONVERT_ERRORS = (av.FFmpegError, ValueError)


class DecodeError(Exception):
  """Raised for any bad input; .reason is one of REASONS, .path the file; str() is a clear message."""

  def __init__(self, path, reason, detail=''):
    if reason not in REASONS:
      raise ValueError(f'unknown reason {reason!r}; expected one of {REASONS}')
    self.path, self.reason, self.detail = str(path), reason, str(detail)
    message = f'{self.path}: {reason}: {_MESSAGES[reason]}'
    super().__init__(f'{message} ({self.detail})' if self.detail else message)

  def __reduce__(self):
    # Grain worker processes pickle exceptions; the default would call __init__(message) only.
    return DecodeError, (self.path, self.reason, self.detail)


@dataclasses.dataclass(frozen=True)
class MediaInfo:
  path: str
  is_image: bool  # png/jpg/jpeg/webp/bmp still image (one frame)
  width: int  # display size: after rotation metadata (and non-square pixels)
  height: int
  duration: float  # seconds of video (0.0 for an image)
  fps: float  # average frame rate (0.0 for an image)
  num_frames: int  # estimated decodable frames (1 for an image)
  rotation: int  # degrees clockwise to apply for display: 0, 90, 180, 270


def probe(path) -> MediaInfo:
  """Cheap: container/stream headers plus the first frame. Raises DecodeError."""
  path = os.fspath(path)
  with _open(path) as container:
    stream = _video_stream(container, path)
    first = _first_frame(container, stream, path)
    rotation = _rotation(first, stream)
    width, height = _display_size(first.width, first.height, _sample_aspect(stream), rotation)
    if _is_image(container):
      return MediaInfo(path, True, width, height, 0.0, 0.0, 1, rotation)
    duration, fps = _duration(container, stream), _fps(stream)
    num_frames = stream.frames if stream.frames > 0 else int(round(duration * fps))
    if fps <= 0 < duration and num_frames > 0:
      fps = num_frames / duration
    return MediaInfo(path, False, width, height, duration, fps, max(num_frames, 1), rotation)


def decode_clip(path, *, start: float, num_frames: int, fps: float, size: tuple[int, int],
                crop: tuple[float, float] = (0.5, 0.5), info: MediaInfo | None = None) -> np.ndarray:
  """uint8 [num_frames, H, W, 3] RGB where (H, W) = size.

  Frame i shows the source at time start + i / fps (time 0 = the video stream's start). The upright
  source is scaled to cover `size` and a `size` window is cut at `crop` = (y, x) fractions of the
  slack (0.5, 0.5 = centre, (0, 0) = top-left). Images give one frame (asking more raises DecodeError
  'image_not_video'); start and fps are ignored for them.
  """
  path = os.fspath(path)
  _check_shape_args(num_frames, size, crop)
  info = info if info is not None else probe(path)
  if info.is_image:
    if num_frames != 1:
      # Bad input for a video dataset (e.g. a TFDS build of fixed-length clips), not a caller bug.
      raise DecodeError(path, 'image_not_video', f'num_frames={num_frames}')
    return _decode_image(path, size, crop, info.rotation)[None]
  if not (np.isfinite(start) and start >= 0):
    raise ValueError(f'start must be a finite time >= 0, got {start}')
  if not (np.isfinite(fps) and fps > 0):
    raise ValueError(f'fps must be > 0, got {fps}')
  times = start + np.arange(num_frames) / fps
  for backoff in _SEEK_BACKOFFS:
    frames = _pick_frames(path, times, backoff, size, crop, info.rotation)
    if frames is not None:
      return np.stack(frames)
  raise AssertionError('unreachable: the last backoff decodes from the beginning')


def _check_shape_args(num_frames, size, crop):
  if int(num_frames) != num_frames or num_frames < 1:
    raise ValueError(f'num_frames must be a positive integer, got {num_frames}')
  if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
    raise ValueError(f'size must be (height, width) positive integers, got {size}')
  if len(crop) != 2 or any(not 0 <= c <= 1 for c in crop):
    raise ValueError(f'crop must be two fractions in [0, 1], got {crop}')


# ---------------------------------------------------------------------------------------------------
# Opening and probing.


def _open(path: str):
  if not os.path.isfile(path):
    raise DecodeError(path, 'missing')
  if os.path.getsize(path) == 0:
    raise DecodeError(path, 'empty')
  try:
    # metadata_errors='ignore': users' files carry non-UTF-8 tags that must not make them unreadable.
    return av.open(path, metadata_errors='ignore')
  except FileNotFoundError:  # deleted since the check above
    raise DecodeError(path, 'missing') from None
  except (av.FFmpegError, OSError, ValueError) as e:
    reason = 'undecodable' if _has_media_magic(path) else 'not_media'
    raise DecodeError(path, reason, e) from None


def _has_media_magic(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      head = f.read(12)
  except OSError:
    return False
  return head.startswith(_MEDIA_MAGIC) or head[4:8] in _MP4_BOXES


def _video_stream(container, path: str):
  # Cover art in mp3/m4a files is a one-picture "video" stream; it is not a video.
  for stream in container.streams.video:
    if not stream.disposition & av.stream.Disposition.attached_pic:
      return stream
  raise DecodeError(path, 'no_video_stream', f'streams: {[s.type for s in container.streams]}')


def _first_frame(container, stream, path: str):
  for frame in _frames(container, stream, path, errors=[]):
    return frame
  raise DecodeError(path, 'undecodable', 'no frame decodes')


def _is_image(container) -> bool:
  # FFmpeg's still-image demuxers: image2 (by extension) and the *_pipe family (by content).
  name = container.format.name
  return name == 'image2' or name.endswith('_pipe')


def _rotation(frame, stream) -> int:
  """Clockwise degrees (0/90/180/270) that make the frame upright."""
  # frame.rotation is FFmpeg's av_display_rotation_get: counter-clockwise, so negate (as the ffmpeg
  # CLI's autorotate does). Older demuxers exported a clockwise 'rotate' tag instead.
  degrees = -getattr(frame, 'rotation', 0)
  if not degrees:
    try:
      degrees = float(stream.metadata.get('rotate', 0))
    except ValueError:
      degrees = 0
  return int(round(degrees / 90)) % 4 * 90


def _sample_aspect(stream) -> float:
  sar = stream.sample_aspect_ratio
  return float(sar) if sar and sar > 0 else 1.0


def _display_size(width, height, sar, rotation) -> tuple[int, int]:
  """(width, height) as displayed: non-square pixels stretched, then rotated."""
  width = max(1, int(round(width * sar)))
  return (height, width) if rotation % 180 else (width, height)


def _fps(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate and 0 < rate < 1000:  # 1000+ is a timebase masquerading as a rate (e.g. 90k mpegts)
      return float(rate)
  return 0.0


def _duration(container, stream) -> float:
  if stream.duration:
    return float(stream.duration * stream.time_base)
  tag = _parse_hms(stream.metadata.get('DURATION', ''))  # matroska muxers write a per-stream tag
  if tag:
    return tag
  return container.duration / av.time_base if container.duration else 0.0


def _parse_hms(text: str) -> float:
  m = re.fullmatch(r'(\d+):(\d+):(\d+(?:\.\d*)?)', text.strip())
  return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else 0.0


# ---------------------------------------------------------------------------------------------------
# Decoding.


def _frames(container, stream, path: str, errors: list):
  """Decoded frames in presentation order.

  Packets the decoder rejects are skipped (a long video with one bad packet still has good clips); a
  demuxer error is treated as the end of the file (truncation). Messages are appended to `errors`.
  """
  bad = 0
  try:
    for packet in container.demux(stream):
      try:
        frames = packet.decode()
      except av.FFmpegError as e:
        errors.append(str(e))
        bad += 1
        if bad > _MAX_BAD_PACKETS:
          raise DecodeError(path, 'undecodable', f'{bad} packets in a row fail: {e}') from None
        continue
      bad = 0
      yield from frames
    return
  except av.FFmpegError as e:
    errors.append(str(e))
  try:  # the demuxer died mid-file: flush the frames the decoder still holds
    yield from stream.codec_context.decode(None)
  except av.FFmpegError as e:
    errors.append(str(e))


def _stream_origin(stream) -> int:
  return stream.start_time if stream.start_time is not None else 0


def _seek(container, stream, seconds: float) -> bool:
  offset = _stream_origin(stream) + int(seconds / stream.time_base)
  try:
    container.seek(offset, stream=stream, backward=True, any_frame=False)
  except av.FFmpegError:
    return False
  return True


def _timed_frames(container, stream, path: str, errors: list):
  """(seconds since the stream start, frame), times strictly increasing."""
  origin, time_base = _stream_origin(stream), stream.time_base
  period = 1 / (_fps(stream) or 25.0)
  last = None
  for frame in _frames(container, stream, path, errors):
    if frame.pts is None:  # some avi / raw streams: extrapolate from the previous frame
      time = 0.0 if last is None else last + period
    else:
      time = float((frame.pts - origin) * time_base)
    if last is not None and time <= last:  # duplicate or out-of-order timestamp: keep the first
      continue
    last = time
    yield time, frame


def _pick_frames(path, times, backoff, size, crop, rotation):
  """One RGB array per target time, or None when the seek landed after times[0] (retry earlier)."""
  with _open(path) as container:
    stream = _video_stream(container, path)
    from_start = backoff is None or times[0] - backoff <= 0
    if not from_start and not _seek(container, stream, times[0] - backoff):
      return None
    convert = _cached_converter(size, crop, rotation, _sample_aspect(stream))
    errors, out = [], []
    prev = prev_time = gap = None
    try:
      for time, frame in _timed_frames(container, stream, path, errors):
        if prev is None:
          if not from_start and time > times[0] + _TIME_EPS:
            return None
          prev, prev_time = frame, time  # decoding from the start: earlier times show frame 0
        # `frame` is the first one later than times[i], so `prev` is what shows at times[i].
        while len(out) < len(times) and time > times[len(out)] + _TIME_EPS:
          out.append(convert(prev))
        if len(out) == len(times):
          return out
        if frame is not prev:
          prev, prev_time, gap = frame, time, time - prev_time
      if prev is None:
        where = 'from the start' if from_start else f'after seeking to {times[0] - backoff:.3f}s'
        last = f'; decoder: {errors[-1]}' if errors else ''
        raise DecodeError(path, 'undecodable', f'no frame decodes {where}{last}')
      # End of stream: the last frame lasts its own duration, else the last gap, else nominal.
      end = prev_time + (float(prev.duration * stream.time_base) if prev.duration else
                         gap or 1 / (_fps(stream) or 25.0))
      while len(out) < len(times) and times[len(out)] < end - _TIME_EPS:
        out.append(convert(prev))
    except _CONVERT_ERRORS as e:
      raise DecodeError(path, 'undecodable', e) from None
    if len(out) < len(times):
      detail = f'video ends at {end:.3f}s, clip needs {times[-1]:.3f}s'
      raise DecodeError(path, 'too_short', detail + (f'; decoder: {errors[-1]}' if errors else ''))
    return out


def _cached_converter(size, crop, rotation, sar):
  """_to_rgb that converts a frame repeated in the output (fps above the source's) only once."""
  last = {}

  def convert(frame):
    if last.get('frame') is not frame:
      last.update(frame=frame, rgb=_to_rgb(frame, size, crop, rotation, sar))
    return last['rgb']

  return convert


def _decode_image(path, size, crop, rotation) -> np.ndarray:
  with _open(path) as container:
    stream = _video_stream(container, path)
    frame = _first_frame(container, stream, path)
    try:
      return _to_rgb(frame, size, crop, rotation, _sample_aspect(stream))
    except _CONVERT_ERRORS as e:
      raise DecodeError(path, 'undecodable', e) from None


def _to_rgb(frame, size, crop, rotation, sar) -> np.ndarray:
  """Upright uint8 [H, W, 3]: cover-resize in swscale (stored orientation), rotate, crop."""
  out_h, out_w = size
  disp_w, disp_h = _display_size(frame.width, frame.height, sar, rotation)
  scale = max(out_h / disp_h, out_w / disp_w)
  cover_h = max(out_h, int(round(disp_h * scale)))
  cover_w = max(out_w, int(round(disp_w * scale)))
  stored_w, stored_h = (cover_h, cover_w) if rotation % 180 else (cover_w, cover_h)
  shrink = stored_w <= frame.width and stored_h <= frame.height
  rgb = frame.reformat(width=stored_w, height=stored_h, format='rgb24',
                       interpolation='AREA' if shrink else 'BICUBIC').to_ndarray()
  rgb = np.rot90(rgb, k=-(rotation // 90))  # k < 0 rotates clockwise
  top = int(round((cover_h - out_h) * crop[0]))
  left = int(round((cover_w - out_w) * crop[1]))
  return np.ascontiguousarray(rgb[top:top + out_h, left:left + out_w])

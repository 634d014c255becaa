"""Writers of small real media files for the video_decode tests (PyAV only, deterministic content).

Each writer takes a directory (tests pass pytest's tmp_path) and returns the written file's path.

Temporal content: frame k shows its index in binary as BITS horizontal bars, most significant bit on
top, white = 1 and black = 0. Full-width flat bars survive lossy codecs, chroma subsampling, any
horizontal crop and any vertical rescale that keeps the whole height, so `read_index` recovers k from a
decoded frame and a test can check which source frame was sampled at each output time.
"""

from __future__ import annotations

import fractions
import math
import os

import av
import numpy as np

BITS = 8  # frame indices 0..255
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# Variable frame rate: gaps of 20 ms and 60 ms alternate, so frame k is at VFR_TIMES_MS[k].
VFR_TIMES_MS = tuple(80 * (k // 2) + 20 * (k % 2) for k in range(40))
_MS = fractions.Fraction(1, 1000)


def index_frame(k: int, height: int, width: int) -> np.ndarray:
  """uint8 [height, width, 3]: k in binary as BITS horizontal bars (MSB on top)."""
  bar = np.arange(height) * BITS // height  # bar of each row
  bits = (k >> (BITS - 1 - bar)) & 1
  return np.broadcast_to((bits * 255).astype(np.uint8)[:, None, None], (height, width, 3)).copy()


def read_index(frame: np.ndarray) -> int:
  """Inverse of index_frame on a decoded [H, W, 3] frame: threshold the middle row of each bar."""
  height = frame.shape[0]
  rows = ((np.arange(BITS) + 0.5) * height / BITS).astype(int)
  bits = frame[rows].mean(axis=(1, 2)) > 127
  return int(sum(int(b) << (BITS - 1 - i) for i, b in enumerate(bits)))


def index_frames(n: int, height: int, width: int) -> np.ndarray:
  return np.stack([index_frame(k, height, width) for k in range(n)])


def stripes(height: int, width: int, colors=(RED, GREEN, BLUE)) -> np.ndarray:
  """Equal vertical stripes, left to right."""
  col = np.arange(width) * len(colors) // width
  return np.broadcast_to(np.array(colors, np.uint8)[col][None], (height, width, 3)).copy()


def upright_marker(height: int, width: int) -> np.ndarray:
  """Top half red, bottom half blue, a green square in the top-left corner: any rotation or mirror
  of it is distinguishable from it."""
  img = np.zeros((height, width, 3), np.uint8)
  img[:height // 2], img[height // 2:] = RED, BLUE
  side = min(height, width) // 3
  img[:side, :side] = GREEN
  return img


def write_video(path, frames, *, codec='libx264', fps=24, pix_fmt='yuv420p', options=None,
                container_options=None, times_ms=None, audio=False, display_matrix=None, gop=None):
  """Encode uint8 [T, H, W, 3] frames. times_ms: per-frame pts in ms (variable frame rate)."""
  frames = np.asarray(frames)
  with av.open(str(path), 'w', options=container_options or {}) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    stream.options = options or {}
    if gop:
      stream.codec_context.gop_size = gop
    if times_ms is not None:
      stream.codec_context.time_base = stream.time_base = _MS
    if display_matrix is not None:
      stream.set_display_matrix(display_matrix)
    sound = container.add_stream('aac', rate=16000, layout='mono') if audio else None
    for k, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      if times_ms is not None:
        frame.pts, frame.time_base = times_ms[k], _MS
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
    if sound is not None:  # after the video: the muxer interleaves by timestamp
      _write_sine(container, sound, seconds=len(frames) / fps)
  return str(path)


def _write_sine(container, stream, seconds, fmt='fltp'):
  """A 440 Hz tone; all streams must exist before the first packet is muxed."""
  rate, layout = stream.codec_context.sample_rate, stream.codec_context.layout.name
  size = stream.codec_context.frame_size or 1024
  t = np.arange(int(seconds * rate)) / rate
  wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  if fmt == 's16':
    wave = (wave * 32767).astype(np.int16)
  for start in range(0, len(wave), size):
    chunk = wave[None, start:start + size]
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout=layout)
    frame.sample_rate, frame.pts, frame.time_base = rate, start, fractions.Fraction(1, rate)
    container.mux(stream.encode(frame))
  container.mux(stream.encode())


# ---------------------------------------------------------------------------------------------------
# Videos whose frames carry their index (see module docstring).

_X264 = {'crf': '12', 'preset': 'ultrafast'}


def h264_mp4(d, n=48, fps=24, height=64, width=96, gop=12, name='h264.mp4', audio=True):
  """Landscape 96x64, 24 fps, 2 s, H.264 with B-frames plus an AAC track."""
  return write_video(os.path.join(d, name), index_frames(n, height, width), fps=fps, gop=gop,
                     options={'crf': '12', 'preset': 'fast'}, audio=audio)


def long_mp4(d):
  """10 s at 24 fps, keyframe every second: for checking that decode_clip does not decode it all."""
  return write_video(os.path.join(d, 'long.mp4'), index_frames(240, 32, 32), fps=24, gop=24,
                     options=_X264)


def vp9_webm(d, n=30, fps=30):
  return write_video(os.path.join(d, 'vp9.webm'), index_frames(n, 64, 96), codec='libvpx-vp9',
                     fps=fps, options={'deadline': 'realtime', 'cpu-used': '8', 'crf': '10',
                                       'b': '0'})


def mpeg4_avi(d, n=25, fps=25):
  return write_video(os.path.join(d, 'mpeg4.avi'), index_frames(n, 64, 96), codec='mpeg4',
                     fps=fps, options={'qscale': '2'})


def mpeg4_mov(d, n=30, fps=30):
  return write_video(os.path.join(d, 'mpeg4.mov'), index_frames(n, 64, 96), codec='mpeg4',
                     fps=fps, options={'qscale': '2'})


def ffv1_mkv(d, n=25, fps=25):
  return write_video(os.path.join(d, 'ffv1.mkv'), index_frames(n, 64, 96), codec='ffv1', fps=fps,
                     pix_fmt='bgr0')


def portrait_mp4(d, n=24, fps=24):
  """Stored and displayed 48x96 (width x height)."""
  return write_video(os.path.join(d, 'portrait.mp4'), index_frames(n, 96, 48), fps=fps,
                     options=_X264)


def odd_mkv(d, n=12, fps=12):
  """75x51: odd sizes rule out yuv420p; FFV1 in yuv444p takes them."""
  return write_video(os.path.join(d, 'odd.mkv'), index_frames(n, 51, 75), codec='ffv1', fps=fps,
                     pix_fmt='yuv444p')


def vfr_mkv(d):
  """FFV1 (lossless) at VFR_TIMES_MS in a 1 ms time base."""
  return write_video(os.path.join(d, 'vfr.mkv'), index_frames(len(VFR_TIMES_MS), 64, 64),
                     codec='ffv1', fps=25, pix_fmt='bgr0', times_ms=VFR_TIMES_MS)


def vfr_mp4(d):
  """H.264 at VFR_TIMES_MS (mp4 keeps per-sample durations)."""
  return write_video(os.path.join(d, 'vfr.mp4'), index_frames(len(VFR_TIMES_MS), 64, 64),
                     fps=25, options=_X264, times_ms=VFR_TIMES_MS)


VIDEO_WRITERS = {
    'h264.mp4': h264_mp4, 'vp9.webm': vp9_webm, 'mpeg4.avi': mpeg4_avi, 'mpeg4.mov': mpeg4_mov,
    'ffv1.mkv': ffv1_mkv, 'portrait.mp4': portrait_mp4, 'odd.mkv': odd_mkv,
}


# ---------------------------------------------------------------------------------------------------
# Spatial content.


def stripes_mkv(d, height=64, width=96, n=3):
  """Lossless red | green | blue vertical thirds."""
  return write_video(os.path.join(d, 'stripes.mkv'), np.stack([stripes(height, width)] * n),
                     codec='ffv1', pix_fmt='bgr0')


def portrait_halves_mkv(d, n=3):
  """48x96 portrait, top half red, bottom half green (no black anywhere)."""
  img = np.zeros((96, 48, 3), np.uint8)
  img[:48], img[48:] = RED, GREEN
  return write_video(os.path.join(d, 'portrait_halves.mkv'), np.stack([img] * n), codec='ffv1',
                     pix_fmt='bgr0')


def display_matrix(rotation_cw: int) -> list[int]:
  """FFmpeg display matrix (AV_PKT_DATA_DISPLAYMATRIX layout, 16.16 fixed point) for a player to
  rotate the stored picture clockwise by rotation_cw. For 90 it is the [0 1; -1 0] tkhd matrix that
  phones write for portrait video (av_display_rotation_get reads it as -90, i.e. counter-clockwise)."""
  c, s = round(math.cos(math.radians(rotation_cw))), round(math.sin(math.radians(rotation_cw)))
  return [c << 16, s << 16, 0, -s << 16, c << 16, 0, 0, 0, 1 << 30]


def rotated_mp4(d, rotation_cw=90, height=96, width=48, n=6):
  """Displays as upright_marker(height, width); stored rotated back by rotation_cw (so a 90 file is
  stored 96x48 landscape like a phone's portrait video)."""
  stored = np.rot90(upright_marker(height, width), k=rotation_cw // 90)  # k > 0: counter-clockwise
  return write_video(os.path.join(d, f'rot{rotation_cw}.mp4'), np.stack([stored] * n),
                     options=_X264, display_matrix=display_matrix(rotation_cw))


def sar_avi(d, n=3):
  """64x64 stored with 2:1 pixels (displays 128x64): left half red, right half blue."""
  img = stripes(64, 64, (RED, BLUE))
  path = os.path.join(d, 'sar.avi')
  with av.open(path, 'w') as container:
    stream = container.add_stream('mpeg4', rate=24)
    stream.width = stream.height = 64
    stream.pix_fmt, stream.options = 'yuv420p', {'qscale': '2'}
    stream.codec_context.sample_aspect_ratio = fractions.Fraction(2, 1)
    for _ in range(n):
      container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format='rgb24')))
    container.mux(stream.encode())
  return path


# ---------------------------------------------------------------------------------------------------
# Still images: upright_marker(32, 48) unless noted.


def write_image(path, image, *, codec, pix_fmt, fmt='image2'):
  image = np.asarray(image)
  src_format = {3: 'rgb24', 4: 'rgba'}.get(image.shape[-1]) if image.ndim == 3 else 'gray'
  with av.open(str(path), 'w', format=fmt, options={'update': '1'} if fmt == 'image2' else {}) as c:
    stream = c.add_stream(codec, rate=1)
    stream.height, stream.width = image.shape[:2]
    stream.pix_fmt = pix_fmt
    c.mux(stream.encode(av.VideoFrame.from_ndarray(image, format=src_format)))
    c.mux(stream.encode())
  return str(path)


def png(d):
  return write_image(os.path.join(d, 'img.png'), upright_marker(32, 48), codec='png',
                     pix_fmt='rgb24')


def jpg(d):
  return write_image(os.path.join(d, 'img.jpg'), upright_marker(32, 48), codec='mjpeg',
                     pix_fmt='yuvj444p')


def bmp(d):
  return write_image(os.path.join(d, 'img.bmp'), upright_marker(32, 48), codec='bmp',
                     pix_fmt='bgr24')


def webp(d):
  """None when this FFmpeg has no WebP encoder."""
  try:
    av.codec.Codec('libwebp', 'w')
  except Exception:  # noqa: BLE001 - any failure means "not available"
    return None
  return write_image(os.path.join(d, 'img.webp'), upright_marker(32, 48), codec='libwebp',
                     pix_fmt='yuv420p', fmt='webp')


def gray_png(d):
  """Left half grey 64, right half grey 192."""
  img = np.full((32, 48), 64, np.uint8)
  img[:, 24:] = 192
  return write_image(os.path.join(d, 'gray.png'), img, codec='png', pix_fmt='gray')


def rgba_png(d):
  """upright_marker colours, alpha 255 on the left half and 0 on the right."""
  img = np.concatenate([upright_marker(32, 48), np.full((32, 48, 1), 255, np.uint8)], axis=-1)
  img[:, 24:, 3] = 0
  return write_image(os.path.join(d, 'rgba.png'), img, codec='png', pix_fmt='rgba')


def exif_rotated_jpg(d):
  """A JPEG stored as upright_marker rotated counter-clockwise, with EXIF Orientation 6 (rotate 90
  clockwise to display), as phone cameras write."""
  path = write_image(os.path.join(d, 'exif.jpg'), np.rot90(upright_marker(48, 32)), codec='mjpeg',
                     pix_fmt='yuvj444p')
  # APP1 'Exif' segment: big-endian TIFF header, one IFD entry 0x0112 (Orientation) SHORT = 6.
  tiff = (b'MM\x00\x2a\x00\x00\x00\x08'  # header, IFD at offset 8
          b'\x00\x01'  # one entry
          b'\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00'  # tag, type SHORT, count 1, value 6
          b'\x00\x00\x00\x00')  # no next IFD
  payload = b'Exif\x00\x00' + tiff
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:2] + b'\xff\xe1' + (len(payload) + 2).to_bytes(2, 'big') + payload + data[2:])
  return path


# ---------------------------------------------------------------------------------------------------
# Broken inputs.


def missing(d):
  return os.path.join(d, 'does_not_exist.mp4')


def empty_mp4(d):
  path = os.path.join(d, 'empty.mp4')
  open(path, 'wb').close()
  return path


def text_as_mp4(d):
  path = os.path.join(d, 'notes.mp4')
  with open(path, 'w') as f:
    f.write('this is a text file, not a video\n' * 20)
  return path


def random_mkv(d):
  path = os.path.join(d, 'random.mkv')
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
  return path


def audio_m4a(d):
  path = os.path.join(d, 'audio.m4a')
  with av.open(path, 'w') as container:
    _write_sine(container, container.add_stream('aac', rate=16000, layout='mono'), seconds=1.0)
  return path


def audio_wav(d):
  path = os.path.join(d, 'audio.wav')
  with av.open(path, 'w') as container:
    stream = container.add_stream('pcm_s16le', rate=16000, layout='mono')
    _write_sine(container, stream, seconds=0.5, fmt='s16')
  return path


def truncated_mp4(d, fraction=0.4, faststart=True):
  """Index frames (with noise in the right quarter so that the frame data, not the index, makes up
  most of the file) cut to `fraction` of their bytes. faststart puts the index (moov) first, so the
  file still opens and its first part decodes; without it the index, written last, is gone."""
  frames = index_frames(48, 64, 96)
  frames[:, :, -24:] = np.random.default_rng(0).integers(0, 256, (48, 64, 24, 3), dtype=np.uint8)
  name = f'truncated_{"faststart" if faststart else "moov_last"}.mp4'
  path = write_video(os.path.join(d, name), frames, gop=12, options=_X264,
                     container_options={'movflags': 'faststart'} if faststart else None)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:int(len(data) * fraction)])
  return path

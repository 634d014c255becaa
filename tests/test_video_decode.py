"""Tests for data_pipelines.video_decode on real files written by tests/media_fixtures.py."""

import math
import os
import pickle
import sys

import numpy as np
import pytest

from data_pipelines import video_decode as vd

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

# (writer, width, height, fps, num_frames) of the index-coded videos.
VIDEOS = {
    'h264.mp4': (mf.h264_mp4, 96, 64, 24, 48),
    'vp9.webm': (mf.vp9_webm, 96, 64, 30, 30),
    'mpeg4.avi': (mf.mpeg4_avi, 96, 64, 25, 25),
    'mpeg4.mov': (mf.mpeg4_mov, 96, 64, 30, 30),
    'ffv1.mkv': (mf.ffv1_mkv, 96, 64, 25, 25),
    'portrait.mp4': (mf.portrait_mp4, 48, 96, 24, 24),
    'odd.mkv': (mf.odd_mkv, 75, 51, 12, 12),
}


@pytest.fixture(scope='module')
def media_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('media'))


@pytest.fixture(scope='module')
def write(media_dir):
  """write(mf.writer, *args) -> path, each file written once per module."""
  cache = {}

  def get(writer, *args):
    key = (writer.__name__, args)
    if key not in cache:
      cache[key] = writer(media_dir, *args)
    return cache[key]

  return get


def indices(clip):
  return [mf.read_index(frame) for frame in clip]


def expected_indices(start, num_frames, fps, src_fps):
  """Index of the latest source frame at or before each output time."""
  return [math.floor((start + i / fps) * src_fps + 1e-6) for i in range(num_frames)]


def region_mean(image, rows, cols):
  return image[rows, cols].reshape(-1, 3).mean(axis=0)


def assert_color(image, rows, cols, rgb, tol=40):
  np.testing.assert_allclose(region_mean(image, rows, cols), rgb, atol=tol)


def assert_marker(image):
  """image shows mf.upright_marker upright: green top-left, red top-right, blue bottom."""
  h, w = image.shape[:2]
  side = min(h, w) // 3
  assert_color(image, slice(1, side - 1), slice(1, side - 1), mf.GREEN)
  assert_color(image, slice(1, h // 2 - 1), slice(side + 1, w - 1), mf.RED)
  assert_color(image, slice(h // 2 + 1, h - 1), slice(1, w - 1), mf.BLUE)


# ---------------------------------------------------------------------------------------------------
# Probe.


@pytest.mark.parametrize('name', VIDEOS)
def test_probe_videos(write, name):
  writer, width, height, fps, n = VIDEOS[name]
  info = vd.probe(write(writer))
  assert (info.width, info.height, info.is_image, info.rotation) == (width, height, False, 0)
  assert info.fps == pytest.approx(fps, rel=0.01)
  assert info.duration == pytest.approx(n / fps, abs=1 / fps)
  assert abs(info.num_frames - n) <= 1


@pytest.mark.parametrize('writer', [mf.png, mf.jpg, mf.bmp, mf.webp, mf.gray_png, mf.rgba_png])
def test_probe_images(write, writer):
  path = write(writer)
  if path is None:
    pytest.skip('no WebP encoder in this FFmpeg')
  assert vd.probe(path) == vd.MediaInfo(path, True, 48, 32, 0.0, 0.0, 1, 0)


@pytest.mark.parametrize('rotation', [90, 180, 270])
def test_probe_rotation_reports_display_size(write, rotation):
  info = vd.probe(write(mf.rotated_mp4, rotation))
  # 90/270 are stored 96x48 (landscape) and 180 is stored 48x96; all display 48 wide, 96 tall.
  assert (info.rotation, info.width, info.height) == (rotation, 48, 96)


def test_probe_vfr(write):
  for writer in (mf.vfr_mkv, mf.vfr_mp4):
    info = vd.probe(write(writer))
    assert info.num_frames == len(mf.VFR_TIMES_MS)
    # Average rate: 2 frames per 80 ms.
    assert info.fps == pytest.approx(25, rel=0.05)
    assert info.duration == pytest.approx(mf.VFR_TIMES_MS[-1] / 1000, abs=0.07)


# ---------------------------------------------------------------------------------------------------
# Temporal sampling.


@pytest.mark.parametrize('name', VIDEOS)
def test_decode_every_format_at_native_rate(write, name):
  writer, width, height, fps, n = VIDEOS[name]
  path = write(writer)
  start = 3.5 / fps  # halfway between frames 3 and 4, so a rounding error shows
  clip = vd.decode_clip(path, start=start, num_frames=6, fps=fps, size=(height, width))
  assert clip.dtype == np.uint8 and clip.shape == (6, height, width, 3)
  assert indices(clip) == [3, 4, 5, 6, 7, 8]
  # Every frame from the start: targets fall exactly on frame times, which 1 ms container time bases
  # (webm, mkv) round up, e.g. frame 2 of 30 fps at 0.067 s > 2 / 30.
  whole = vd.decode_clip(path, start=0, num_frames=n, fps=fps, size=(height, width))
  assert indices(whole) == list(range(n))
  # Resized (cover + crop) too: the shape follows `size` whatever the source.
  small = vd.decode_clip(path, start=start, num_frames=2, fps=fps, size=(24, 40),
                         info=vd.probe(path))
  assert small.shape == (2, 24, 40, 3)


@pytest.mark.parametrize('fps, start', [(10, 0.02), (60, 0.01), (24, 1.51), (7, 0.8)])
def test_resampled_rates(write, fps, start):
  """Output fps below and above the source's 24 fps: drop or repeat frames by time."""
  path = write(mf.h264_mp4)
  n = min(12, int((2.0 - start) * fps))
  clip = vd.decode_clip(path, start=start, num_frames=n, fps=fps, size=(64, 96))
  assert indices(clip) == expected_indices(start, n, fps, 24)


@pytest.mark.parametrize('writer', [mf.vfr_mkv, mf.vfr_mp4])
@pytest.mark.parametrize('start', [0.01, 0.85])
def test_variable_frame_rate_sampled_by_time(write, writer, start):
  path = write(writer)
  fps, n = 50, 20
  clip = vd.decode_clip(path, start=start, num_frames=n, fps=fps, size=(64, 64))
  times_ms = [1000 * (start + i / fps) for i in range(n)]
  want = [max(k for k, t in enumerate(mf.VFR_TIMES_MS) if t <= tm + 1e-6) for tm in times_ms]
  assert indices(clip) == want
  # Index-based sampling at the average 25 fps would give a different answer.
  assert want != expected_indices(start, n, fps, 25)


def test_whole_video_and_past_the_end(write):
  path = write(mf.h264_mp4)
  assert indices(vd.decode_clip(path, start=0, num_frames=48, fps=24, size=(64, 96))) == list(
      range(48))
  for start, n in [(0, 49), (1.9, 4), (5.0, 1)]:
    with pytest.raises(vd.DecodeError) as e:
      vd.decode_clip(path, start=start, num_frames=n, fps=24, size=(64, 96))
    assert e.value.reason == 'too_short'


def test_decodes_only_what_it_needs(write, monkeypatch):
  path = write(mf.long_mp4)  # 240 frames, a keyframe every 24
  decoded = []
  frames = vd._frames

  def counting(*args, **kwargs):
    for frame in frames(*args, **kwargs):
      decoded.append(frame.pts)
      yield frame

  monkeypatch.setattr(vd, '_frames', counting)
  info = vd.probe(path)
  decoded.clear()
  clip = vd.decode_clip(path, start=9.0, num_frames=8, fps=24, size=(32, 32), info=info)
  assert indices(clip) == list(range(216, 224))
  # From the keyframe at or before 9.0 - backoff (at worst frame 192) to one frame past 223.
  assert len(decoded) <= 224 - 192 + 1


def test_seek_overshoot_is_retried(write, monkeypatch):
  """A seek that lands after the clip start (bad index) must not shift the clip."""
  path = write(mf.long_mp4)
  seek = vd._seek
  monkeypatch.setattr(vd, '_seek', lambda c, s, seconds: seek(c, s, seconds + 2.0))
  clip = vd.decode_clip(path, start=5.0, num_frames=3, fps=24, size=(32, 32))
  assert indices(clip) == [120, 121, 122]


# ---------------------------------------------------------------------------------------------------
# Spatial: cover-resize, crop, rotation.


@pytest.mark.parametrize('size, crop, colors', [
    ((64, 32), (0.5, 0.0), [mf.RED]),
    ((64, 32), (0.5, 0.5), [mf.GREEN]),
    ((64, 32), (0.5, 1.0), [mf.BLUE]),
    ((128, 64), (0.0, 0.0), [mf.RED]),  # upscaled x2: a 64-wide window is one stripe
    ((128, 64), (1.0, 1.0), [mf.BLUE]),
    ((32, 48), (0.5, 0.5), [mf.RED, mf.GREEN, mf.BLUE]),  # same aspect: nothing cut
])
def test_cover_resize_and_crop(write, size, crop, colors):
  clip = vd.decode_clip(write(mf.stripes_mkv), start=0, num_frames=1, fps=24, size=size, crop=crop)
  assert clip.shape == (1, *size, 3)
  w = size[1] // len(colors)
  for j, color in enumerate(colors):
    assert_color(clip[0], slice(None), slice(j * w + 1, (j + 1) * w - 1), color, tol=3)


def test_portrait_into_landscape_has_no_bars(write):
  path = write(mf.portrait_halves_mkv)  # 48x96: red top, green bottom
  centre = vd.decode_clip(path, start=0, num_frames=1, fps=24, size=(32, 64))[0]
  assert centre.max(axis=-1).min() > 200  # every pixel is red or green: no black bars
  assert_color(centre, slice(0, 15), slice(None), mf.RED, tol=3)
  assert_color(centre, slice(17, 32), slice(None), mf.GREEN, tol=3)
  top = vd.decode_clip(path, start=0, num_frames=1, fps=24, size=(32, 64), crop=(0, 0.5))[0]
  assert_color(top, slice(None), slice(None), mf.RED, tol=3)


@pytest.mark.parametrize('rotation', [90, 180, 270])
@pytest.mark.parametrize('size', [(96, 48), (48, 24)])
def test_rotation_comes_out_upright(write, rotation, size):
  path = write(mf.rotated_mp4, rotation)
  clip = vd.decode_clip(path, start=0.05, num_frames=2, fps=24, size=size)
  assert clip.shape == (2, *size, 3)
  assert_marker(clip[0])


def test_rotated_into_landscape_covers(write):
  # Upright 48x96 marker into 32x64: a band across the middle, red above blue, no bars.
  clip = vd.decode_clip(write(mf.rotated_mp4, 90), start=0, num_frames=1, fps=24, size=(32, 64))
  assert_color(clip[0], slice(1, 14), slice(None), mf.RED)
  assert_color(clip[0], slice(18, 31), slice(None), mf.BLUE)


def test_non_square_pixels(write):
  path = write(mf.sar_avi)  # stored 64x64 red | blue with 2:1 pixels: displays 128x64
  info = vd.probe(path)
  assert (info.width, info.height) == (128, 64)
  left = vd.decode_clip(path, start=0, num_frames=1, fps=24, size=(64, 64), crop=(0.5, 0))
  right = vd.decode_clip(path, start=0, num_frames=1, fps=24, size=(64, 64), crop=(0.5, 1))
  assert_color(left[0], slice(None), slice(None), mf.RED)
  assert_color(right[0], slice(None), slice(None), mf.BLUE)


# ---------------------------------------------------------------------------------------------------
# Images.


@pytest.mark.parametrize('writer', [mf.png, mf.jpg, mf.bmp, mf.webp])
def test_images(write, writer):
  path = write(writer)
  if path is None:
    pytest.skip('no WebP encoder in this FFmpeg')
  image = vd.decode_clip(path, start=0, num_frames=1, fps=1, size=(32, 48))
  assert image.shape == (1, 32, 48, 3) and image.dtype == np.uint8
  assert_marker(image[0])
  # start and fps mean nothing for an image, so they are not checked.
  assert vd.decode_clip(path, start=-1, num_frames=1, fps=0, size=(16, 16)).shape == (1, 16, 16, 3)
  with pytest.raises(vd.DecodeError, match='image_not_video'):
    vd.decode_clip(path, start=0, num_frames=2, fps=1, size=(32, 48))


def test_gray_and_rgba_images_become_rgb(write):
  gray = vd.decode_clip(write(mf.gray_png), start=0, num_frames=1, fps=1, size=(32, 48))[0]
  assert gray.shape == (32, 48, 3)
  np.testing.assert_array_equal(gray[:, :24], 64)
  np.testing.assert_array_equal(gray[:, 24:], 192)
  rgba = vd.decode_clip(write(mf.rgba_png), start=0, num_frames=1, fps=1, size=(32, 48))[0]
  assert rgba.shape == (32, 48, 3)
  assert_marker(rgba)  # alpha is dropped, colours kept (also under alpha 0)


def test_exif_orientation(write):
  path = write(mf.exif_rotated_jpg)
  info = vd.probe(path)
  assert (info.rotation, info.width, info.height) == (90, 32, 48)
  assert_marker(vd.decode_clip(path, start=0, num_frames=1, fps=1, size=(48, 32))[0])


# ---------------------------------------------------------------------------------------------------
# Broken inputs.


@pytest.mark.parametrize('writer, reason', [
    (mf.missing, 'missing'),
    (mf.empty_mp4, 'empty'),
    (mf.text_as_mp4, 'not_media'),
    (mf.random_mkv, 'not_media'),
    (mf.audio_m4a, 'no_video_stream'),
    (mf.audio_wav, 'no_video_stream'),
])
def test_broken_inputs(write, writer, reason):
  path = write(writer)
  for call in (lambda: vd.probe(path),
               lambda: vd.decode_clip(path, start=0, num_frames=2, fps=24, size=(16, 16))):
    with pytest.raises(vd.DecodeError) as e:
      call()
    assert e.value.reason == reason and e.value.path == path
    assert path in str(e.value) and reason in str(e.value)


def test_truncated_without_index(write):
  path = write(mf.truncated_mp4, 0.4, False)  # moov atom (written last) cut off
  with pytest.raises(vd.DecodeError) as e:
    vd.probe(path)
  assert e.value.reason == 'undecodable'


def test_truncated_with_index_first(write):
  path = write(mf.truncated_mp4, 0.4, True)  # 40% of 2 s: the first ~0.8 s survive
  info = vd.probe(path)
  assert info.duration == pytest.approx(2.0)  # the header still claims the full length
  clip = vd.decode_clip(path, start=0.1, num_frames=8, fps=24, size=(64, 96), info=info)
  assert indices(clip) == expected_indices(0.1, 8, 24, 24)
  for start in (0.6, 1.0, 1.8):
    with pytest.raises(vd.DecodeError) as e:
      vd.decode_clip(path, start=start, num_frames=8, fps=24, size=(64, 96), info=info)
    assert e.value.reason in ('too_short', 'undecodable')


def test_corrupt_middle_never_leaks_av_errors(write, media_dir):
  with open(write(mf.h264_mp4), 'rb') as f:
    data = bytearray(f.read())
  rng = np.random.default_rng(1)
  lo, hi = len(data) // 4, len(data) * 3 // 4  # mdat payload (the moov is at the end)
  data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
  path = os.path.join(media_dir, 'corrupt.mp4')
  with open(path, 'wb') as f:
    f.write(data)
  for start in (0.0, 0.5, 1.0, 1.5):
    try:
      clip = vd.decode_clip(path, start=start, num_frames=4, fps=24, size=(32, 48))
      assert clip.shape == (4, 32, 48, 3)
    except vd.DecodeError as e:
      assert e.reason in ('undecodable', 'too_short')


def test_decode_error_pickles_and_checks_reason():
  e = pickle.loads(pickle.dumps(vd.DecodeError('/x.mp4', 'too_short', 'ends at 1s')))
  assert (e.path, e.reason, e.detail) == ('/x.mp4', 'too_short', 'ends at 1s')
  assert str(e) == str(vd.DecodeError('/x.mp4', 'too_short', 'ends at 1s'))
  with pytest.raises(ValueError):
    vd.DecodeError('/x.mp4', 'bad_reason')


@pytest.mark.parametrize('kwargs', [
    dict(num_frames=0), dict(fps=0), dict(start=-1), dict(size=(0, 8)), dict(crop=(0.5, 1.5)),
    dict(size=(8,)),
])
def test_bad_arguments(write, kwargs):
  args = dict(start=0, num_frames=2, fps=24, size=(16, 16)) | kwargs
  with pytest.raises(ValueError):
    vd.decode_clip(write(mf.h264_mp4), **args)

"""data_pipelines.tfds_builder: manifest -> ArrayRecord TFDS dataset -> Grain, without TensorFlow.

Decoding uses a tiny PyAV decoder defined here with video_decode's interface, so these
tests do not depend on data_pipelines.video_decode (the last test does, when present).
"""

import csv
import sys

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import tfds_builder

# caption -> constant grey level of its video (h264 keeps flat frames within a few levels)
GOOD = {'a red fox': 40, 'ein Fuchs über Schnee ❄': 130, 'a fox, "quoted"': 220}
SHAPE = dict(num_frames=4, fps=4.0, height=8, width=8)


class DecodeError(Exception):

  def __init__(self, reason, path):
    super().__init__(f'{reason}: {path}')
    self.reason, self.path = reason, path


def pyav_decode_clip(path, *, start, num_frames, fps, size, crop=(0.5, 0.5), info=None):
  """Frames at start + i/fps (nearest source frame), nearest-neighbour resized."""
  del crop, info
  try:
    with av.open(path) as container:
      stream = container.streams.video[0]
      src_fps = float(stream.average_rate)
      frames = [f.to_ndarray(format='rgb24') for f in container.decode(stream)]
  except FileNotFoundError as e:
    raise DecodeError('missing', path) from e
  except av.FFmpegError as e:
    raise DecodeError('undecodable', path) from e
  index = np.round((start + np.arange(num_frames) / fps) * src_fps).astype(int)
  if not frames or index[-1] >= len(frames):
    raise DecodeError('too_short', path)
  clip = np.stack([frames[i] for i in index])
  rows = np.arange(size[0]) * clip.shape[1] // size[0]
  cols = np.arange(size[1]) * clip.shape[2] // size[1]
  return clip[:, rows][:, :, cols]


def _write_mp4(path, level, num_frames=8, fps=8, side=16):
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width = stream.height = side
    stream.pix_fmt = 'yuv420p'
    for _ in range(num_frames):
      frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), level, np.uint8), 'rgb24')
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


@pytest.fixture
def manifest(tmp_path):
  """3 good videos (relative, nested-relative and absolute paths) + 1 missing + 1 empty caption."""
  (tmp_path / 'clips').mkdir()
  names = ['a.mp4', 'clips/b.mp4', str(tmp_path / 'c.mp4')]
  for name, level in zip(names, GOOD.values()):
    _write_mp4(tmp_path / name, level)
  rows = [{'path': n, 'caption': c, 'start': '', 'end': ''} for n, c in zip(names, GOOD)]
  rows[0]['start'] = '0.125'
  rows[2].update(start='0', end='1.0')  # a 1 s window: exactly 4 frames at 4 fps
  rows.insert(1, {'path': 'gone.mp4', 'caption': 'never written', 'start': '', 'end': ''})
  rows.append({'path': 'a.mp4', 'caption': '  ', 'start': '', 'end': ''})
  path = tmp_path / 'manifest.csv'
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, ['path', 'caption', 'start', 'end'])
    writer.writeheader()
    writer.writerows(rows)
  return path


def _build(manifest, data_dir, **kwargs):
  config = tfds_builder.CaptionedVideosConfig(name='tiny', manifest=str(manifest), **SHAPE)
  builder = tfds_builder.CaptionedVideos(config=config, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare()
  return builder


def _check_examples(examples, tmp_path):
  assert sorted(e['caption'] for e in examples) == sorted(GOOD)
  for e in examples:
    assert e['video'].dtype == np.uint8 and e['video'].shape == (4, 8, 8, 3)
    assert abs(float(e['video'].mean()) - GOOD[e['caption']]) < 6, e['caption']
    assert e['path'].startswith(str(tmp_path)) and e['path'].endswith('.mp4')


def test_build_skip_and_read_back_without_tensorflow(manifest, tmp_path, caplog):
  data_dir = tmp_path / 'tfds'
  with caplog.at_level('WARNING'):
    builder = _build(manifest, data_dir, decode_fn=pyav_decode_clip, skip_errors=(DecodeError,))
  assert dict(builder.skip_counts) == {'missing': 1, 'empty_caption': 1}
  assert [w.rsplit('/', 1)[1] for w, _ in builder.skipped] == ['gone.mp4', 'a.mp4']
  assert 'skipped 2 of 5 rows' in caplog.text and 'gone.mp4' in caplog.text
  assert builder.info.splits['train'].num_examples == 3
  assert list((data_dir / 'captioned_videos' / 'tiny' / '1.0.0').glob('*.array_record*'))

  source = builder.as_data_source()['train']  # raw TFDS source: Text comes back as bytes
  assert len(source) == 3 and isinstance(source[0]['caption'], bytes)

  # Reading needs only the files: no config, manifest or decoder.
  ds = tfds_builder.grain_dataset('tiny', data_dir=data_dir)
  assert len(ds) == 3
  _check_examples(list(ds), tmp_path)
  meta = tfds.builder_from_directory(str(data_dir / 'captioned_videos/tiny/1.0.0')).info.metadata
  assert meta['skipped'] == {'empty_caption': 1, 'missing': 1} and meta['manifest_rows'] == 5
  assert 'tensorflow' not in sys.modules


def test_with_real_video_decode(manifest, tmp_path):
  pytest.importorskip('data_pipelines.video_decode')
  builder = _build(manifest, tmp_path / 'tfds')
  assert dict(builder.skip_counts) == {'missing': 1, 'empty_caption': 1}
  _check_examples(list(tfds_builder.grain_dataset('tiny', data_dir=tmp_path / 'tfds')), tmp_path)

"""TFDS builder: a manifest of captioned videos -> an ArrayRecord TFDS dataset for Grain.

The manifest is a CSV with a header or a JSONL file with `path` (absolute, or relative
to the manifest's folder) and `caption`, and optional `start` / `end` seconds. Each
good row becomes one example {'video': uint8 [T, H, W, 3], 'caption', 'path'}: `T`
frames at `fps` from `start`, resized / centre-cropped to (height, width).

Rows that cannot become an example are skipped, never fatal: a decode error (its
`.reason`: missing, empty, not_media, no_video_stream, undecodable, too_short), a
caption that is not a string ('caption_not_str') or is blank ('empty_caption'), a
[start, end] window shorter than the clip ('too_short'), or an unparsable row
('bad_row'). The builder logs a summary and stores it in `info.metadata['skipped']`.

No TensorFlow needed: with file_format='array_record', TFDS 4.9 writes and reads
Tensor / Text features with numpy only. (`tfds.features.Video` would need TensorFlow
and ffmpeg, so the video is a zlib-compressed uint8 Tensor instead.)

  config = CaptionedVideosConfig(name='my_videos', manifest='/data/m.csv', num_frames=16,
                                 fps=8, height=64, width=64)
  CaptionedVideos(config=config, data_dir=d).download_and_prepare()
  ds = grain_dataset('my_videos', data_dir=d)   # no manifest or decoder needed to read
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import manifest as manifest_lib

NAME = 'captioned_videos'
_MAX_SKIPPED_LISTED = 10_000  # paths kept in metadata.json; counts are always exact
_EXAMPLES_PER_REASON_LOGGED = 3


@dataclasses.dataclass(eq=False)
class CaptionedVideosConfig(tfds.core.BuilderConfig):
  """One dataset = one manifest at one clip shape. `name` names the output folder."""
  manifest: str = ''
  num_frames: int = 16
  fps: float = 8.0
  height: int = 64
  width: int = 64


class CaptionedVideos(tfds.core.GeneratorBasedBuilder):
  """Captioned video folder -> fixed-shape clips. Build with a CaptionedVideosConfig."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = []  # every dataset is a user config: there is no default manifest

  def __init__(self, *, decode_fn: Callable | None = None,
               skip_errors: tuple[type[BaseException], ...] | None = None, **kwargs):
    """decode_fn: like video_decode.decode_clip(path, *, start, num_frames, fps, size).

    skip_errors: exception types meaning "bad input file, skip it"; their `.reason`
    is the skip reason. Both default to data_pipelines.video_decode (imported only
    when generating, so reading never needs a decoder).
    """
    # Set before super().__init__, which already builds `info`.
    self._decode_fn = decode_fn
    self._skip_errors = skip_errors
    self.skipped: list[tuple[str, str]] = []  # (path or manifest:line, reason), last build
    # TFDS's default, tfrecord, needs TensorFlow; array_record is what Grain reads.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  @property
  def skip_counts(self) -> collections.Counter:
    return collections.Counter(reason for _, reason in self.skipped)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    if not isinstance(c, CaptionedVideosConfig):
      raise ValueError(f'{NAME} needs config=CaptionedVideosConfig(...), got {c!r};'
                       f' to read an existing dataset without its config use grain_dataset().')
    return tfds.core.DatasetInfo(
        builder=self,
        description='Captioned video clips from a user manifest.',
        features=tfds.features.FeaturesDict({
            # ZLIB: raw frames compress well enough and need no TF or ffmpeg to decode.
            'video': tfds.features.Tensor(shape=(c.num_frames, c.height, c.width, 3),
                                          dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
            'caption': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    if not self.builder_config.manifest:
      raise ValueError('CaptionedVideosConfig.manifest is empty')
    return {'train': self._generate_examples(self.builder_config.manifest)}

  def _generate_examples(self, manifest: str) -> Iterator[tuple[int, dict]]:
    decode_fn, skip_errors = self._decoder()
    c = self.builder_config
    self.skipped = []
    num_rows = 0
    for key, row in enumerate(manifest_lib.read_manifest(manifest)):
      num_rows += 1
      reason = row.error or manifest_lib.check_row(row, c.num_frames, c.fps)
      if reason is None:
        try:
          video = decode_fn(row.path, start=row.start, num_frames=c.num_frames, fps=c.fps,
                            size=(c.height, c.width))
        except skip_errors as e:
          reason = str(getattr(e, 'reason', None) or type(e).__name__)
      if reason is not None:
        self.skipped.append((row.where, reason))
        continue
      _check_video(video, row.path, (c.num_frames, c.height, c.width, 3))
      # The row index is the key: unique even when one file gives several windows.
      yield key, {'video': video, 'caption': row.caption, 'path': row.path}
    self._record_skips(manifest, num_rows)

  def _decoder(self):
    decode_fn, skip_errors = self._decode_fn, self._skip_errors
    if decode_fn is None or skip_errors is None:
      from data_pipelines import \
          video_decode  # pylint: disable=import-outside-toplevel
      decode_fn = decode_fn or video_decode.decode_clip
      skip_errors = skip_errors if skip_errors is not None else (video_decode.DecodeError,)
    return decode_fn, tuple(skip_errors)

  def _record_skips(self, manifest: str, num_rows: int):
    counts = self.skip_counts
    self.info.metadata['skipped'] = dict(sorted(counts.items()))
    self.info.metadata['skipped_paths'] = [list(s) for s in self.skipped[:_MAX_SKIPPED_LISTED]]
    self.info.metadata['manifest_rows'] = num_rows
    if not counts:
      logging.info('%s: all %d rows of %s kept', NAME, num_rows, manifest)
      return
    logging.warning('%s: skipped %d of %d rows of %s', NAME, len(self.skipped), num_rows,
                    manifest)
    for reason, count in counts.most_common():
      where = [w for w, r in self.skipped if r == reason][:_EXAMPLES_PER_REASON_LOGGED]
      logging.warning('  %s: %d (e.g. %s)', reason, count, ', '.join(where))


def _check_video(video, path: str, shape: tuple[int, ...]):
  # A wrong shape here is a decoder bug, not a bad input file: fail loudly.
  if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.shape != shape:
    got = (getattr(video, 'dtype', type(video).__name__), getattr(video, 'shape', None))
    raise ValueError(f'decode_fn returned {got} for {path}; expected uint8 {shape}')


def to_python(example: dict) -> dict:
  """TFDS returns Text features as bytes; make them str like data_pipelines.records."""
  return {k: v.decode('utf-8') if isinstance(v, bytes) else v for k, v in example.items()}


def grain_dataset(config_name: str, *, data_dir: str | os.PathLike,
                  split: str = 'train') -> grain.MapDataset:
  """A built dataset as a Grain MapDataset, read from its files (no config/decoder needed)."""
  source = tfds.data_source(f'{NAME}/{config_name}', split=split, data_dir=os.fspath(data_dir),
                            download=False)
  return grain.MapDataset.source(source).map(to_python)

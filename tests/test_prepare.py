"""data_pipelines.prepare: manifest -> ArrayRecord shards -> training batches; skips; resume."""

import json
import os
import sys

import numpy as np
import pytest
from conftest import bucketed_config

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

from data_pipelines import bucketed, pipeline, prepare, records, video_decode
from sora_jax.config import buckets as buckets_lib

TABLE = ((4, 16, 16), (4, 16, 24), (4, 24, 16), (1, 16, 16))
SHARD_SIZE = 3


def _config(**data):
  # 1-frame (image) buckets need a temporal patch of 1.
  c = bucketed_config(TABLE, (1, 4, 4), **{'max_skip_fraction': 0.5, **data})
  c.batch_size = 2  # every bucket: global batch 2
  return c


@pytest.fixture(scope='module')
def media(tmp_path_factory):
  """11 indexable rows (one of which fails only when decoded) and 3 rows skipped at index time."""
  d = tmp_path_factory.mktemp('media')
  land = mf.h264_mp4(d, n=24, audio=False)  # 96x64, 1 s
  portrait = mf.portrait_mp4(d)  # 48x96, 1 s
  square = mf.vfr_mkv(d)  # 64x64, ~1.6 s
  png, jpg = mf.png(d), mf.jpg(d)
  # Probes as 2 s but its data ends at 0.75 s: a clip from 1 s fails at decode time only.
  truncated = mf.truncated_mp4(d, fraction=0.4)
  rows = [
      {'path': os.path.basename(land), 'caption': 'landscape'},  # relative to the manifest
      {'path': land, 'caption': 'landscape window', 'start': 0.25, 'end': 1.0},
      {'path': portrait, 'caption': 'portrait'},
      {'path': portrait, 'caption': 'portrait late', 'start': 0.4},
      {'path': square, 'caption': 'square'},
      {'path': square, 'caption': 'square late', 'start': 0.3},
      {'path': png, 'caption': 'a png'},
      {'path': jpg, 'caption': 'a jpg'},
      {'path': png, 'caption': 'the png again'},
      {'path': truncated, 'caption': 'truncated, early clip'},
      {'path': truncated, 'caption': 'truncated, late clip', 'start': 1.0},
      {'path': mf.missing(d), 'caption': 'missing'},
      {'path': mf.text_as_mp4(d), 'caption': 'text'},
      {'path': png, 'caption': ' '},
  ]
  manifest = d / 'manifest.jsonl'
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return manifest, truncated


@pytest.fixture(scope='module')
def prepared(media, tmp_path_factory):
  manifest, _ = media
  out = str(tmp_path_factory.mktemp('prepared'))
  index = prepare.prepare(_config(), str(manifest), out, num_processes=2, shard_size=SHARD_SIZE)
  return out, index


def _expected_clips(manifest):
  """(example, clip) for every indexed example, decoded the way prepare promises: from the example's
  start, centre crop. Examples that do not decode get clip None."""
  table = buckets_lib.make(_config(), 1)
  examples = bucketed.index_manifest(str(manifest), table, fps=8, skips=bucketed.SkipLog(1.0))
  out = []
  for e in examples:
    b = table[e.bucket]
    try:
      clip = video_decode.decode_clip(e.path, start=e.start, num_frames=b.frames, fps=8,
                                      size=(b.height, b.width), crop=(0.5, 0.5))
    except video_decode.DecodeError:
      clip = None
    out.append((e, clip))
  return out


def test_index_records_and_skips(media, prepared):
  manifest, truncated = media
  folder, index = prepared
  with open(os.path.join(folder, 'index.json')) as f:
    assert json.load(f) == index
  assert index['buckets'] == [list(s) for s in TABLE] and index['fps'] == 8
  assert index['num_rows'] == 14
  reasons = sorted(r for _, r in index['skipped'])
  assert reasons == ['empty_caption', 'missing', 'not_media', 'too_short']
  assert [truncated, 'too_short'] in index['skipped']  # the decode-time skip, with its path
  # 11 indexed examples -> shards of 3, 3, 3, 2; the decode-time skip is in the last one.
  assert index['shards'] == [prepare.shard_name(k) for k in range(4)]
  expected = [(e, clip) for e, clip in _expected_clips(manifest) if clip is not None]
  assert index['paths'] == [e.path for e, _ in expected]
  assert index['record_buckets'] == [e.bucket for e, _ in expected]
  source = records.data_source([os.path.join(folder, s) for s in index['shards']])
  assert len(source) == len(expected) == 10
  for i, (e, clip) in enumerate(expected):
    record = records.decode(source[i])
    assert record['caption'] == e.caption and record['path'] == e.path
    assert record['bucket'] == e.bucket
    np.testing.assert_array_equal(record['video'], clip)


def test_training_batches_from_prepared_shards(media, prepared):
  manifest, _ = media
  folder, _ = prepared
  c = _config(manifest='', prepared=folder)
  skips = bucketed.SkipLog(c.data.max_skip_fraction)
  it = pipeline.train_iterator(c, data_parallel=1, skips=skips)
  # One batch per bucket per epoch: 3 landscape, 2 portrait, 2 square, 3 images.
  batches = [next(it) for _ in range(4)]
  clips = {}
  for e, clip in _expected_clips(manifest):
    if clip is not None:
      clips.setdefault(clip.shape, []).append(clip)
  assert {b['video'].shape for b in batches} == {(2, *s, 3) for s in TABLE}
  assert all(b['video'].dtype == np.uint8 for b in batches)  # the step normalises on device
  for b in batches:
    for video in b['video']:
      assert any(np.array_equal(video, want) for want in clips[video.shape])
  assert len(skips.skipped) == 4 and skips.seen >= 14  # the prepare-time skips are reported


def _mtimes(folder):
  return {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}


def test_rerun_redoes_only_missing_shards(media, prepared):
  manifest, _ = media
  folder, index = prepared
  # Nothing to do: no file is touched.
  before = _mtimes(folder)
  assert prepare.prepare(_config(), str(manifest), folder, num_processes=2,
                         shard_size=SHARD_SIZE) == index
  assert {k: v for k, v in _mtimes(folder).items() if k != 'index.json'} == {
      k: v for k, v in before.items() if k != 'index.json'}
  # Lose shard 1 (file and sidecar) and the index; leave a partial temp file of a killed run.
  with open(os.path.join(folder, prepare.shard_name(1)), 'rb') as f:
    shard1 = f.read()
  for name in (prepare.shard_name(1), 'shard-00001.json', 'index.json'):
    os.remove(os.path.join(folder, name))
  with open(os.path.join(folder, prepare.shard_name(1) + '.tmp'), 'wb') as f:
    f.write(b'partial garbage')
  kept = _mtimes(folder)
  assert prepare.prepare(_config(), str(manifest), folder, num_processes=1,
                         shard_size=SHARD_SIZE) == index
  after = _mtimes(folder)
  assert sorted(after) == sorted(before)  # the temp file is gone, the lost files are back
  for name, mtime in kept.items():
    if not name.endswith('.tmp'):
      assert after[name] == mtime, name  # untouched
  with open(os.path.join(folder, prepare.shard_name(1)), 'rb') as f:
    assert f.read() == shard1


def test_other_manifest_or_config_is_refused_unless_overwrite(media, tmp_path):
  manifest, _ = media
  stale = prepare.fingerprint(str(manifest), buckets_lib.make(_config(fps=4), 1), 4, SHARD_SIZE)
  (tmp_path / 'index.json').write_text(json.dumps({'fingerprint': stale}))
  (tmp_path / 'shard-00007.array_record').write_bytes(b'old')
  (tmp_path / 'notes.txt').write_text('not ours')
  with pytest.raises(ValueError, match=r'different manifest or config.*fps: 4.0 -> 8.0'):
    prepare.prepare(_config(), str(manifest), str(tmp_path), shard_size=SHARD_SIZE)
  index = prepare.prepare(_config(), str(manifest), str(tmp_path), shard_size=100, overwrite=True)
  assert index['shards'] == [prepare.shard_name(0)] and len(index['paths']) == 10
  assert sorted(os.listdir(tmp_path)) == ['index.json', 'notes.txt', prepare.shard_name(0),
                                          'shard-00000.json']

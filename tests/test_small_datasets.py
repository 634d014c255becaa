"""Small datasets, as fine-tuning sets are: a bucket holding fewer rows than its batch (or a remainder
short of one) is still batched, by repeating its own rows, so every row trains every epoch."""

import collections
import os
import sys

import numpy as np
from conftest import bucketed_config

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

from data_pipelines import bucketed, pipeline
from sora_jax.config import buckets as buckets_lib


def test_batch_plan_batches_every_row_of_every_bucket_each_epoch():
  # Batches of 4, 2 and 16 (the photo bucket of a token budget); 3, 3 and 1 rows: before, no bucket
  # filled a batch ("No bucket has enough examples") and bucket 1's third row sat out every epoch.
  table = [buckets_lib.Bucket(4, 16, 16, 4), buckets_lib.Bucket(4, 16, 24, 2),
           buckets_lib.Bucket(1, 16, 16, 16)]
  example_buckets = [0, 1, 0, 2, 1, 0, 1]
  plan = bucketed.BatchPlan(example_buckets, table, seed=3)
  assert plan.per_epoch == 1 + 2 + 1  # ceil(rows / batch) per bucket
  assert plan.rows_per_bucket == [3, 3, 1]
  for epoch in range(3):
    batches = [plan[epoch * plan.per_epoch + j] for j in range(plan.per_epoch)]
    assert sorted(b['bucket'] for b in batches) == [0, 1, 1, 2]
    for b in batches:
      assert len(b['ids']) == table[b['bucket']].batch_size  # the compiled shape, always
      assert all(example_buckets[i] == b['bucket'] for i in b['ids'])  # repeats of its own rows
    seen = collections.Counter(int(i) for b in batches for i in b['ids'])
    assert set(seen) == set(range(7))  # every row, every epoch
    # Repeats are spread evenly: bucket 0's 3 rows fill 4 slots (2+1+1), the photo fills all 16.
    assert sorted(seen[i] for i in (0, 2, 5)) == [1, 1, 2]
    assert seen[3] == 16
    assert sum(seen[i] for i in (1, 4, 6)) == 4
  # The plan is still a pure function of (seed, epoch).
  again = bucketed.BatchPlan(example_buckets, table, seed=3)
  for i in (0, 5, 9):
    np.testing.assert_array_equal(plan[i]['ids'], again[i]['ids'])


def test_an_empty_dataset_is_still_an_error():
  table = [buckets_lib.Bucket(4, 16, 16, 4)]
  try:
    bucketed.BatchPlan([], table, seed=0)
  except ValueError as e:
    assert 'No examples' in str(e)
  else:
    raise AssertionError('an empty plan was accepted')


def test_a_row_repeated_in_one_batch_draws_its_own_clip_and_crop():
  """A repeat is another draw of the loss on that clip (own start, crop, and on device own timestep
  and noise), not a copy of the same pixels."""
  table = [buckets_lib.Bucket(2, 8, 8, batch_size=4)]
  examples = [bucketed.Example(f'/x/{i}.mp4', f'caption {i}', 0, end=5.0) for i in range(2)]
  draws = []

  def load(example, bucket, rng):
    draws.append((example.path, float(rng.uniform())))
    return np.zeros((*bucket.shape, 3), np.uint8), example.caption

  load_batch = bucketed.LoadBatch(examples, table, load_fn=load, seed=0, max_length=16)
  load_batch.map({'index': 0, 'bucket': 0, 'ids': np.array([0, 1, 0, 1])})
  assert [p for p, _ in draws] == ['/x/0.mp4', '/x/1.mp4'] * 2
  assert len({u for _, u in draws}) == 4
  # Process-count independent: process 1 of 2 draws what the single process drew for slots 2, 3.
  whole = list(draws)
  draws.clear()
  bucketed.LoadBatch(examples, table, load_fn=load, seed=0, max_length=16, process_index=1,
                     process_count=2).map({'index': 0, 'bucket': 0, 'ids': np.array([0, 1, 0, 1])})
  assert draws == whole[2:]


def _seven_rows(d):
  """3 square clips, 3 landscape clips, 1 photo; each file a distinct flat grey."""
  rows = []
  for i in range(6):
    height, width = (32, 32) if i < 3 else (32, 48)
    frames = np.full((8, height, width, 3), 30 * (i + 1), np.uint8)  # 1 s at 8 fps
    path = mf.write_video(os.path.join(d, f'clip{i}.mkv'), frames, codec='ffv1', fps=8,
                          pix_fmt='bgr0')
    rows.append(f'{os.path.basename(path)},clip {i}')
  photo = mf.write_image(os.path.join(d, 'photo.png'), np.full((32, 32, 3), 250, np.uint8),
                         codec='png', pix_fmt='rgb24')
  rows.append(f'{os.path.basename(photo)},a photo')
  manifest = os.path.join(d, 'manifest.csv')
  with open(manifest, 'w') as f:
    f.write('path,caption\n' + '\n'.join(rows) + '\n')
  return manifest


def test_a_seven_row_manifest_trains_on_every_row_each_epoch(tmp_path):
  manifest = _seven_rows(tmp_path)
  # 256 tokens a batch with 1x4x4 patches: 64-token squares -> 4, 96-token landscapes -> 2,
  # 16-token photos -> 16 (data parallel 2).
  c = bucketed_config(((4, 16, 16), (4, 16, 24), (1, 16, 16)), (1, 4, 4), manifest=manifest,
                      tokens_per_batch=256, max_skip_fraction=0.0)
  assert [b.batch_size for b in buckets_lib.make(c, 2)] == [4, 2, 16]
  skips = bucketed.SkipLog(c.data.max_skip_fraction)
  it = pipeline.train_iterator(c, data_parallel=2, skips=skips)
  batches = [next(it) for _ in range(4)]  # one epoch: 1 + 2 + 1 batches
  assert sorted(b['video'].shape[:2] for b in batches) == [(2, 4), (2, 4), (4, 4), (16, 1)]
  assert sorted(os.path.basename(p) for p in skips.sources) == sorted(
      [f'clip{i}.mkv' for i in range(6)] + ['photo.png'])
  greys = collections.Counter(int(v) for b in batches for v in b['video'][:, 0, 0, 0, 0])
  assert set(greys) == {30, 60, 90, 120, 150, 180, 250}  # each row's own pixels, all 7
  assert greys[250] == 16 and sum(greys.values()) == 4 + 2 * 2 + 16
  assert skips.bucket_rows == [3, 3, 1]

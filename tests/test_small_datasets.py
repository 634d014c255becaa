"""Small datasets, as fine-tuning sets are: a bucket holding fewer rows than its batch (or a remainder
short of one) is still batched, by repeating its own rows, so every row trains every epoch. And such a
run's evaluation: its flow loss by t on held-out videos (sora_jax/evaluation/user_data.py)."""

import collections
import json
import os
import sys

import numpy as np
import pytest
from conftest import bucketed_config, tiny_config

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

from data_pipelines import bucketed, pipeline, shapes
from sora_jax import train
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import schema
from sora_jax.evaluation import adherence, suite, user_data
from sora_jax.inference import sampling


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


def _mp4_manifest(d, name, captions, offset=0):
  """H.264 mp4s of 1 s at 8 fps (a colour moving left to right over 32x32), one row each."""
  rows = []
  for i, caption in enumerate(captions):
    k = offset + i
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    for t in range(8):
      frames[t, :, 4 * t:4 * t + 8] = (40 * k % 256, 255 - 30 * k, 90)
    path = mf.write_video(os.path.join(d, f'{name}{i}.mp4'), frames, fps=8,
                          options={'crf': '12', 'preset': 'ultrafast'})
    rows.append(f'{os.path.basename(path)},{caption}')
  manifest = os.path.join(d, f'{name}.csv')
  with open(manifest, 'w') as f:
    f.write('path,caption\n' + '\n'.join(rows) + '\n')
  return manifest


def test_evaluate_a_lora_user_data_run_by_held_out_flow_loss_per_t(tiny_run, tmp_path, monkeypatch):
  """A LoRA fine-tune on a manifest of mp4s: evaluate reports the flow loss at each fixed t on the
  held-out manifest, deterministically, and never samples or runs the shapes judge."""
  train_csv = _mp4_manifest(tmp_path, 'train', [f'clip {i} moving right' for i in range(4)])
  held_csv = _mp4_manifest(tmp_path, 'held', ['held clip a', 'held clip b', 'held clip c'],
                           offset=4)
  c = bucketed_config(((4, 16, 16),), (2, 4, 4), manifest=train_csv, max_skip_fraction=0.0)
  c.lora.rank, c.init_from = 4, tiny_run[1]  # the tiny shapes run's architecture is this one's
  c.total_steps, c.checkpoint_every_steps, c.optim.warmup_steps = 2, 2, 1
  c.sample.num_steps, c.num_train_samples = 2, 1
  c.eval.num_timesteps = 4
  workdir = str(tmp_path / 'run')
  train.train(c, workdir)

  def never(*args, **kwargs):
    raise AssertionError('a user-data evaluation sampled videos or ran the shapes judge')
  for module, name in ((shapes, 'judge_clip'), (adherence, 'split_adherence'),
                       (sampling, 'make_generate'), (sampling, 'generate_videos')):
    monkeypatch.setattr(module, name, never)
  first = suite.evaluate(workdir, str(tmp_path / 'eval.json'), eval_data=held_csv)
  again = suite.evaluate(workdir, str(tmp_path / 'again.json'), eval_data=held_csv)
  with open(tmp_path / 'eval.json') as f:
    assert json.load(f) == first
  assert first['num_examples'] == 3 and first['eval_split'] == 'held_out' and first['step'] == 2
  assert first['eval_data'] == os.path.abspath(held_csv) and first['skipped_examples'] == 0
  by_t = first['flow_loss_by_t']
  assert list(by_t) == ['0.1250', '0.3750', '0.6250', '0.8750']  # bin midpoints
  assert all(np.isfinite(v) and v > 0 for v in by_t.values())
  assert np.isclose(first['flow_loss'], np.mean(list(by_t.values())))
  assert again['flow_loss_by_t'] == by_t  # fixed clips, times and noise: bit-identical
  assert not {'seen', 'held_out', 'conditioned'} & set(first)  # no shapes splits
  # Without held-out data: the training manifest, said to be so.
  own = suite.evaluate(workdir, str(tmp_path / 'own.json'))
  assert own['num_examples'] == 4 and own['eval_split'] == 'train' and own['eval_data'] == train_csv
  assert own['flow_loss_by_t'] != by_t
  # Options that cannot apply are refused before anything loads.
  run = schema.load_config(workdir)
  with pytest.raises(FileNotFoundError, match='no such manifest'):
    user_data.check_options(run, str(tmp_path / 'missing.csv'))
  with pytest.raises(FileNotFoundError, match='index.json'):
    user_data.check_options(run, str(tmp_path))
  with pytest.raises(ValueError, match='flow loss alone'):
    user_data.check_options(run, None, flow_loss=False)
  with pytest.raises(ValueError, match='for runs trained on user data'):
    user_data.check_options(tiny_config(), held_csv)

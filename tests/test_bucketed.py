"""User data through Grain: manifest indexing, buckets, static batch shapes, skips, exact resume."""

import collections
import json
import os
import sys

import numpy as np
import pytest
from conftest import bucketed_config

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

from data_pipelines import bucketed, pipeline, video_decode
from sora_jax import train
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import validation

TABLE = [(4, 16, 16), (4, 16, 24), (4, 24, 16), (8, 16, 16), (1, 16, 16)]


def _config(manifest, **data):
  # tokens_per_batch 128: 64-token clips -> batch 2, 96 -> 1 -> 2 (rounded up to the dp size).
  return bucketed_config(TABLE, (1, 4, 4), **{'manifest': str(manifest), 'tokens_per_batch': 128,
                                               **data})


@pytest.fixture(scope='module')
def media(tmp_path_factory):
  d = tmp_path_factory.mktemp('media')
  good = {
      'landscape.mp4': mf.h264_mp4(d),  # 96x64, 2 s, with audio
      'portrait.mp4': mf.portrait_mp4(d),  # 48x96, 1 s
      'odd.mkv': mf.odd_mkv(d),  # 75x51, 1 s
      'vfr.mkv': mf.vfr_mkv(d),
      'webm': mf.vp9_webm(d),
      'image.png': mf.png(d),
      'image.jpg': mf.jpg(d),
      'rotated.mp4': mf.rotated_mp4(d, n=24),
  }
  bad = {
      'missing': mf.missing(d),
      'empty': mf.empty_mp4(d),
      'not_media': mf.text_as_mp4(d),
      'no_video_stream': mf.audio_m4a(d),
  }
  rows = [{'path': os.path.relpath(p, d), 'caption': f'clip {name}'} for name, p in good.items()]
  rows += [{'path': str(p), 'caption': f'bad {name}'} for name, p in bad.items()]
  rows.append({'path': str(good['landscape.mp4']), 'caption': ''})  # empty_caption
  rows.append({'path': str(good['landscape.mp4']), 'caption': 'a window', 'start': 0.5, 'end': 1.5})
  rows.append({'path': str(good['portrait.mp4']), 'caption': 'too short', 'start': 0.0, 'end': 0.3})
  rows += [{'path': str(good[name]), 'caption': f'again {name} {i}'} for i in range(3)
           for name in ('image.png', 'image.jpg')]  # enough images for a batch
  manifest = d / 'manifest.jsonl'
  manifest.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return d, manifest, good, bad


def test_bucket_choice_and_batch_sizes():
  table = [buckets_lib.Bucket(*s, batch_size=1) for s in TABLE]
  choose = lambda **kw: buckets_lib.choose(table, fps=8, **kw)  # noqa: E731
  assert choose(is_image=False, width=96, height=64, seconds=2.0) == 1  # landscape, longest fitting
  assert choose(is_image=False, width=64, height=96, seconds=2.0) == 2  # portrait
  assert choose(is_image=False, width=64, height=64, seconds=2.0) == 3  # 8 frames fit
  assert choose(is_image=False, width=64, height=64, seconds=0.6) == 0  # only 4 frames fit
  assert choose(is_image=False, width=64, height=64, seconds=0.4) is None  # shorter than every bucket
  assert choose(is_image=True, width=300, height=200, seconds=None) == 4  # images: 1-frame buckets
  c = _config('unused')
  sizes = [b.batch_size for b in buckets_lib.make(c, batch_multiple=2)]
  # 128 tokens // (64, 96, 96, 128, 16) tokens per clip, floored to a multiple of 2, at least 2.
  assert sizes == [2, 2, 2, 2, 8]


def _wan_like_vae(folder):
  """A config.json with Wan 2.1's VAE geometry: 4x temporal (first frame alone), 8x spatial."""
  folder.mkdir()
  (folder / 'config.json').write_text(json.dumps(
      {'temperal_downsample': [False, True, True], 'dim_mult': [1, 2, 4, 4], 'z_dim': 16}))
  return str(folder)


def test_token_budgets_count_the_latent_tokens_the_dit_sees(tmp_path):
  c = _config('unused')
  c.autoencoder = _wan_like_vae(tmp_path / 'vae')
  c.model.patch_size = (1, 2, 2)
  c.data.buckets = ((17, 64, 64), (1, 64, 64))
  # 17x64x64 pixels -> 5x8x8 latents -> 80 tokens; an image -> 1x8x8 -> 16 tokens.
  assert [buckets_lib.model_tokens(c, s) for s in c.data.buckets] == [80, 16]
  c.data.tokens_per_batch = 160
  assert [b.batch_size for b in buckets_lib.make(c, batch_multiple=2)] == [2, 10]
  # Without the autoencoder the same buckets are pixel patches.
  c.autoencoder = ''
  assert buckets_lib.model_tokens(c, (17, 64, 64)) == 17 * 32 * 32


def test_each_bucket_trains_with_the_sampler_shift_of_its_shape(monkeypatch):
  """Shapes are static, so each bucket's step bakes in its own resolution-dependent shift: the one
  sampling uses for that shape."""
  import jax  # pylint: disable=g-import-not-at-top
  from sora_jax.diffusion import flow  # pylint: disable=g-import-not-at-top
  from sora_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  from sora_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from sora_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.training import update  # pylint: disable=g-import-not-at-top
  c = bucketed_config(((4, 16, 16), (8, 16, 24)), (2, 4, 4))  # 32 and 96 tokens
  c.diffusion.shift, c.diffusion.shift_base_tokens = 2.0, 32
  mesh = sharding.make_mesh(validation.validate(c, 1), jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(c)
  graphdef, state, _ = state_lib.shardings(c, mesh)  # abstract: the shift is fixed when tracing
  shifts = []
  sample_timesteps, sampling_schedule = flow.sample_timesteps, flow.sampling_schedule

  def spy_train(rng, batch, **kw):
    shifts.append(('train', kw['shift']))
    return sample_timesteps(rng, batch, **kw)

  def spy_sample(num_steps, shift=1.0):
    shifts.append(('sample', shift))
    return sampling_schedule(num_steps, shift)

  monkeypatch.setattr(flow, 'sample_timesteps', spy_train)
  monkeypatch.setattr(flow, 'sampling_schedule', spy_sample)
  step = jax.jit(update.make_train_step(graphdef, c, tx, schedule))
  tokens, mask = np.zeros((2, c.text.max_length), np.int32), np.ones((2, c.text.max_length), bool)
  for shape in c.data.buckets:
    # Tracing each bucket's step (what jit does before compiling it) is where its shift is baked in.
    step.trace(state, {'video': np.zeros((2, *shape, 3), np.uint8), 'tokens': tokens, 'mask': mask})
    c.data.num_frames, c.data.height, c.data.width = shape  # sample this shape
    sampling.make_generate(graphdef, c, num_steps=2, guidance_scale=1.0)
  assert [k for k, _ in shifts] == ['train', 'sample'] * 2
  assert shifts[0][1] == shifts[1][1] == pytest.approx(2.0)  # 32 tokens: the base shift
  assert shifts[2][1] == shifts[3][1] == pytest.approx(2.0 * 3 ** 0.5)  # 96 tokens


def test_bad_bucket_configs_are_rejected_before_compiling(tmp_path):
  manifest = tmp_path / 'm.csv'
  manifest.write_text('path,caption\n')
  c = _config(manifest)
  c.data.buckets = ((4, 16, 18),)
  with pytest.raises(ValueError, match=r'config.data.buckets.*width=18'):
    validation.validate(c, 8)
  c = _config(manifest)
  c.model.patch_size = (2, 4, 4)  # 1-frame image buckets need a temporal patch of 1
  with pytest.raises(ValueError, match=r'frames=1 is not divisible'):
    validation.validate(c, 8)
  c = _config(tmp_path / 'nope.csv')
  with pytest.raises(ValueError, match='config.data.manifest'):
    validation.validate(c, 8)


def test_manifest_index_skips_bad_rows_by_reason(media):
  d, manifest, good, bad = media
  c = _config(manifest)
  table = buckets_lib.make(c, 2)
  skips = bucketed.SkipLog(1.0)
  examples = bucketed.index_manifest(str(manifest), table, fps=8, skips=skips, num_threads=2)
  assert skips.seen == len(good) + len(bad) + 3 + 6
  assert dict(skips.counts) == {'missing': 1, 'empty': 1, 'not_media': 1, 'no_video_stream': 1,
                                'empty_caption': 1, 'too_short': 1}
  assert {p for p, _ in skips.skipped} >= {str(p) for p in bad.values()}
  by_path = collections.defaultdict(list)
  for e in examples:
    by_path[os.path.basename(e.path)].append(TABLE[e.bucket])
  assert by_path['h264.mp4'] == [(4, 16, 24)] * 2  # 3:2 -> nearest aspect; whole file and a window
  assert by_path['portrait.mp4'] == [(4, 24, 16)]
  assert by_path['img.png'] == [(1, 16, 16)] * 4 and by_path['img.jpg'] == [(1, 16, 16)] * 4
  assert by_path['rot90.mp4'] == [(4, 24, 16)]  # stored landscape, displayed portrait


def test_too_many_skips_is_an_error(media):
  _, manifest, _, _ = media
  with pytest.raises(ValueError, match='max_skip_fraction'):
    next(pipeline.train_iterator(_config(manifest, max_skip_fraction=0.2), data_parallel=2))


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_have_static_bucket_shapes_and_resume_exactly(media):
  _, manifest, _, _ = media
  c = _config(manifest, max_skip_fraction=0.5)
  it = pipeline.train_iterator(c, data_parallel=2)
  batches = _take(it, 12)
  table = buckets_lib.make(c, 2)
  allowed = {(b.batch_size, *b.shape, 3) for b in table}
  seen_shapes = {b['video'].shape for b in batches}
  assert seen_shapes <= allowed and len(seen_shapes) >= 3
  for b in batches:
    assert b['video'].dtype == np.uint8  # normalised on device, in the train step
    assert b['tokens'].shape == (b['video'].shape[0], c.text.max_length)
    assert set(b) == {'video', 'tokens', 'mask'}
  # Resume: a fresh iterator set to the state after 5 batches yields batches 5.. exactly.
  it = pipeline.train_iterator(c, data_parallel=2)
  _take(it, 5)
  state = it.get_state()
  resumed = pipeline.train_iterator(c, data_parallel=2)
  resumed.set_state(state)
  for want, got in zip(batches[5:], _take(resumed, 7)):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_global_batches_do_not_depend_on_process_count(media):
  _, manifest, _, _ = media
  c = _config(manifest, max_skip_fraction=0.5)
  whole = _take(pipeline.train_iterator(c, data_parallel=2), 6)
  halves = [_take(pipeline.train_iterator(c, process_index=p, process_count=2, data_parallel=2), 6)
            for p in range(2)]
  for i, want in enumerate(whole):
    np.testing.assert_array_equal(
        want['video'], np.concatenate([halves[0][i]['video'], halves[1][i]['video']]))


def test_decode_failures_are_replaced_counted_and_logged():
  table = [buckets_lib.Bucket(2, 8, 8, batch_size=4)]
  examples = [bucketed.Example(f'/x/{i}.mp4', f'caption {i}', 0, end=1.0) for i in range(6)]

  def load(example, bucket, rng):
    if example.path in ('/x/1.mp4', '/x/4.mp4'):
      raise video_decode.DecodeError(example.path, 'undecodable')
    value = int(example.path[3])
    return np.full((*bucket.shape, 3), value * 40, np.uint8), example.caption

  load_batch = bucketed.LoadBatch(examples, table, load_fn=load, seed=0, max_length=16)
  skips = bucketed.SkipLog(1.0)
  out = bucketed.CountSkips(skips).map(
      load_batch.map({'index': 0, 'bucket': 0, 'ids': np.arange(4)}))
  assert out['video'].shape == (4, 2, 8, 8, 3)
  assert ('/x/1.mp4', 'undecodable') in skips.skipped
  assert skips.seen == 4 + len(skips.skipped) and sum(skips.sources.values()) == 4
  # Row 1 was replaced by a decodable example of the same bucket, never by a failing one.
  assert out['video'].dtype == np.uint8 and out['video'][1, 0, 0, 0, 0] not in (1 * 40, 4 * 40)


def test_training_on_a_manifest_counts_skips(media, tmp_path):
  _, manifest, _, _ = media
  c = _config(manifest, max_skip_fraction=0.8)
  c.data.buckets = ((4, 16, 24), (4, 24, 16))  # two compiled shapes; images and squares skipped
  c.data.num_frames, c.data.height, c.data.width = 4, 16, 24  # sample shape
  c.total_steps, c.checkpoint_every_steps = 3, 3
  c.mesh.data, c.mesh.tensor = 2, 4  # batches of 2 clips split over 2 data shards
  train.train(c, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) for r in rows)
  assert rows[-1]['skipped_examples'] == 14  # broken rows + 8 images with no 1-frame bucket
  # Previews show the data's own first captions, not the shapes prompts.
  with open(tmp_path / 'samples' / 'step_3' / 'samples.json') as f:
    prompts = [s['prompt'] for s in json.load(f)['samples']]
  assert prompts == ['clip landscape.mp4', 'clip portrait.mp4']


def test_preview_prompts_are_configured_else_the_data_captions(media):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from sora_jax.evaluation import previews  # pylint: disable=g-import-not-at-top
  _, manifest, _, _ = media
  c = _config(manifest)
  # The first usable captions of the manifest (bad rows' captions are still captions; '' is not).
  assert previews.preview_prompts(c) == ['clip landscape.mp4', 'clip portrait.mp4']
  c.sample.prompts = ('a cat on a sofa', 'waves at dusk', 'a busy street')
  assert previews.preview_prompts(c) == list(c.sample.prompts)
  shapes_run = tiny_config()
  assert previews.preview_prompts(shapes_run) == previews.sample_prompts(2)
  assert all(p.startswith('a ') for p in previews.preview_prompts(shapes_run))


def test_example_videos_index_into_the_readme_buckets(tmp_path):
  """data_pipelines.example_videos (the README's data) fills video and image buckets, no skips."""
  from data_pipelines import example_videos  # pylint: disable=g-import-not-at-top
  manifest = example_videos.write_examples(str(tmp_path), num_videos=3, num_images=1)
  c = _config(manifest)
  c.data.buckets = ((12, 32, 32), (12, 32, 48), (12, 48, 32), (1, 32, 32))
  table = buckets_lib.make(c, 2)
  skips = bucketed.SkipLog(0.0)
  examples = bucketed.index_manifest(manifest, table, fps=8, skips=skips, num_threads=2)
  assert skips.seen == 4 and not skips.skipped
  assert sorted(table[e.bucket].shape for e in examples) == [
      (1, 32, 32), (12, 32, 32), (12, 32, 48), (12, 48, 32)]
  for name in ('first.png', 'clip.mp4'):
    assert os.path.isfile(tmp_path / name)

"""prepare --cache_latents / --cache_text: shards of VAE latent means and umT5 caption embeddings, read
back into the batches Frozen.encode_batch would have made from pixels; mismatched encoders refused;
training from them."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import bucketed_config

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

from data_pipelines import bucketed, pipeline, prepare, records
from sora_jax import prepare as cli_prepare
from sora_jax import train
from sora_jax.inference import frozen as frozen_lib
from sora_jax.training import update

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
WAN_VAE = os.path.join(FIXTURES, 'wan_vae_tiny')  # 4x temporal, 8x spatial, 4 latent channels
UMT5 = os.path.join(FIXTURES, 'umt5_tiny')  # d_model 32
TABLE = ((5, 32, 32), (5, 32, 48))  # latents (2, 4, 4, 4) and (2, 4, 6, 4)
SHARD_SIZE = 5


def _config(batch_size=8, **data):
  c = bucketed_config(TABLE, (1, 2, 2), **data)
  c.batch_size = batch_size
  c.autoencoder = WAN_VAE
  c.text.encoder, c.text.path, c.text.max_length = 'umt5', UMT5, 16
  return c


@pytest.fixture(scope='module')
def media(tmp_path_factory):
  """8 landscape clips (bucket (5, 32, 48)) and 3 square ones (5, 32, 32), interleaved so that shards
  mix buckets."""
  d = tmp_path_factory.mktemp('media')
  land = mf.h264_mp4(d, n=48, audio=False)  # 96x64, 2 s
  square = mf.vfr_mkv(d)  # 64x64, ~1.6 s
  rows = [{'path': land, 'caption': f'bars number {i} moving', 'start': 0.15 * i} for i in range(8)]
  for i in range(3):
    rows.insert(1 + 3 * i, {'path': square, 'caption': f'a square clip {"very " * i}late',
                            'start': 0.3 * i})
  manifest = d / 'manifest.jsonl'
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(manifest)


@pytest.fixture(scope='module')
def folders(media, tmp_path_factory):
  """(pixels folder, cached folder, index of the cached one)."""
  pixels = str(tmp_path_factory.mktemp('pixels'))
  cached = str(tmp_path_factory.mktemp('cached'))
  cli_prepare.prepare(_config(), media, pixels, shard_size=SHARD_SIZE)
  index = cli_prepare.prepare(_config(), media, cached, shard_size=SHARD_SIZE, num_processes=2,
                          cache_latents=True, cache_text=True, encode_batch_size=2)
  return pixels, cached, index


@pytest.fixture(scope='module')
def encoders():
  return frozen_lib.Frozen(_config())


def _records(folder):
  with open(os.path.join(folder, 'index.json')) as f:
    index = json.load(f)
  source = records.data_source([os.path.join(folder, s) for s in index['shards']])
  return [records.decode(source[i]) for i in range(len(source))]


def test_cached_records_and_index(folders, encoders):
  pixels, cached, index = folders
  spec = index['cached']
  assert spec['latents'] == {'autoencoder': os.path.realpath(WAN_VAE), 'dtype': 'float16',
                             'signature': prepare.encoder_signature(WAN_VAE)}
  assert spec['text']['path'] == os.path.realpath(UMT5) and spec['text']['max_length'] == 16
  assert spec['text']['dtype'] == 'float16' and index['fingerprint']['cached'] == spec
  # Same examples in the same order as the pixel shards: a seed gives the same batches from both.
  with open(os.path.join(pixels, 'index.json')) as f:
    pixel_index = json.load(f)
  assert 'cached' not in pixel_index['fingerprint'] and pixel_index['cached'] == {}
  assert index['paths'] == pixel_index['paths'] and len(index['paths']) == 11
  assert index['record_buckets'] == pixel_index['record_buckets']
  assert index['record_buckets'][:4] == [1, 0, 1, 1]  # buckets interleave within a shard
  for pixel, record in zip(_records(pixels), _records(cached)):
    assert record['caption'] == pixel['caption'] and 'video' not in record
    z = record['latents']
    assert z.dtype == np.float16
    want = np.asarray(encoders.encode_video_mean(pixel['video'][None] / 127.5 - 1.0))[0]
    assert z.shape == want.shape == (2, 4, 4 if pixel['video'].shape[2] == 32 else 6, 4)
    np.testing.assert_allclose(z, want, rtol=2e-3, atol=1e-3)
    # Caption embeddings: the real tokens' rows only (EOS included), all of them masked in.
    tokens, mask = encoders.tokenize([record['caption']])
    n = int(mask.sum())
    assert record['text_embeddings'].shape == (n, 32) and record['text_mask'].all()
    full, _ = encoders.caption_inputs(tokens, mask)
    np.testing.assert_allclose(record['text_embeddings'], np.asarray(full)[0, :n], rtol=2e-3,
                               atol=1e-3)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cached_batches_equal_encoding_on_the_fly(folders, encoders):
  pixels, cached, _ = folders
  its = [pipeline.train_iterator(_config(prepared=f, batch_size=2), data_parallel=1)
         for f in (pixels, cached)]
  for _ in range(5):  # one epoch: 4 landscape batches of 2, 1 square batch
    pixel_batch, cached_batch = next(its[0]), next(its[1])
    assert set(cached_batch) == {'latents', 'text_embeddings', 'text_mask'}
    assert cached_batch['latents'].dtype == np.float16
    assert cached_batch['text_embeddings'].shape == (2, 16, 32)
    assert pixel_batch['video'].dtype == np.uint8
    # VAE and umT5 on the fly, on pixels in [-1, 1] as train.py gives them to encode_batch.
    want = encoders.encode_batch(dict(pixel_batch,
                                      video=update.normalize_pixels(pixel_batch['video'])))
    got = encoders.encode_batch(cached_batch)
    assert set(got) == set(want) == {'video', 'tokens', 'mask'}
    assert got['video'].shape == want['video'].shape and got['video'].dtype == np.float32
    assert _rel(got['video'], want['video']) < 1e-3  # float16 storage
    np.testing.assert_array_equal(got['mask'], want['mask'])
    assert _rel(got['tokens'], want['tokens']) < 1e-3
    np.testing.assert_array_equal(np.asarray(got['tokens'])[~np.asarray(got['mask'])], 0.0)


def test_text_only_float32_cache(media, tmp_path, encoders):
  """Pixels stay, captions cached in float32: equal up to float32 rounding (batch of 4 vs 1)."""
  c = _config()
  c.data.buckets = TABLE[:1]
  index = cli_prepare.prepare(c, media, str(tmp_path), shard_size=SHARD_SIZE, cache_text=True,
                          cache_dtype='float32', encode_batch_size=4)
  assert set(index['cached']) == {'text'} and index['cached']['text']['dtype'] == 'float32'
  record = _records(str(tmp_path))[0]
  assert record['video'].dtype == np.uint8 and record['text_embeddings'].dtype == np.float32
  tokens, mask = encoders.tokenize([record['caption']])
  full, _ = encoders.caption_inputs(tokens, mask)
  embeddings, mask = bucketed.pad_embeddings([(record['text_embeddings'], record['text_mask'])], 16)
  got = encoders.encode_batch({'video': record['video'][None] / 127.5 - 1.0,
                               'text_embeddings': embeddings, 'text_mask': mask})
  np.testing.assert_allclose(got["tokens"], full, rtol=1e-5, atol=1e-5)


def test_mismatched_encoders_are_refused(folders, tmp_path):
  _, cached, _ = folders
  c = _config(prepared=cached)
  other_vae = str(tmp_path / 'other_vae')
  shutil.copytree(WAN_VAE, other_vae)
  c.autoencoder = other_vae
  with pytest.raises(ValueError, match=r'config\.autoencoder=.*other_vae.*is not the model'):
    pipeline.train_iterator(c, data_parallel=1)
  c.autoencoder = ''
  with pytest.raises(ValueError, match=r'config\.autoencoder is empty'):
    pipeline.train_iterator(c, data_parallel=1)
  c = _config(prepared=cached)
  other_text = str(tmp_path / 'other_umt5')
  shutil.copytree(UMT5, other_text)
  c.text.path = other_text
  with pytest.raises(ValueError, match=r'config\.text\.path=.*other_umt5.*is not the model'):
    pipeline.train_iterator(c, data_parallel=1)
  c = _config(prepared=cached)
  c.text.max_length = 24
  with pytest.raises(ValueError, match=r'config\.text\.max_length=24'):
    pipeline.train_iterator(c, data_parallel=1)
  c = _config(prepared=cached)
  c.text.encoder = 'bytes'
  with pytest.raises(ValueError, match=r'config\.text\.encoder='):
    pipeline.train_iterator(c, data_parallel=1)
  # The same path with other files (a model swapped or trained further there) is refused too.
  moved = str(tmp_path / 'moved')
  shutil.copytree(cached, moved)
  with open(os.path.join(moved, 'index.json')) as f:
    index = json.load(f)
  index['cached']['latents']['autoencoder'] = os.path.realpath(other_vae)
  with open(os.path.join(moved, 'index.json'), 'w') as f:
    json.dump(index, f)
  with open(os.path.join(other_vae, 'config.json')) as f:
    vae_config = json.load(f)
  vae_config['latents_std'][0] = 3.0
  with open(os.path.join(other_vae, 'config.json'), 'w') as f:
    json.dump(vae_config, f)
  c = _config(prepared=moved)
  c.autoencoder = other_vae
  with pytest.raises(ValueError, match=r'config\.autoencoder=.*files changed since'):
    pipeline.train_iterator(c, data_parallel=1)


class _CountingEncoders:
  """Frozen's interface in numpy: a clip's latent is its pixel mean per frame; a caption's
  embeddings are huge constants over its characters. Records which clips each call encodes."""

  def __init__(self):
    self.calls = []

  def encode_video_mean(self, video):
    self.calls.append(np.rint((video[:, 0, 0, 0, 0] + 1.0) * 127.5).astype(int).tolist())
    return video.mean(axis=(2, 3, 4))[:, :, None, None, None] * np.ones((1, 1, 1, 1, 2))

  def tokenize(self, captions):
    mask = np.arange(4)[None] < np.array([len(c) for c in captions])[:, None]
    return mask.astype(np.int32), mask

  def caption_inputs(self, tokens, mask):
    return np.repeat(tokens[..., None], 3, -1).astype(np.float32) * 7e4, mask


def test_encoder_keeps_order_and_batches_one_bucket():
  encoders = _CountingEncoders()
  buckets = [0] + [1] * 10 + [0]
  stream = [(i, {'video': np.full((1 + 2 * b, 2, 2, 3), i, np.uint8), 'caption': 'x' * (i % 4),
                 'bucket': b}) for i, b in enumerate(buckets)]
  encoder = prepare.Encoder(encoders, {'latents': {'dtype': 'float16'}}, batch_size=2)
  out = list(encoder(iter(stream)))
  assert [i for i, _ in out] == list(range(len(buckets)))  # example order
  for i, record in out:
    assert 'video' not in record and record['latents'].dtype == np.float16
    np.testing.assert_allclose(record['latents'], i / 127.5 - 1.0, rtol=1e-3)
  # Batches hold one bucket. Clip 0 waits for a partner until it holds back 8 (4 batches) encoded
  # records, then goes padded with a copy of itself; so does the last clip at the end.
  assert encoders.calls == [[1, 2], [3, 4], [5, 6], [7, 8], [0, 0], [9, 10], [11, 11]]
  # Captions: rows up to the last real token; float16 overflow refused, naming the flag.
  with pytest.raises(ValueError, match='--cache_dtype=float32'):
    list(prepare.Encoder(encoders, {'text': {'dtype': 'float16'}}, batch_size=2)(iter(stream[1:2])))
  (_, record), = prepare.Encoder(encoders, {'text': {'dtype': 'float32'}}, 2)(iter(stream[2:3]))
  assert record['text_embeddings'].shape == (2, 3) and record['text_mask'].tolist() == [1, 1]
  assert 'video' in record  # text only: the pixels stay


def test_prepare_rejects_bad_cache_requests(media, tmp_path):
  c = _config()
  c.text.encoder = 'bytes'
  with pytest.raises(ValueError, match=r"--cache_text needs config\.text\.encoder='umt5'"):
    cli_prepare.prepare(c, media, str(tmp_path), cache_text=True)
  c = _config()
  c.autoencoder = ''
  with pytest.raises(ValueError, match=r'--cache_latents needs config\.autoencoder'):
    cli_prepare.prepare(c, media, str(tmp_path), cache_latents=True)
  c = _config()
  c.data.buckets = ((4, 32, 32),)
  with pytest.raises(ValueError, match=r'config\.data\.buckets: clip \(4, 32, 32\) does not fit'):
    cli_prepare.prepare(c, media, str(tmp_path), cache_latents=True)
  with pytest.raises(ValueError, match='cache dtype'):
    cli_prepare.prepare(_config(), media, str(tmp_path), cache_latents=True, cache_dtype='bfloat16')
  # A pixel folder is not silently turned into a cached one (nor the reverse).
  cli_prepare.prepare(_config(), media, str(tmp_path), shard_size=100)
  with pytest.raises(ValueError, match=r'different manifest or config.*cached'):
    cli_prepare.prepare(_config(), media, str(tmp_path), shard_size=100, cache_text=True)


def test_train_from_cached_shards(folders, tmp_path, monkeypatch):
  _, cached, _ = folders

  def no_vae_encoding(*args):
    raise AssertionError('the train loop ran the VAE encoder on cached latents')
  monkeypatch.setattr(frozen_lib.Frozen, '_encode_video_impl', no_vae_encoding)
  c = _config(prepared=cached)
  c.total_steps, c.checkpoint_every_steps, c.optim.warmup_steps = 2, 2, 1
  c.num_train_samples, c.sample.num_steps = 1, 2
  c.model.depth = 1
  # Samples' clip shape; batches: the 8 landscape clips make one global batch of 8 (8 devices).
  c.data.num_frames, c.data.height, c.data.width = 5, 32, 32
  workdir = str(tmp_path / 'run')
  train.train(c, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['skipped_examples'] == 0 for r in rows)


def test_evaluate_a_wan_lora_run_on_cached_latents(folders, tmp_path, monkeypatch):
  """A Wan-family LoRA fine-tune on cached latents and caption embeddings: evaluate reports its
  flow loss by t on a prepared folder (read as cached, never through the VAE), deterministically."""
  from sora_jax.evaluation import suite  # pylint: disable=g-import-not-at-top
  _, cached, _ = folders

  def no_vae_encoding(*args):
    raise AssertionError('cached latents went through the VAE encoder')
  monkeypatch.setattr(frozen_lib.Frozen, '_encode_video_impl', no_vae_encoding)
  c = _config(prepared=cached)
  c.model.family, c.model.patch_size = 'wan', (1, 2, 2)
  c.model.wan.num_attention_heads, c.model.wan.attention_head_dim = 2, 16  # the tiny transformer
  c.model.wan.ffn_dim, c.model.wan.num_layers, c.model.wan.freq_dim = 64, 2, 32
  c.diffusion.prediction = 'velocity'
  c.init_from, c.lora.rank = os.path.join(FIXTURES, 'wan_transformer_tiny_t2v'), 4
  c.total_steps, c.checkpoint_every_steps, c.optim.warmup_steps = 2, 2, 1
  c.num_train_samples, c.sample.num_steps = 1, 2
  c.data.num_frames, c.data.height, c.data.width = 5, 32, 32
  workdir = str(tmp_path / 'run')
  train.train(c, workdir)
  first = suite.evaluate(workdir, str(tmp_path / 'eval.json'), eval_data=cached)
  again = suite.evaluate(workdir, str(tmp_path / 'again.json'), eval_data=cached)
  assert first['eval_split'] == 'held_out' and first['num_examples'] == c.eval.num_videos
  assert len(first['flow_loss_by_t']) == c.eval.num_timesteps
  assert all(np.isfinite(v) and v > 0 for v in first['flow_loss_by_t'].values())
  assert again['flow_loss_by_t'] == first['flow_loss_by_t']

"""data_pipelines.records: encode/decode round trips, validation, ArrayRecord shards via Grain."""

import io

import numpy as np
import pytest

from data_pipelines import records


def _example(i=0, **overrides):
  rng = np.random.default_rng(i)
  example = {
      'video': rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8),
      'caption': f'un chat qui saute, n°{i} — 猫 🐈',
      'text_embeddings': rng.standard_normal((5, 3)).astype(np.float16),
      'text_mask': np.array([1, 1, 1, 0, 0], bool),
      'path': f'/data/vidéos/{i}.mp4',
      'bucket': i,
  }
  example.update(overrides)
  return {k: v for k, v in example.items() if v is not None}


def _assert_same(got, want):
  assert set(got) == set(want)
  for key, value in want.items():
    if isinstance(value, np.ndarray):
      assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
      np.testing.assert_array_equal(got[key], value)
    else:
      assert type(got[key]) is type(value) and got[key] == value, key


@pytest.mark.parametrize('compress', [False, True])
def test_video_round_trip(compress):
  example = _example(3)
  _assert_same(records.decode(records.encode(example, compress=compress)), example)


@pytest.mark.parametrize('dtype', [np.float16, np.float32])
def test_latents_round_trip_minimal(dtype):
  example = {'latents': np.linspace(-1, 1, 2 * 3 * 4 * 8, dtype=dtype).reshape(2, 3, 4, 8),
             'caption': ''}
  _assert_same(records.decode(records.encode(example)), example)


def test_strings_and_ints_come_back_as_python_types():
  got = records.decode(records.encode(_example(1, caption=np.str_('ü'), bucket=np.int32(7))))
  assert type(got['caption']) is str and got['caption'] == 'ü'
  assert type(got['path']) is str and type(got['bucket']) is int and got['bucket'] == 7


@pytest.mark.parametrize('overrides, key', [
    ({'video': np.zeros((2, 4, 4, 3), np.float32)}, 'video'),
    ({'video': np.zeros((4, 4, 3), np.uint8)}, 'video'),
    ({'video': [[0]]}, 'video'),
    ({'caption': b'bytes'}, 'caption'),
    ({'path': 3}, 'path'),
    ({'bucket': 1.5}, 'bucket'),
    ({'bucket': True}, 'bucket'),
    ({'text_mask': np.ones(5, np.int32)}, 'text_mask'),
    ({'text_mask': np.ones(4, bool)}, 'text_mask'),
    ({'text_embeddings': np.ones((5, 3), np.float64)}, 'text_embeddings'),
    ({'text_mask': None}, 'text_mask'),
    ({'latents': np.zeros((2, 4, 4, 8), np.float32)}, 'latents'),
    ({'caption': None}, 'caption'),
    ({'label': 1}, 'label'),
])
def test_encode_rejects_bad_examples_naming_the_key(overrides, key):
  with pytest.raises(ValueError, match=key):
    records.encode(_example(0, **overrides))


def test_decode_rejects_foreign_npz():
  buf = io.BytesIO()
  np.savez(buf, video=np.zeros((1, 2, 2, 3), np.uint8))  # no caption
  with pytest.raises(ValueError, match='caption'):
    records.decode(buf.getvalue())


def test_shards_read_back_in_order_through_grain(tmp_path):
  examples = [_example(i) for i in range(5)]
  paths = records.write_shards(examples, tmp_path / 'train', num_shards=2)
  assert [p.rsplit('/', 1)[1] for p in paths] == ['train-00000-of-00002.array_record',
                                                  'train-00001-of-00002.array_record']
  assert [len(records.data_source([p])) for p in paths] == [2, 3]  # contiguous split
  ds = records.dataset(paths)
  assert len(ds) == 5
  got = list(ds)
  for g, want in zip(got, examples):
    _assert_same(g, want)
  _assert_same(ds[3], examples[3])  # random access


def test_decode_never_parses_python_in_threads(monkeypatch):
  """np.load reads .npy headers with ast.literal_eval, which CPython 3.11 breaks under threads
  (gh-106905: 'AST constructor recursion depth mismatch', seen in Grain's read threads); decode
  parses the headers itself, so a loader's threads never enter the ast module."""
  import ast  # pylint: disable=g-import-not-at-top
  import concurrent.futures  # pylint: disable=g-import-not-at-top

  def fail(*_):
    raise AssertionError('decode called ast.literal_eval')

  monkeypatch.setattr(ast, 'literal_eval', fail)
  data = [records.encode(_example(i, bucket=i), compress=i % 2 == 1) for i in range(8)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(records.decode, data * 50))
  for i, g in enumerate(got):
    _assert_same(g, _example(i % 8, bucket=i % 8))
  assert got[0]['video'].flags.writeable


def test_decode_rejects_truncated_and_garbage_records():
  data = records.encode(_example(0))
  for bad in (data[:len(data) // 2], b'garbage', data[:40] + b'\0' * (len(data) - 40)):
    with pytest.raises(ValueError):
      records.decode(bad)

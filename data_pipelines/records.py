"""The one serialization of a prepared example, as stored in our ArrayRecord shards.

An example is a dict with
  'video':   uint8 [T, H, W, 3]            } exactly one of the two
  'latents': float16/float32 [T, H, W, C]  }
  'caption': str
and optionally
  'text_embeddings': float16/float32 [L, D] } both or neither
  'text_mask':       bool [L]               }
  'path':   str (source file)
  'bucket': int (shape bucket id)

A record is the `np.savez` of those arrays (a zip of .npy files): self-describing,
readable with plain numpy, and loaded with allow_pickle=False so a record can never run
code. Strings travel as numpy unicode scalars and come back as python str.

Shards are written with group_size:1, which Grain needs for cheap random access, and
are read back with `grain.sources.ArrayRecordDataSource` + `.map(decode)`.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Sequence

import grain
import numpy as np
from array_record.python import array_record_module

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32))
_STRINGS = ('caption', 'path')
_OPTIONAL = ('text_embeddings', 'text_mask', 'path', 'bucket')
KEYS = ('video', 'latents', 'caption') + _OPTIONAL
# Grain reads records one by one at random; larger groups make each read decompress
# a whole group (array_record logs an error for anything else).
WRITER_OPTIONS = 'group_size:1'


def encode(example: dict, *, compress: bool = False) -> bytes:
  """Validated example -> bytes. `compress` zips each array (decode reads both)."""
  arrays = _to_arrays(example)
  buf = io.BytesIO()
  (np.savez_compressed if compress else np.savez)(buf, **arrays)
  return buf.getvalue()


def decode(data: bytes) -> dict:
  """Inverse of `encode`: arrays stay numpy, 'caption'/'path' -> str, 'bucket' -> int."""
  try:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
      arrays = {}
      for name in z.namelist():
        with z.open(name) as f:
          arrays[name.removesuffix('.npy')] = _read_npy(f)
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise ValueError(f'not a record (a zip of .npy arrays): {e}') from None
  _to_arrays(arrays)  # same schema checks: catches corrupt or foreign records early
  example = {}
  for key, value in arrays.items():
    if key in _STRINGS:
      example[key] = str(value[()])
    elif key == 'bucket':
      example[key] = int(value)
    else:
      example[key] = value
  return example


# np.load parses each .npy header with ast.literal_eval, which under CPython 3.11 fails at random in
# threads (gh-106905: "SystemError: AST constructor recursion depth mismatch"); Grain decodes in
# threads, so the header numpy writes ({'descr': ..., 'fortran_order': ..., 'shape': (...), }) is
# read here with a regular expression instead.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=][a-zA-Z]\d*)', 'fortran_order': (True|False),"
                         r" 'shape': \(((?:\d+, ?)*\d*)\), \}\s*$")


def _read_npy(f) -> np.ndarray:
  if f.read(6) != b'\x93NUMPY':
    raise ValueError('not a .npy array')
  major, _ = f.read(2)
  size = struct.unpack('<H' if major == 1 else '<I', f.read(2 if major == 1 else 4))[0]
  header = f.read(size).decode('latin1' if major < 3 else 'utf8')
  m = _NPY_HEADER.match(header)
  if not m:
    raise ValueError(f'unexpected .npy header {header.strip()!r}')
  dtype = np.dtype(m.group(1))
  shape = tuple(int(n) for n in m.group(3).replace(' ', '').split(',') if n)
  if dtype.hasobject:
    raise ValueError('object arrays are not records')
  array = np.empty(shape, dtype, order='F' if m.group(2) == 'True' else 'C')
  view = memoryview(array.reshape(-1, order='A')).cast('B') if array.size else memoryview(b'')
  if f.readinto(view) != array.nbytes:
    raise EOFError('truncated .npy array')
  return array


def _to_arrays(example: dict) -> dict[str, np.ndarray]:
  """Checks the schema and returns the numpy arrays to store; ValueError names the key."""
  if not isinstance(example, dict):
    raise ValueError(f'example must be a dict, got {type(example).__name__}')
  unknown = sorted(set(example) - set(KEYS))
  if unknown:
    raise ValueError(f'unknown example keys {unknown}; expected a subset of {KEYS}')
  if ('video' in example) == ('latents' in example):
    raise ValueError("example needs exactly one of 'video' and 'latents'")
  if 'caption' not in example:
    raise ValueError("example is missing 'caption'")
  if ('text_embeddings' in example) != ('text_mask' in example):
    raise ValueError("'text_embeddings' and 'text_mask' go together: give both or neither")
  arrays = {}
  for key, value in example.items():
    if key in _STRINGS:
      arrays[key] = _string(key, value)
    elif key == 'bucket':
      arrays[key] = _integer(key, value)
    else:
      arrays[key] = _array(key, value)
  if 'text_mask' in arrays and arrays['text_mask'].shape[0] != arrays['text_embeddings'].shape[0]:
    raise ValueError(f"'text_mask' has length {arrays['text_mask'].shape[0]} but"
                     f" 'text_embeddings' has {arrays['text_embeddings'].shape[0]} rows")
  return arrays


def _array(key: str, value) -> np.ndarray:
  if not isinstance(value, np.ndarray):
    raise ValueError(f'{key!r} must be a numpy array, got {type(value).__name__}')
  if key == 'video':
    ok = value.dtype == np.uint8 and value.ndim == 4 and value.shape[-1] == 3
    want = 'uint8 [T, H, W, 3]'
  elif key == 'latents':
    ok = value.dtype in _FLOATS and value.ndim == 4
    want = 'float16/float32 [T, H, W, C]'
  elif key == 'text_embeddings':
    ok = value.dtype in _FLOATS and value.ndim == 2
    want = 'float16/float32 [L, D]'
  else:  # text_mask
    ok = value.dtype == np.bool_ and value.ndim == 1
    want = 'bool [L]'
  if not ok:
    raise ValueError(f'{key!r} must be {want}, got {value.dtype} {list(value.shape)}')
  return value


def _string(key: str, value) -> np.ndarray:
  if not isinstance(value, str):  # np.str_ is a str subclass, so it passes too
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind == 'U':
      return value  # already stored form (decode re-validates it)
    raise ValueError(f'{key!r} must be a str, got {type(value).__name__}')
  return np.array(value, dtype=np.str_)


def _integer(key: str, value) -> np.ndarray:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value[()]
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{key!r} must be an int, got {type(value).__name__}')
  return np.array(value, dtype=np.int64)


def shard_paths(prefix: str | os.PathLike, num_shards: int) -> list[str]:
  """'{prefix}-00000-of-00002.array_record', ... (the TFDS naming convention)."""
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  return [f'{os.fspath(prefix)}-{i:05d}-of-{num_shards:05d}.array_record'
          for i in range(num_shards)]


def write_shard(path: str | os.PathLike, examples: Iterable[dict], *,
                compress: bool = False) -> int:
  """Encodes and writes `examples` into one ArrayRecord file; returns the count."""
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), WRITER_OPTIONS)
  count = 0
  try:
    for example in examples:
      writer.write(encode(example, compress=compress))
      count += 1
  finally:
    writer.close()
  return count


def write_shards(examples: Sequence[dict], prefix: str | os.PathLike, num_shards: int, *,
                 compress: bool = False) -> list[str]:
  """Splits `examples` into `num_shards` contiguous, near-equal shards; returns their paths.

  Contiguous (not round-robin) so that reading the shards in order gives back the input
  order: record i of the concatenation is examples[i].
  """
  paths = shard_paths(prefix, num_shards)
  bounds = np.linspace(0, len(examples), num_shards + 1).round().astype(int)
  for path, lo, hi in zip(paths, bounds[:-1], bounds[1:]):
    write_shard(path, (examples[i] for i in range(lo, hi)), compress=compress)
  return paths


def data_source(paths: Sequence[str | os.PathLike]) -> grain.sources.ArrayRecordDataSource:
  """Random-access source of raw records (bytes) over the concatenation of `paths`."""
  return grain.sources.ArrayRecordDataSource([os.fspath(p) for p in paths])


def dataset(paths: Sequence[str | os.PathLike]) -> grain.MapDataset:
  """Decoded examples, in shard order, as a Grain MapDataset."""
  return grain.MapDataset.source(data_source(paths)).map(decode)

"""Reading Hugging Face safetensors checkpoints (one file, or shards listed by an .index.json) as
numpy, without torch; shared by the Wan transformer / VAE and umT5 loaders."""

import contextlib
import functools
import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open

_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}
TORCH_PICKLES = ('.bin', '.pth', '.pt', '.ckpt')


def weight_files(folder: str, weights_name: str) -> dict[str, str]:
  """Checkpoint key -> the file holding it: `weights_name` (e.g. 'model.safetensors'), or the shards
  its `weights_name + '.index.json'` lists."""
  index_name = weights_name + '.index.json'
  index = os.path.join(folder, index_name)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.isfile(f)})
    if absent:
      raise FileNotFoundError(f'{index_name} in {folder!r} lists shards that do not exist: {absent}')
    return files
  single = os.path.join(folder, weights_name)
  if os.path.isfile(single):
    with safe_open(single, framework='numpy') as f:
      return {k: single for k in f.keys()}
  pickles = sorted(n for n in os.listdir(folder) if n.endswith(TORCH_PICKLES))
  hint = (f'; found {pickles}: torch pickles are not read, save them as safetensors' if pickles
          else f'; found {sorted(os.listdir(folder))}')
  raise FileNotFoundError(f'No weights in {folder!r}: expected {weights_name} or {index_name}{hint}')


@contextlib.contextmanager
def reader(files: dict[str, str]):
  """Yields read(key) -> np.ndarray over the files of `weight_files`, each opened once."""
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework='numpy')) for f in set(files.values())}

    def read(key):
      try:
        return handles[files[key]].get_tensor(key)
      except TypeError:  # "data type 'bfloat16' not understood" (older safetensors)
        return read_tensor_raw(files[key], key)

    yield read


@functools.lru_cache(maxsize=64)
def _header(file: str) -> tuple[int, dict]:
  with open(file, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    return 8 + size, json.loads(f.read(size))


def read_tensor_raw(file: str, key: str) -> np.ndarray:
  """One tensor decoded from the safetensors layout itself (8-byte header size, JSON header,
  little-endian data). The fallback for safetensors releases whose numpy API rejects bfloat16."""
  offset, header = _header(file)
  info = header[key]
  start, end = info['data_offsets']
  with open(file, 'rb') as f:
    f.seek(offset + start)
    data = f.read(end - start)
  return np.frombuffer(data, _DTYPES[info['dtype']]).reshape(info['shape'])


def listing(names, limit: int = 20) -> str:
  """'a, b, c ... and N more' (sorted) for error messages; 'none' when empty."""
  names = sorted(map(str, names))
  if not names:
    return 'none'
  more = f' ... and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more

r"""Manifest -> preprocessed ArrayRecord shards, for training with `config.data.prepared=DIR`. The
command line is sora_jax/prepare.py (`python -m sora_jax.prepare`), which also supplies the frozen
encoders for cached latents / caption embeddings; its docstring describes the layout and the flags.

The manifest is indexed exactly as training indexes it (`bucketed.index_manifest`: probe, bucket,
skip bad rows by reason). Examples, in index order, are cut into shards of `shard_size`: shard k
holds examples [k*S, (k+1)*S). Each example becomes ONE clip, decoded deterministically (from its
`start`, centre crop) at its bucket's shape, stored as a `records` record {'video', 'caption',
'path', 'bucket'}. An example that fails to decode now is skipped and counted by reason.

Resumable: a shard is written under a temporary name and renamed when complete, then its JSON
sidecar (records' paths and buckets, skips, a digest of the shard's examples) is written the same
way; the sidecar marks it done. A rerun redoes only shards without a consistent sidecar and discards
temporary files of a killed run. The layout is a function of the manifest and config alone, so a
rerun reproduces it; a folder prepared from another manifest/config (see `fingerprint`) is refused
unless --overwrite.

Cached encodings (training then skips the frozen encoders' forward passes on every step):
  --cache_latents (needs config.autoencoder): a record holds the autoencoder's posterior mean
      'latents' [t, h, w, C], UNnormalised, instead of the pixels; training only normalises it
      (sora_jax.frozen.Frozen.encode_batch), so the normalisation stays with the training config.
  --cache_text (needs config.text.encoder='umt5'): a record also holds the frozen text encoder's
      'text_embeddings' [n, D] and 'text_mask' [n] of its caption, tokenized at
      config.text.max_length and cut after the last real token (the rest are zero rows, restored
      when batched): a 60-token caption of a 512-token umT5 sequence is stored as 60 rows.
  --cache_dtype: float16 (default) or float32. Why float16 is safe: it keeps 11 significant bits,
      a relative rounding error of at most 2^-11 = 4.9e-4 (absolute 3e-8 below 6e-5), under the
      bfloat16 rounding (2^-8) of a bfloat16 model's inputs and far under the flow-matching noise
      mixed into every training input; and it halves the bytes read per step. Its range
      (|x| <= 65504) is checked on every batch: a value beyond it stops the run, asking for
      float32, instead of storing inf.
  Clips are encoded in batches of --encode_batch_size clips of one bucket (a partial batch is
  padded, so each bucket compiles once), in this process (which owns the accelerator), with
  --num_processes decoding threads; records keep the example order. The fingerprint (index.json,
  sidecars) records what was cached: the encoders' paths and signatures (config and tokenizer
  files, weight file names and sizes, checkpoint steps), the dtype and the caption length;
  `check_cached` refuses to train on them with a config whose config.autoencoder /
  config.text.path / config.text.max_length differ, naming the key.

Output: DIR/shard-NNNNN.array_record (+ .json sidecars) and DIR/index.json, which
`pipeline.prepared_examples` reads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import hashlib
import json
import math
import multiprocessing
import os
import time

import numpy as np
from absl import logging

from data_pipelines import bucketed, records, video_decode
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import geometry

INDEX = 'index.json'
CACHE_DTYPES = ('float16', 'float32')
_FORMAT = 1  # bump when the record or sidecar layout changes: old folders are then refused
_TMP = '.tmp'


# ----------------------------------------------------------------------------------- file names --


def shard_name(k: int) -> str:
  # No "-of-N": a shard's name must not depend on how many examples follow it, so that earlier
  # shards survive a rerun whose index changed further on.
  return f'shard-{k:05d}.array_record'


def _sidecar_name(k: int) -> str:
  return f'shard-{k:05d}.json'


def _ours(folder: str) -> list[str]:
  """Every file this module may have written in `folder` (shards, sidecars, temporaries, index)."""
  names = glob.glob(os.path.join(folder, 'shard-[0-9]*.array_record*'))
  names += glob.glob(os.path.join(folder, 'shard-[0-9]*.json*'))
  return sorted(names + glob.glob(os.path.join(folder, INDEX + '*')))


def _write_json(path: str, value):
  """Atomic: a reader (or a rerun after a kill) sees the old file or the whole new one."""
  with open(path + _TMP, 'w') as f:
    json.dump(value, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + _TMP, path)


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _fsync(path: str):
  with open(path, 'rb') as f:
    os.fsync(f.fileno())


# --------------------------------------------------------------------------------- fingerprint --


def fingerprint(manifest: str, table, fps: float, shard_size: int, cached: dict | None = None
                ) -> dict:
  """What the shard layout depends on. The media files themselves are covered per shard by the
  digest of its indexed examples (a re-probed file that changed changes its shard's digest).
  `cached`: `cache_spec`'s record of the cached encodings (absent when nothing is cached)."""
  stat = os.stat(manifest)
  fp = {
      'format': _FORMAT,
      'manifest': os.path.abspath(manifest),
      'manifest_bytes': stat.st_size,
      'manifest_mtime_ns': stat.st_mtime_ns,
      'buckets': [list(b.shape) for b in table],
      'fps': float(fps),
      'shard_size': int(shard_size),
  }
  if cached:
    fp['cached'] = cached
  return fp


def _differences(old: dict, new: dict) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys)


def _check_folder(folder: str, fp: dict, overwrite: bool):
  """Refuses a folder prepared from something else (or clears it with overwrite); drops the
  temporary files of a killed run."""
  found = []
  index = _read_json(os.path.join(folder, INDEX))
  if index is not None:
    found.append((INDEX, index.get('fingerprint')))
  # Sidecars too: index.json is written last, so a killed first run leaves only them.
  for path in sorted(glob.glob(os.path.join(folder, 'shard-[0-9]*.json'))):
    sidecar = _read_json(path)
    found.append((os.path.basename(path), sidecar.get('fingerprint') if sidecar else None))
  foreign = [(name, old) for name, old in found if old != fp]
  if foreign and not overwrite:
    name, old = foreign[0]
    why = _differences(old, fp) if isinstance(old, dict) else 'no readable fingerprint'
    raise ValueError(
        f'{folder} holds data prepared from a different manifest or config ({name}: {why}).'
        ' Use another --output_dir, or --overwrite to replace it.')
  for path in _ours(folder):
    if foreign or path.endswith(_TMP):
      os.remove(path)
      logging.info('Removed %s', path)


# ----------------------------------------------------------------------------- cached encodings --


def encoder_signature(path: str) -> str:
  """A cheap fingerprint of the model at `path` and its immediate subfolders (a Wan folder's vae/,
  text_encoder/, tokenizer/; a sora_jax workdir's checkpoints/): the contents of its config and
  tokenizer files, its weight files' names and sizes, its checkpoint steps. It notices a model trained
  further or swapped at the same path; it is not a hash of the weights (gigabytes, read at every
  start), so same-sized weights replaced in place go unnoticed."""
  h = hashlib.sha256()
  folders = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)
                            if os.path.isdir(os.path.join(path, d)))
  for folder in folders:
    for name in sorted(os.listdir(folder)):
      full = os.path.join(folder, name)
      key = os.path.relpath(full, path)
      if name in ('config.json', 'latent_stats.json', 'spiece.model') or name.endswith('index.json'):
        with open(full, 'rb') as f:
          h.update(f'{key}:'.encode() + hashlib.sha256(f.read()).digest())
      elif name.endswith('.safetensors'):
        h.update(f'{key}:{os.path.getsize(full)};'.encode())
      elif os.path.basename(folder) == 'checkpoints' and name.isdigit():
        h.update(f'{key};'.encode())
  return h.hexdigest()


def cache_spec(config, *, latents: bool, text: bool, dtype: str = 'float16') -> dict:
  """What a folder caches and which encoders made it ({} when nothing is): part of its fingerprint,
  and index.json's 'cached', which `check_cached` compares with a training config."""
  if dtype not in CACHE_DTYPES:
    raise ValueError(f'cache dtype {dtype!r}: expected one of {CACHE_DTYPES}.')
  spec = {}
  if latents:
    if not config.autoencoder:
      raise ValueError('--cache_latents needs config.autoencoder (the autoencoder whose latents to'
                       ' store).')
    if not os.path.isdir(config.autoencoder):
      raise ValueError(f'config.autoencoder={config.autoencoder!r} is not a folder.')
    spec['latents'] = {'autoencoder': os.path.realpath(config.autoencoder),
                       'signature': encoder_signature(config.autoencoder), 'dtype': dtype}
  if text:
    if config.text.encoder != 'umt5':
      raise ValueError(f"--cache_text needs config.text.encoder='umt5' (got"
                       f' {config.text.encoder!r}: the byte encoder is trained, nothing to cache).')
    if not os.path.isdir(config.text.path):
      raise ValueError(f'config.text.path={config.text.path!r} is not a folder.')
    spec['text'] = {'encoder': 'umt5', 'path': os.path.realpath(config.text.path),
                    'signature': encoder_signature(config.text.path),
                    'max_length': int(config.text.max_length),
                    'compute_dtype': config.model.dtype, 'dtype': dtype}
  return spec


def check_cached(cached: dict, config, folder: str):
  """Refuses to train `config` on encodings its own frozen encoders would not produce (another
  autoencoder or text encoder, one changed since, another caption length); the error names the key."""
  again = f' Point it at the model the data was prepared with, or prepare {folder!r} again.'
  latents, text = cached.get('latents'), cached.get('text')
  if latents:
    if not config.autoencoder:
      raise ValueError(f'config.data.prepared={folder!r} holds latents of the autoencoder'
                       f' {latents["autoencoder"]!r}, but config.autoencoder is empty.' + again)
    _check_same('config.autoencoder', config.autoencoder, latents['autoencoder'],
                latents['signature'], folder, again)
  if text:
    if config.text.encoder != 'umt5':
      raise ValueError(f'config.data.prepared={folder!r} holds umT5 caption embeddings, but'
                       f' config.text.encoder={config.text.encoder!r}; set it to "umt5".')
    _check_same('config.text.path', config.text.path, text['path'], text['signature'], folder,
                again)
    if config.text.max_length != text['max_length']:
      raise ValueError(f'config.text.max_length={config.text.max_length}, but the caption embeddings'
                       f' in config.data.prepared={folder!r} were made at {text["max_length"]}'
                       ' tokens (truncation differs); use that, or prepare the data again.')


def _check_same(key, value, path, signature, folder, again):
  if os.path.realpath(value) != path:
    raise ValueError(f'{key}={value!r} is not the model whose encodings config.data.prepared='
                     f'{folder!r} holds ({path!r}): training would pair them with another model\'s'
                     ' latent space.' + again)
  if not os.path.isdir(value) or encoder_signature(value) != signature:
    raise ValueError(f'{key}={value!r}: its files changed since config.data.prepared={folder!r}'
                     ' was encoded with it (config, tokenizer, weights or checkpoint steps).' + again)


class Encoder:
  """Turns (example, record) pairs of decoded clips into cached-encoding records, in the order they
  come. The clips of one bucket are encoded together, `batch_size` at a time; a partial batch is
  padded with copies of its last clip, so each bucket compiles once. `frozen`: `load_encoders`."""

  def __init__(self, frozen, spec: dict, batch_size: int):
    self.frozen = frozen
    self.latents, self.text = 'latents' in spec, 'text' in spec
    self.dtype = np.dtype(next(iter(spec.values()))['dtype'])
    self.batch_size = batch_size
    # A rare bucket's partial batch is encoded early rather than hold back more finished records.
    self.max_held = 4 * batch_size

  def __call__(self, stream):
    items, pending, ready = {}, collections.defaultdict(list), {}
    next_out = 0
    for pos, (example, record) in enumerate(stream):
      items[pos] = (example, record)
      bucket = pending[record['bucket']]
      bucket.append(pos)
      if len(bucket) == self.batch_size:
        self._encode(pending.pop(record['bucket']), items, ready)
      while pending and pos - min(p[0] for p in pending.values()) >= self.max_held:
        self._encode(pending.pop(min(pending, key=lambda b: pending[b][0])), items, ready)
      while next_out in ready:
        yield ready.pop(next_out)
        next_out += 1
    for b in sorted(pending, key=lambda b: pending[b][0]):
      self._encode(pending[b], items, ready)
    while next_out in ready:
      yield ready.pop(next_out)
      next_out += 1

  def _encode(self, positions, items, ready):
    pairs = [items.pop(p) for p in positions]
    pad = [len(pairs) - 1] * (self.batch_size - len(pairs))
    out = [dict(record) for _, record in pairs]
    if self.latents:
      video = np.stack([out[i]['video'] for i in list(range(len(out))) + pad])
      # As the train loop's input pipeline scales pixels (bucketed.LoadBatch).
      mean = self.frozen.encode_video_mean(video.astype(np.float32) / 127.5 - 1.0)
      mean = self._narrow(np.asarray(mean, np.float32)[:len(out)], 'latent means')
      for record, z in zip(out, mean):
        del record['video']
        record['latents'] = z
    if self.text:
      captions = [out[i]['caption'] for i in list(range(len(out))) + pad]
      tokens, mask = self.frozen.tokenize(captions)
      embeddings, mask = self.frozen.caption_inputs(tokens, mask)
      embeddings = self._narrow(np.asarray(embeddings, np.float32)[:len(out)], 'caption embeddings')
      for record, e, m in zip(out, embeddings, np.asarray(mask, bool)):
        n = int(np.flatnonzero(m)[-1]) + 1 if m.any() else 0  # rows after the last token: zeros
        record['text_embeddings'], record['text_mask'] = e[:n], m[:n]
    for p, (example, _), record in zip(positions, pairs, out):
      ready[p] = (example, record)

  def _narrow(self, x, what):
    if not np.isfinite(x).all():
      raise ValueError(f'The frozen encoder produced non-finite {what}.')
    if self.dtype == np.float16 and np.abs(x).max() > np.finfo(np.float16).max:
      raise ValueError(f'{what} reach {np.abs(x).max():.4g}, beyond float16\'s range (65504):'
                       ' prepare with --cache_dtype=float32.')
    return x.astype(self.dtype)


# --------------------------------------------------------------------------------------- shards --


def _digest(examples: list[bucketed.Example]) -> str:
  rows = [[e.path, e.caption, e.bucket, e.start, e.end] for e in examples]
  return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _is_done(folder: str, k: int, fp: dict, digest: str) -> dict | None:
  """The shard's sidecar when the shard is complete and was made from these same examples."""
  sidecar = _read_json(os.path.join(folder, _sidecar_name(k)))
  if not sidecar or sidecar.get('fingerprint') != fp or sidecar.get('digest') != digest:
    return None
  if sidecar['file'] is not None:
    path = os.path.join(folder, sidecar['file'])
    if not os.path.isfile(path) or os.path.getsize(path) != sidecar['bytes']:
      return None
  return sidecar


def _write_shard(task: dict, encoder: Encoder | None = None, threads: int = 1) -> dict:
  """Decodes (in `threads` threads), optionally encodes, and writes one shard; returns its sidecar."""
  k, folder, fps = task['shard'], task['folder'], task['fps']
  table = [tuple(s) for s in task['buckets']]
  paths, record_buckets, skipped = [], [], []

  def decode(e):
    frames, height, width = table[e.bucket]
    try:
      # One deterministic clip per example: from its window's start, centre crop.
      return video_decode.decode_clip(e.path, start=e.start, num_frames=frames, fps=fps,
                                      size=(height, width), crop=(0.5, 0.5))
    except video_decode.DecodeError as err:
      return err

  def decoded():
    for e, video in _ordered_map(decode, task['examples'], threads):
      if isinstance(video, video_decode.DecodeError):
        skipped.append([e.path, video.reason])
        logging.warning('Skipping %s: %s', e.path, video)
        continue
      yield e, {'video': video, 'caption': e.caption, 'path': e.path, 'bucket': e.bucket}

  def clips():
    for e, record in (decoded() if encoder is None else encoder(decoded())):
      paths.append(e.path)
      record_buckets.append(e.bucket)
      yield record

  name = shard_name(k)
  final = os.path.join(folder, name)
  count = records.write_shard(final + _TMP, clips())
  if count:
    _fsync(final + _TMP)
    os.replace(final + _TMP, final)
  else:  # every example failed: no file, the sidecar alone records the skips
    os.remove(final + _TMP)
    if os.path.exists(final):
      os.remove(final)
    name = None
  sidecar = {
      'shard': k, 'fingerprint': task['fingerprint'], 'digest': task['digest'], 'file': name,
      'bytes': os.path.getsize(final) if name else 0, 'paths': paths,
      'record_buckets': record_buckets, 'skipped': skipped,
  }
  _write_json(os.path.join(folder, _sidecar_name(k)), sidecar)  # last: marks the shard done
  return sidecar


def _ordered_map(fn, items, threads: int):
  """(item, fn(item)) in order, `threads` at a time, at most 2 * threads ahead of the consumer (a
  decoded clip can be large)."""
  if threads <= 1:
    yield from ((x, fn(x)) for x in items)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    window = collections.deque()
    for x in items:
      window.append((x, pool.submit(fn, x)))
      if len(window) > 2 * threads:
        x0, future = window.popleft()
        yield x0, future.result()
    for x0, future in window:
      yield x0, future.result()


def _run(tasks: list[dict], num_processes: int, encoder: Encoder | None = None):
  """Yields sidecars as shards complete."""
  if encoder is not None:
    # One process owns the accelerator and the encoders' weights: it encodes, threads decode.
    for task in tasks:
      yield _write_shard(task, encoder, threads=num_processes)
    return
  if num_processes <= 1 or len(tasks) <= 1:
    yield from map(_write_shard, tasks)
    return
  # spawn, not fork: this process ran probing threads (and may hold JAX/FFmpeg threads); a fork
  # copies their locks in whatever state they are.
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(min(num_processes, len(tasks))) as pool:
    yield from pool.imap_unordered(_write_shard, tasks, chunksize=1)


# ----------------------------------------------------------------------------------------- main --


def prepare(config, manifest: str, output_dir: str, *, num_processes: int = 1,
            shard_size: int = 256, overwrite: bool = False, cache_latents: bool = False,
            cache_text: bool = False, cache_dtype: str = 'float16',
            encode_batch_size: int = 8, load_encoders=None) -> dict:
  """Writes (or completes) `output_dir`; returns the index (also written as index.json).

  load_encoders(config, spec) -> the frozen encoders (`Encoder`'s `frozen`) whose outputs `spec`
  caches; needed with cache_latents / cache_text (sora_jax/prepare.py passes
  inference.frozen.Frozen), called only when a shard is left to write."""
  start_time = time.time()
  errors = buckets_lib.check(config)
  if config.data.fps <= 0:
    errors.append(f'config.data.fps={config.data.fps} must be positive.')
  if shard_size < 1:
    errors.append(f'shard_size={shard_size} must be >= 1.')
  if encode_batch_size < 1:
    errors.append(f'encode_batch_size={encode_batch_size} must be >= 1.')
  if errors:
    raise ValueError(' '.join(errors))
  if not os.path.isfile(manifest):
    raise ValueError(f'manifest {manifest!r} is not a file.')
  if (cache_latents or cache_text) and load_encoders is None:
    raise ValueError('Caching encodings needs the frozen encoders: run `python -m sora_jax.prepare`'
                     ' (or pass load_encoders).')
  table = buckets_lib.make(config, 1)
  fps = float(config.data.fps)
  cached = cache_spec(config, latents=cache_latents, text=cache_text, dtype=cache_dtype)
  if cache_latents:
    _check_autoencoder_buckets(config, table)
  fp = fingerprint(manifest, table, fps, shard_size, cached)
  os.makedirs(output_dir, exist_ok=True)
  _check_folder(output_dir, fp, overwrite)

  skips = bucketed.SkipLog(config.data.max_skip_fraction)
  examples = bucketed.index_manifest(manifest, table, fps=fps, skips=skips,
                                     num_threads=config.data.probe_threads)
  if not examples:
    raise ValueError(f'Manifest {manifest}: no usable examples ({dict(skips.counts)}).')
  num_rows = skips.seen

  shards = [examples[k * shard_size:(k + 1) * shard_size]
            for k in range(math.ceil(len(examples) / shard_size))]
  sidecars, tasks = {}, []
  for k, members in enumerate(shards):
    digest = _digest(members)
    done = _is_done(output_dir, k, fp, digest)
    if done:
      sidecars[k] = done
    else:
      tasks.append({'shard': k, 'folder': output_dir, 'fps': fps, 'examples': members,
                    'buckets': fp['buckets'], 'fingerprint': fp, 'digest': digest})
  print(f'{len(examples)} examples of {num_rows} rows in {len(shards)} shards:'
        f' {len(sidecars)} already done, {len(tasks)} to write.', flush=True)
  encoder = None
  if cached and tasks:
    encoder = Encoder(load_encoders(config, cached), cached, encode_batch_size)
  for sidecar in _run(tasks, num_processes, encoder):
    sidecars[sidecar['shard']] = sidecar
    print(f'  {_sidecar_name(sidecar["shard"])[:-5]}: {len(sidecar["paths"])} records,'
          f' {len(sidecar["skipped"])} skipped ({len(sidecars)}/{len(shards)} shards)', flush=True)
  # Shards of an earlier, longer layout (a source file became unreadable since): not ours anymore.
  for path in _ours(output_dir):
    base = os.path.basename(path)
    if base.startswith('shard-') and int(base[6:].split('.')[0]) >= len(shards):
      os.remove(path)

  ordered = [sidecars[k] for k in range(len(shards))]
  for s in ordered:
    skips.skipped.extend((p, r) for p, r in s['skipped'])
  skips.check(f'Preparing {manifest}')  # training would refuse these shards anyway
  index = {
      'buckets': fp['buckets'],
      'fps': fps,
      'shards': [s['file'] for s in ordered if s['file']],
      'paths': [p for s in ordered for p in s['paths']],
      'record_buckets': [b for s in ordered for b in s['record_buckets']],
      'num_rows': num_rows,
      'skipped': [list(s) for s in skips.skipped],
      'cached': cached,
      'fingerprint': fp,
  }
  _write_json(os.path.join(output_dir, INDEX), index)
  _print_summary(index, time.time() - start_time)
  return index


def _check_autoencoder_buckets(config, table):
  g = geometry.autoencoder_geometry(config.autoencoder)
  for b in table:
    if (b.frames - 1) % g['temporal'] or b.height % g['spatial'] or b.width % g['spatial']:
      key = 'config.data.buckets' if config.data.buckets else 'config.data.num_frames/height/width'
      raise ValueError(f'{key}: clip {b.shape} does not fit config.autoencoder={config.autoencoder!r}'
                       f' ({g["temporal"]}x temporal, {g["spatial"]}x spatial): frames must be 1 +'
                       f' {g["temporal"]}k and height/width multiples of {g["spatial"]}.')


def _print_summary(index: dict, seconds: float):
  per_bucket = collections.Counter(index['record_buckets'])
  print(f'Wrote {len(index["paths"])} examples in {len(index["shards"])} shards:')
  for b, shape in enumerate(index['buckets']):
    print(f'  bucket {tuple(shape)} (frames, height, width): {per_bucket[b]} examples')
  counts = collections.Counter(reason for _, reason in index['skipped'])
  print(f'Skipped {len(index["skipped"])} of {index["num_rows"]} rows'
        + (f': {dict(counts.most_common())}' if counts else '.'))
  print(f'{seconds:.1f} s', flush=True)

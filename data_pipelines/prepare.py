r"""Manifest -> preprocessed ArrayRecord shards, for training with `config.data.prepared=DIR`.

  python -m data_pipelines.prepare --manifest=videos.csv --output_dir=prepared \
      [--config=configs/demo.py] [--num_processes=8] [--shard_size=256] [--overwrite]

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

Output: DIR/shard-NNNNN.array_record (+ .json sidecars) and DIR/index.json, which
`pipeline.prepared_examples` reads.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import math
import multiprocessing
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from data_pipelines import bucketed, records, video_decode
from data_pipelines import buckets as buckets_lib

INDEX = 'index.json'
_FORMAT = 1  # bump when the record or sidecar layout changes: old folders are then refused
_TMP = '.tmp'


def define_flags():
  """Defined only when run as a program, so the module imports cleanly next to the other CLIs."""
  config_flags.DEFINE_config_file('config', 'configs/demo.py',
                                  'Training config: buckets, fps, skip limit, probe threads.',
                                  lock_config=True)
  flags.DEFINE_string('manifest', None, 'CSV/JSONL manifest (default: config.data.manifest).')
  flags.DEFINE_string('output_dir', None, 'Folder for the shards and index.json.')
  flags.DEFINE_integer('num_processes', 1, 'Decoding processes (1: in this process).')
  flags.DEFINE_integer('shard_size', 256, 'Examples per shard (before decode-time skips).')
  flags.DEFINE_bool('overwrite', False, 'Replace a folder prepared from another manifest/config.')


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

def fingerprint(manifest: str, table, fps: float, shard_size: int) -> dict:
  """What the shard layout depends on. The media files themselves are covered per shard by the
  digest of its indexed examples (a re-probed file that changed changes its shard's digest)."""
  stat = os.stat(manifest)
  return {
      'format': _FORMAT,
      'manifest': os.path.abspath(manifest),
      'manifest_bytes': stat.st_size,
      'manifest_mtime_ns': stat.st_mtime_ns,
      'buckets': [list(b.shape) for b in table],
      'fps': float(fps),
      'shard_size': int(shard_size),
  }


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


def _write_shard(task: dict) -> dict:
  """Decodes and writes one shard (in a worker process); returns its sidecar."""
  k, folder, fps = task['shard'], task['folder'], task['fps']
  table = [tuple(s) for s in task['buckets']]
  paths, record_buckets, skipped = [], [], []

  def clips():
    for e in task['examples']:
      frames, height, width = table[e.bucket]
      try:
        # One deterministic clip per example: from its window's start, centre crop.
        video = video_decode.decode_clip(e.path, start=e.start, num_frames=frames, fps=fps,
                                         size=(height, width), crop=(0.5, 0.5))
      except video_decode.DecodeError as err:
        skipped.append([e.path, err.reason])
        logging.warning('Skipping %s: %s', e.path, err)
        continue
      paths.append(e.path)
      record_buckets.append(e.bucket)
      yield {'video': video, 'caption': e.caption, 'path': e.path, 'bucket': e.bucket}

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


def _run(tasks: list[dict], num_processes: int):
  """Yields sidecars as shards complete."""
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
            shard_size: int = 256, overwrite: bool = False) -> dict:
  """Writes (or completes) `output_dir`; returns the index (also written as index.json)."""
  start_time = time.time()
  errors = buckets_lib.check(config)
  if config.data.fps <= 0:
    errors.append(f'config.data.fps={config.data.fps} must be positive.')
  if shard_size < 1:
    errors.append(f'shard_size={shard_size} must be >= 1.')
  if errors:
    raise ValueError(' '.join(errors))
  if not os.path.isfile(manifest):
    raise ValueError(f'manifest {manifest!r} is not a file.')
  table = buckets_lib.make(config, 1)
  fps = float(config.data.fps)
  fp = fingerprint(manifest, table, fps, shard_size)
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
  for sidecar in _run(tasks, num_processes):
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
      'fingerprint': fp,
  }
  _write_json(os.path.join(output_dir, INDEX), index)
  _print_summary(index, time.time() - start_time)
  return index


def _print_summary(index: dict, seconds: float):
  per_bucket = collections.Counter(index['record_buckets'])
  print(f'Wrote {len(index["paths"])} examples in {len(index["shards"])} shards:')
  for b, shape in enumerate(index['buckets']):
    print(f'  bucket {tuple(shape)} (frames, height, width): {per_bucket[b]} examples')
  counts = collections.Counter(reason for _, reason in index['skipped'])
  print(f'Skipped {len(index["skipped"])} of {index["num_rows"]} rows'
        + (f': {dict(counts.most_common())}' if counts else '.'))
  print(f'{seconds:.1f} s', flush=True)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  manifest = f.manifest or config.data.manifest
  if not manifest or not f.output_dir:
    raise app.UsageError('--manifest (or --config.data.manifest) and --output_dir are required.')
  prepare(config, manifest, f.output_dir, num_processes=f.num_processes, shard_size=f.shard_size,
          overwrite=f.overwrite)
  print(f'Train on it with --config.data.prepared={f.output_dir}')


if __name__ == '__main__':
  define_flags()
  app.run(main)

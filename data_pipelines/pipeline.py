"""Grain input pipelines for training and evaluation.

Global order is fixed by the seed alone and each process reads only its rows of each global batch, so
the data seen per step does not depend on the number of processes. Shapes: global batch s holds records
[s*B, (s+1)*B). User data (config.data.manifest / prepared / tfds_name): see bucketed.py. Packed
sequences (config.data.packing, off by default): packed_train_iterator and packing.py.
"""

import functools
import json
import os

import grain
import numpy as np
from absl import logging

from data_pipelines import bucketed, manifest, packing, prepare, records, shapes
from sora_jax.common import tokenizers
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import geometry


class ToModelInputs(grain.transforms.Map):
  """Caption -> tokens and mask (`Tokenizer`); the video stays uint8: the train step maps it to
  [-1, 1] on device (training/update.py:model_inputs), a quarter of the host memory and transfer."""

  def __init__(self, tokenize: tokenizers.Tokenizer):
    self.tokenize = tokenize

  def map(self, record):
    tokens, mask = self.tokenize([record['caption']])
    return {
        'video': record['video'],
        'tokens': tokens[0],
        'mask': mask[0],
    }


def source(config, split: str, seed: int):
  d = config.data
  return shapes.ShapesSource(num_frames=d.num_frames, height=d.height, width=d.width, split=split,
                             seed=seed, bounce=d.bounce, stop=d.stop, rest=d.rest)


def uses_user_data(config) -> bool:
  return bool(config.data.manifest or config.data.prepared or config.data.tfds_name)


class ProcessRows:
  """The rows of each global batch that one process feeds: a contiguous block, because its devices
  hold a contiguous block of the global batch (`make_array_from_process_local_data`). So global
  batch s is records s*B .. s*B + B - 1 whatever the process count, and a run on 2 processes sees
  exactly the batches of a run on 1."""

  def __init__(self, records, batch_size: int, process_index: int, process_count: int):
    self.records, self.batch_size = records, batch_size
    self.per_process = batch_size // process_count
    self.offset = process_index * self.per_process

  def __len__(self):
    return len(self.records) // self.batch_size * self.per_process

  def __getitem__(self, i):
    s, j = divmod(i, self.per_process)
    return self.records[s * self.batch_size + self.offset + j]


def train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                   data_parallel: int = 1, skips: bucketed.SkipLog | None = None):
  """Infinite, checkpointable iterator of per-process batches (grain.DatasetIterator)."""
  if config.data.packing:
    return packed_train_iterator(config, process_index=process_index, process_count=process_count,
                                 data_parallel=data_parallel, skips=skips)
  if uses_user_data(config):
    return _user_data_iterator(config, process_index, process_count, data_parallel, skips)
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the'
                     f' {process_count} processes.')
  # Records are i.i.d. draws keyed by index, so index order is already a shuffle.
  ds = grain.MapDataset.source(ProcessRows(source(config, 'train', config.seed), config.batch_size,
                                           process_index, process_count))
  ds = ds.map(ToModelInputs(tokenizers.Tokenizer(config)))
  per_process = config.batch_size // process_count
  ds = ds.to_iter_dataset(_read_options(config, per_process))
  ds = ds.batch(per_process, drop_remainder=True)
  return iter(_prefetch(ds, config))


def _read_options(config, elements_per_batch: int) -> grain.ReadOptions:
  """Threads reading ahead in each process (Grain's default, 16 threads x 500 elements, would hold
  hundreds of batches in memory and fight the train step for the CPU)."""
  threads = config.data.read_threads
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(threads, 2) * elements_per_batch)


def _prefetch(ds, config):
  if config.data.worker_count > 0:
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=config.data.worker_count,
        per_worker_buffer_size=config.data.prefetch_buffer_size))
  return ds


def data_captions(config, n: int) -> list[str]:
  """The first `n` usable captions of the user data, in its own order (manifest rows, prepared
  records, tfds examples): deterministic and cheap (nothing probed or decoded but n records), so
  every preview of a run shows the same prompts, ones the data actually trains on."""
  d = config.data
  if d.manifest:
    rows = manifest.read_manifest(d.manifest)
    captions = (r.caption for r in rows if not r.error and isinstance(r.caption, str))
  elif d.prepared:
    with open(os.path.join(d.prepared, 'index.json')) as f:
      index = json.load(f)
    source = records.data_source([os.path.join(d.prepared, s) for s in index['shards']])
    captions = (records.decode(source[i])['caption'] for i in range(len(source)))
  else:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    source = tfds.data_source(d.tfds_name, split='train', data_dir=d.tfds_data_dir or None,
                              download=False)
    captions = (source[i]['caption'] for i in range(len(source)))
  out = []
  for c in captions:
    c = c.decode('utf-8') if isinstance(c, bytes) else str(c)
    if c.strip():
      out.append(c)
    if len(out) == n:
      break
  return out


def user_examples(config, table, skips: bucketed.SkipLog):
  """(examples, load_fn) of the configured user data source."""
  d = config.data
  if d.manifest:
    examples = bucketed.index_manifest(d.manifest, table, fps=d.fps, skips=skips,
                                       num_threads=d.probe_threads)
    return examples, functools.partial(bucketed.decode_file, fps=d.fps, random_crop=d.random_crop)
  if d.prepared:
    return prepared_examples(config, table, skips)
  return tfds_examples(d.tfds_name, d.tfds_data_dir or None, table)


def tfds_examples(name: str, data_dir: str | None, table):
  """A dataset built by tfds_builder: one clip shape, which must be the config's one bucket."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  source = tfds.data_source(name, split='train', data_dir=data_dir, download=False)
  shape = tuple(source.dataset_info.features['video'].shape[:3])
  if [b.shape for b in table] != [shape]:
    raise ValueError(f'config.data.tfds_name={name!r} holds clips of {shape}; set the config\'s one'
                     f' bucket to it (config.data.num_frames, height, width), not {table}.')
  examples = [bucketed.Example(f'{name}[{i}]', '', 0, record=i) for i in range(len(source))]
  return examples, functools.partial(_load_tfds, source)


def _load_tfds(source, example, bucket, rng):
  del bucket, rng
  record = source[example.record]
  caption = record['caption']
  return record['video'], caption.decode('utf-8') if isinstance(caption, bytes) else caption


def prepared_examples(config, table, skips: bucketed.SkipLog):
  """Examples of shards written by `python -m sora_jax.prepare` (config.data.prepared); their
  buckets, frame rate and cached encodings (latents, caption embeddings) must be the config's."""
  folder = config.data.prepared
  with open(os.path.join(folder, 'index.json')) as f:
    index = json.load(f)
  shapes_here = [tuple(s) for s in index['buckets']]
  wanted = [b.shape for b in table]
  if shapes_here != wanted:
    raise ValueError(f'config.data.prepared={folder!r} was prepared for buckets {shapes_here}, but'
                     f' the config has {wanted} (config.data.buckets / num_frames, height, width).')
  if abs(index['fps'] - config.data.fps) > 1e-6:
    raise ValueError(f'config.data.prepared={folder!r} was prepared at {index["fps"]} fps, but'
                     f' config.data.fps={config.data.fps}.')
  cached = index.get('cached', {})
  prepare.check_cached(cached, config, folder)
  skips.seen += index['num_rows']
  for path, reason in index['skipped']:
    skips.skipped.append((path, reason))
  source = records.data_source([os.path.join(folder, s) for s in index['shards']])
  examples = [bucketed.Example(path, '', bucket, record=i)
              for i, (path, bucket) in enumerate(zip(index['paths'], index['record_buckets']))]
  if 'latents' in cached:
    ae_geometry = geometry.autoencoder_geometry(config.autoencoder)
    clip_shapes = {s: (*geometry.latent_shape(s, ae_geometry), ae_geometry['z_dim']) for s in wanted}
  else:
    clip_shapes = {s: (*s, 3) for s in wanted}
  return examples, functools.partial(_load_record, source, clip_shapes)


def _load_record(source, clip_shapes, example, bucket, rng):
  """(clip, caption) of a prepared record: uint8 pixels or cached latents; the caption's text, or
  its cached (embeddings [n, D], mask [n]) (see LoadBatch)."""
  del rng  # prepared clips are already cut and cropped
  record = records.decode(source[example.record])
  clip = record['video'] if 'video' in record else record['latents']
  if clip.shape != clip_shapes[bucket.shape]:
    raise ValueError(f'Prepared record {example.record} ({example.path}) has shape {clip.shape},'
                     f' expected {clip_shapes[bucket.shape]}.')
  if 'text_embeddings' in record:
    return clip, (record['text_embeddings'], record['text_mask'])
  return clip, record['caption']


def _user_data_iterator(config, process_index, process_count, data_parallel, skips):
  return iter(_user_data_dataset(config, process_index, process_count, data_parallel, skips))


def _user_data_dataset(config, process_index, process_count, data_parallel, skips):
  table = buckets_lib.make(config, bucketed.batch_multiple(config, process_count, data_parallel))
  skips = skips if skips is not None else bucketed.SkipLog(config.data.max_skip_fraction)
  examples, load_fn = user_examples(config, table, skips)
  plan = bucketed.BatchPlan([e.bucket for e in examples], table, config.seed)
  skips.bucket_rows = plan.rows_per_bucket
  logging.info('Buckets (frames, height, width: global batch, examples): %s; %d batches per epoch.',
               [(b.shape, b.batch_size, n) for b, n in zip(table, plan.rows_per_bucket)],
               plan.per_epoch)
  for b, n in zip(table, plan.rows_per_bucket):
    if 0 < n < b.batch_size:
      logging.warning('Bucket %s holds %d examples for a batch of %d: each of its batches repeats'
                      ' them (each with its own clip, crop and noise; a smaller'
                      ' config.data.tokens_per_batch or batch_size repeats fewer).', b.shape, n,
                      b.batch_size)
  ds = grain.MapDataset.source(plan).map(bucketed.LoadBatch(
      examples, table, load_fn=load_fn, seed=config.seed, max_length=config.text.max_length,
      tokenize=tokenizers.Tokenizer(config), process_index=process_index, process_count=process_count))
  return _prefetch(ds.to_iter_dataset(_read_options(config, 1)), config).map(
      bucketed.CountSkips(skips))


# ------------------------------------------------------------------ packed (config.data.packing) --


def packed_train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                          data_parallel: int = 1, skips: bucketed.SkipLog | None = None):
  """Infinite, checkpointable iterator of per-process packed batches (data_pipelines/packing.py).

  The clip stream is train_iterator's (shapes data, or the bucketed user-data batches split into
  clips); each process packs its own clips into config.batch_size // process_count sequences.
  """
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the'
                     f' {process_count} processes.')
  if uses_user_data(config):
    clips = packing.unbatch(
        _user_data_dataset(config, process_index, process_count, data_parallel, skips))
  else:
    clips = grain.MapDataset.source(ProcessRows(source(config, 'train', config.seed),
                                                config.batch_size, process_index, process_count))
    clips = clips.map(ToModelInputs(tokenizers.Tokenizer(config)))
    clips = _prefetch(clips.to_iter_dataset(_read_options(config, 1)), config)
  d = config.data
  ds = packing.pack_dataset(
      clips, patch_size=tuple(config.model.patch_size), seq_len=packing.sequence_length(config),
      max_segments=d.packing_segments, batch_size=config.batch_size // process_count,
      max_length=config.text.max_length, num_bins=d.packing_bins, seed=config.seed)
  return iter(ds)


def eval_batches(config, split: str, num_videos: int, batch_size: int, seed_offset: int = 1000):
  """A fixed, finite list of batches from a seed disjoint from training's; video float32 in
  [-1, 1] (small and numpy-side: what evaluation, previews and latent statistics compute on)."""
  ds = grain.MapDataset.source(source(config, split, config.seed + seed_offset))[:num_videos]
  ds = ds.map(ToModelInputs(tokenizers.Tokenizer(config))).batch(batch_size, drop_remainder=True)
  return [dict(ds[i], video=to_float(ds[i]['video'])) for i in range(len(ds))]


def to_float(video: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1] on the host (evaluation; training does it on device)."""
  return video.astype(np.float32) / 127.5 - 1.0

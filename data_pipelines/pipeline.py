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

from data_pipelines import bucketed, packing, records, shapes
from data_pipelines import buckets as buckets_lib
from sora_jax.models import text


class ToModelInputs(grain.transforms.Map):
  """uint8 video -> float32 in [-1, 1]; caption -> byte tokens and mask."""

  def __init__(self, max_length: int):
    self.max_length = max_length

  def map(self, record):
    tokens, mask = text.tokenize([record['caption']], self.max_length)
    return {
        'video': record['video'].astype(np.float32) / 127.5 - 1.0,
        'tokens': tokens[0],
        'mask': mask[0],
    }


def source(config, split: str, seed: int):
  d = config.data
  return shapes.ShapesSource(num_frames=d.num_frames, height=d.height, width=d.width, split=split,
                             seed=seed)


def uses_user_data(config) -> bool:
  return bool(config.data.manifest or config.data.prepared or config.data.tfds_name)


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
  ds = grain.MapDataset.source(source(config, 'train', config.seed))
  ds = ds[process_index::process_count].map(ToModelInputs(config.text.max_length))
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


def user_examples(config, table, skips: bucketed.SkipLog):
  """(examples, load_fn) of the configured user data source."""
  d = config.data
  if d.manifest:
    examples = bucketed.index_manifest(d.manifest, table, fps=d.fps, skips=skips,
                                       num_threads=d.probe_threads)
    return examples, functools.partial(bucketed.decode_file, fps=d.fps, random_crop=d.random_crop)
  if d.prepared:
    return prepared_examples(d.prepared, table, skips, d.fps)
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


def prepared_examples(folder: str, table, skips: bucketed.SkipLog, config_fps: float):
  """Examples of shards written by data_pipelines.prepare; their buckets must be the config's."""
  with open(os.path.join(folder, 'index.json')) as f:
    index = json.load(f)
  shapes_here = [tuple(s) for s in index['buckets']]
  wanted = [b.shape for b in table]
  if shapes_here != wanted:
    raise ValueError(f'config.data.prepared={folder!r} was prepared for buckets {shapes_here}, but'
                     f' the config has {wanted} (config.data.buckets / num_frames, height, width).')
  if abs(index['fps'] - config_fps) > 1e-6:
    raise ValueError(f'config.data.prepared={folder!r} was prepared at {index["fps"]} fps, but'
                     f' config.data.fps={config_fps}.')
  skips.seen += index['num_rows']
  for path, reason in index['skipped']:
    skips.skipped.append((path, reason))
  source = records.data_source([os.path.join(folder, s) for s in index['shards']])
  examples = [bucketed.Example(path, '', bucket, record=i)
              for i, (path, bucket) in enumerate(zip(index['paths'], index['record_buckets']))]
  return examples, functools.partial(_load_record, source)


def _load_record(source, example, bucket, rng):
  del rng  # prepared clips are already cut and cropped
  record = records.decode(source[example.record])
  video = record['video']
  if video.shape != (*bucket.shape, 3):
    raise ValueError(f'Prepared record {example.record} ({example.path}) has shape {video.shape},'
                     f' expected {(*bucket.shape, 3)}.')
  return video, record['caption']


def _user_data_iterator(config, process_index, process_count, data_parallel, skips):
  return iter(_user_data_dataset(config, process_index, process_count, data_parallel, skips))


def _user_data_dataset(config, process_index, process_count, data_parallel, skips):
  table = buckets_lib.make(config, bucketed.batch_multiple(config, process_count, data_parallel))
  skips = skips if skips is not None else bucketed.SkipLog(config.data.max_skip_fraction)
  examples, load_fn = user_examples(config, table, skips)
  plan = bucketed.BatchPlan([e.bucket for e in examples], table, config.seed)
  logging.info('Buckets (frames, height, width: global batch, examples): %s; %d batches per epoch.',
               [(b.shape, b.batch_size, sum(e.bucket == i for e in examples))
                for i, b in enumerate(table)], plan.per_epoch)
  ds = grain.MapDataset.source(plan).map(bucketed.LoadBatch(
      examples, table, load_fn=load_fn, seed=config.seed, max_length=config.text.max_length,
      process_index=process_index, process_count=process_count))
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
    clips = grain.MapDataset.source(source(config, 'train', config.seed))
    clips = clips[process_index::process_count].map(ToModelInputs(config.text.max_length))
    clips = _prefetch(clips.to_iter_dataset(_read_options(config, 1)), config)
  d = config.data
  ds = packing.pack_dataset(
      clips, patch_size=tuple(config.model.patch_size), seq_len=packing.sequence_length(config),
      max_segments=d.packing_segments, batch_size=config.batch_size // process_count,
      max_length=config.text.max_length, num_bins=d.packing_bins, seed=config.seed)
  return iter(ds)


def eval_batches(config, split: str, num_videos: int, batch_size: int, seed_offset: int = 1000):
  """A fixed, finite list of batches from a seed disjoint from training's."""
  ds = grain.MapDataset.source(source(config, split, config.seed + seed_offset))[:num_videos]
  ds = ds.map(ToModelInputs(config.text.max_length)).batch(batch_size, drop_remainder=True)
  return [ds[i] for i in range(len(ds))]

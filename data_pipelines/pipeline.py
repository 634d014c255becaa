"""Grain input pipelines for training and evaluation.

Global order is fixed by the seed alone: global batch s holds records [s*B, (s+1)*B) and each process
reads its strided slice, so the data seen per step does not depend on the number of processes.
"""

import grain
import numpy as np

from data_pipelines import shapes
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


def train_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """Infinite, checkpointable iterator of per-process batches (grain.DatasetIterator)."""
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the'
                     f' {process_count} processes.')
  # Records are i.i.d. draws keyed by index, so index order is already a shuffle.
  ds = grain.MapDataset.source(source(config, 'train', config.seed))
  ds = ds[process_index::process_count].map(ToModelInputs(config.text.max_length))
  ds = ds.to_iter_dataset().batch(config.batch_size // process_count, drop_remainder=True)
  if config.data.worker_count > 0:
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=config.data.worker_count,
        per_worker_buffer_size=config.data.prefetch_buffer_size))
  return iter(ds)


def eval_batches(config, split: str, num_videos: int, batch_size: int, seed_offset: int = 1000):
  """A fixed, finite list of batches from a seed disjoint from training's."""
  ds = grain.MapDataset.source(source(config, split, config.seed + seed_offset))[:num_videos]
  ds = ds.map(ToModelInputs(config.text.max_length)).batch(batch_size, drop_remainder=True)
  return [ds[i] for i in range(len(ds))]

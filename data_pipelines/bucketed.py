"""Bucketed batches from user data (a manifest, prepared ArrayRecord shards or a TFDS dataset).

Design, chosen for exact resume and process-count independence:
  1. Index: every example gets its bucket up front (a manifest is probed once, in threads; prepared
     shards and TFDS datasets store it). Bad examples are skipped here, counted by reason and logged.
  2. Plan: a pure function of (seed, epoch) shuffles the examples, groups them by bucket into global
     batches of the bucket's batch size and shuffles the batches. Element i of the plan is global batch
     i, so the whole data order depends only on the seed, and a Grain iterator's state is one integer.
     Every row trains every epoch, however few a bucket holds: a bucket's last batch is topped up
     with its own rows again (BatchPlan says why this policy).
  3. Load: each process decodes only its own rows of global batch i (random clip start and crop drawn
     from (seed, i, example, slot in the batch)), so `jax.make_array_from_process_local_data` assembles the global batch.
     An example that fails to decode here is replaced by another of the same bucket, counted and logged,
     so every batch keeps its static shape and no step is lost.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math

import grain
import numpy as np
from absl import logging

from data_pipelines import manifest as manifest_lib
from data_pipelines import video_decode
from sora_jax.common import tokenizers
from sora_jax.config import buckets as buckets_lib

_FALLBACK_TRIES = 8  # replacements tried for an example that fails to decode
_EPOCHS = 10**6  # the plan is "infinite": this many epochs


@dataclasses.dataclass(frozen=True)
class Example:
  path: str
  caption: str
  bucket: int
  start: float = 0.0  # usable window of a video, in seconds
  end: float = 0.0
  record: int = -1  # index into prepared shards / a TFDS split; -1 for decoded-on-the-fly files


class TooManySkips(ValueError):
  """More than config.data.max_skip_fraction of the examples were skipped: the data, not the code,
  is at fault (data_pipelines.inspect reports it instead of failing with a traceback)."""


class SkipLog:
  """Skipped examples by reason, with their paths; fails the run past `max_fraction`. Also the rest
  of a run's data bookkeeping: the paths decoded and, once indexed, the usable rows per bucket."""

  def __init__(self, max_fraction: float):
    self.max_fraction = max_fraction
    self.skipped: list[tuple[str, str]] = []
    self.seen = 0
    self.sources = collections.Counter()  # paths that produced an example (decode time)
    self.bucket_rows: list[int] | None = None  # examples per bucket of the table (BatchPlan)

  @property
  def counts(self) -> collections.Counter:
    return collections.Counter(reason for _, reason in self.skipped)

  def add(self, path: str, reason: str):
    self.skipped.append((path, reason))
    logging.warning('Skipping %s: %s', path, reason)

  def check(self, stage: str):
    if self.seen and len(self.skipped) / self.seen > self.max_fraction:
      raise TooManySkips(
          f'{stage}: {len(self.skipped)} of {self.seen} examples skipped'
          f' ({dict(self.counts)}), more than config.data.max_skip_fraction={self.max_fraction}.'
          f' First skipped: {self.skipped[:5]}')


# ---------------------------------------------------------------------------------------- index --


def index_manifest(path: str, table: list[buckets_lib.Bucket], *, fps: float, skips: SkipLog,
                   num_threads: int = 8) -> list[Example]:
  """Probes every row of a manifest (in threads: FFmpeg releases the GIL) and assigns buckets."""
  rows = list(manifest_lib.read_manifest(path))
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = list(pool.map(functools.partial(_index_row, table=table, fps=fps), rows))
  examples = []
  for row, result in zip(rows, results):
    skips.seen += 1
    if isinstance(result, str):
      skips.add(row.where, result)
    else:
      examples.append(result)
  logging.info('Indexed %s: %d examples, %d skipped %s.', path, len(examples), len(skips.skipped),
               dict(skips.counts))
  # Before the check: a report on data with too many skips still shows what the rest would train.
  skips.bucket_rows = np.bincount([e.bucket for e in examples], minlength=len(table)).tolist()
  skips.check(f'Manifest {path}')
  return examples


def _index_row(row: manifest_lib.Row, *, table, fps) -> Example | str:
  """The row's Example, or its skip reason."""
  if row.error:
    return row.error
  if not isinstance(row.caption, str):
    return 'caption_not_str'
  if not row.caption.strip():
    return 'empty_caption'
  try:
    info = video_decode.probe(row.path)
  except video_decode.DecodeError as e:
    return e.reason
  end = info.duration if row.end is None else min(row.end, info.duration)
  bucket = buckets_lib.choose(table, is_image=info.is_image, width=info.width, height=info.height,
                              seconds=end - row.start, fps=fps)
  if bucket is None:
    return 'no_image_bucket' if info.is_image else 'too_short'
  return Example(row.path, row.caption, bucket, row.start, end)


# ----------------------------------------------------------------------------------------- plan --


class BatchPlan:
  """Random-access source of global batch plans: element i = {'index', 'bucket', 'ids'}.

  Small buckets: a bucket of n examples and batch B gets ceil(n / B) batches an epoch, the last one
  topped up by wrapping around the bucket's own (shuffled) rows, so every row trains every epoch,
  even in a bucket holding fewer rows than one batch (a fine-tuning set's few photos, next to a
  token budget's batch of 96 images). Not smaller batches: batch sizes come from the config alone
  (config/buckets.py make) because every bucket's step is compiled before the data is read
  (training/steps.py BucketSteps), one program per shape. Not padding with a loss mask either: a
  repeat is not wasted, it draws its own clip start and crop (LoadBatch) and, in the step, its own
  timestep and noise; the cost is that a tiny bucket's rows weigh more per step than a full one's.
  """

  def __init__(self, example_buckets, table: list[buckets_lib.Bucket], seed: int):
    self.example_buckets = np.asarray(example_buckets, np.int64)
    self.batch_sizes = np.array([b.batch_size for b in table])
    self.seed = seed
    self.rows_per_bucket = np.bincount(self.example_buckets, minlength=len(table)).tolist()
    self.batches_per_bucket = [-(-n // size) for n, size in zip(self.rows_per_bucket,
                                                                 self.batch_sizes.tolist())]
    self.per_epoch = sum(self.batches_per_bucket)
    if not self.per_epoch:
      raise ValueError('No examples to train on: the data is empty, or every row was skipped (see'
                       ' the log of skipped rows).')

  def __len__(self):
    return self.per_epoch * _EPOCHS

  def __getitem__(self, i):
    epoch, j = divmod(int(i), self.per_epoch)
    bucket, ids = self._epoch(epoch)[j]
    return {'index': int(i), 'bucket': bucket, 'ids': ids}

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int):
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(len(self.example_buckets))
    plan = []
    for b, size in enumerate(self.batch_sizes):
      members = order[self.example_buckets[order] == b]
      n = -(-len(members) // size)
      filled = np.resize(members, n * size)  # cycles: the last batch repeats this epoch's first rows
      plan += [(b, filled[k * size:(k + 1) * size]) for k in range(n)]
    return [plan[k] for k in rng.permutation(len(plan))]


# ----------------------------------------------------------------------------------------- load --


class LoadBatch(grain.transforms.Map):
  """Plan -> this process's rows of the batch: video (uint8), tokens, mask; plus '_paths' and
  '_skipped' (path, reason) for the main process's bookkeeping (CountSkips).

  load_fn(example, bucket, rng) -> (clip, caption): clip is uint8 pixels [frames, height, width, 3],
  or float cached latents [t, h, w, C] (prepared with --cache_latents) which go to 'latents' as they
  are; caption is a str (tokenized by `tokenize`, default the byte tokenizer), or cached (embeddings
  [n, D], mask [n]) (--cache_text), which are padded with zero rows to max_length as
  'text_embeddings' [B, L, D] / 'text_mask' [B, L]. sora_jax.frozen.Frozen.encode_batch finishes both.
  """

  def __init__(self, examples: list[Example], table, *, load_fn, seed: int, max_length: int,
               tokenize=None, process_index: int = 0, process_count: int = 1):
    self.examples, self.table, self.load_fn = examples, table, load_fn
    self.seed, self.max_length = seed, max_length
    self.tokenize = tokenize or functools.partial(tokenizers.tokenize, max_length=max_length)
    self.process_index, self.process_count = process_index, process_count
    by_bucket = collections.defaultdict(list)
    for i, e in enumerate(examples):
      by_bucket[e.bucket].append(i)
    self.by_bucket = {b: np.array(ids) for b, ids in by_bucket.items()}

  def map(self, plan):
    bucket = self.table[plan['bucket']]
    n = bucket.batch_size // self.process_count
    first = self.process_index * n
    rows = plan['ids'][first:first + n]
    clips, captions, paths, skipped = [], [], [], []
    for slot, row in enumerate(rows, first):
      # Keyed by the global slot too: a row repeated in a batch (BatchPlan) gets its own clip and crop.
      rng = np.random.default_rng([self.seed, plan['index'], int(row), slot])
      clip, caption, path = self._load_or_replace(int(row), bucket, rng, skipped)
      clips.append(clip)
      captions.append(caption)
      paths.append(path)
    batch = {'_skipped': skipped, '_paths': paths}
    if len({clip.dtype == np.uint8 for clip in clips}) > 1:
      raise ValueError(f'Batch mixes pixel clips and cached latents ({paths}).')
    if clips[0].dtype == np.uint8:
      batch['video'] = np.stack(clips)  # uint8: the train step maps it to [-1, 1] on device
    else:
      batch['latents'] = np.stack(clips)
    if len({isinstance(c, str) for c in captions}) > 1:
      raise ValueError(f'Batch mixes captions and cached caption embeddings ({paths}).')
    if isinstance(captions[0], str):
      batch['tokens'], batch['mask'] = self.tokenize(captions)
    else:
      batch['text_embeddings'], batch['text_mask'] = pad_embeddings(captions, self.max_length,
                                                                    paths)
    return batch

  def _load_or_replace(self, row, bucket, rng, skipped):
    members = self.by_bucket[self.examples[row].bucket]
    for attempt in range(_FALLBACK_TRIES + 1):
      example = self.examples[row]
      try:
        return (*self.load_fn(example, bucket, rng), example.path)
      except video_decode.DecodeError as e:
        skipped.append((example.path, e.reason))
      row = int(members[rng.integers(len(members))])  # a deterministic stand-in, same bucket
    raise ValueError(f'{_FALLBACK_TRIES + 1} examples of bucket {bucket.shape} in a row failed to'
                     f' decode; last: {skipped[-1]}. Is the data readable?')


def pad_embeddings(captions, max_length: int, paths=None):
  """[(embeddings [n_i, D], mask [n_i])] -> (embeddings [B, max_length, D], mask [B, max_length]):
  prepare stores the rows up to a caption's last real token only; the rest are zeros / False."""
  width, dtype = captions[0][0].shape[-1], captions[0][0].dtype
  embeddings = np.zeros((len(captions), max_length, width), dtype)
  mask = np.zeros((len(captions), max_length), bool)
  for i, (e, m) in enumerate(captions):
    if len(e) > max_length or e.shape[-1] != width:
      where = f' ({paths[i]})' if paths else ''
      raise ValueError(f'Cached caption embeddings {list(e.shape)}{where} do not fit'
                       f' config.text.max_length={max_length} x width {width}.')
    embeddings[i, :len(e)], mask[i, :len(m)] = e, m
  return embeddings, mask


def decode_file(example: Example, bucket, rng, *, fps: float, random_crop: bool):
  """(video, caption) of a manifest example: a random clip of the bucket's length at `fps`, resized
  and cropped to the bucket."""
  if bucket.is_image:
    start = 0.0
  else:
    slack = max(0.0, example.end - example.start - bucket.frames / fps)
    start = example.start + rng.uniform(0.0, slack)
  crop = tuple(rng.uniform(0.0, 1.0, 2)) if random_crop else (0.5, 0.5)
  video = video_decode.decode_clip(example.path, start=start, num_frames=bucket.frames, fps=fps,
                                   size=(bucket.height, bucket.width), crop=crop)
  return video, example.caption


class CountSkips(grain.transforms.Map):
  """Main-process bookkeeping: moves each batch's decode-time skips into the run's SkipLog."""

  def __init__(self, skips: SkipLog):
    self.skips = skips

  def map(self, batch):
    batch = dict(batch)
    skipped = batch.pop('_skipped')
    for path, reason in skipped:
      self.skips.add(path, reason)
    paths = batch.pop('_paths')
    self.skips.sources.update(paths)
    self.skips.seen += len(paths) + len(skipped)
    self.skips.check('Decoding')
    return batch


def batch_multiple(config, process_count: int, data_parallel: int) -> int:
  return math.lcm(process_count, data_parallel)

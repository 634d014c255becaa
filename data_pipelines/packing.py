"""Sequence packing (NaViT-style): several clips of any duration and resolution in one token sequence.

Which mode each config uses:
  * base_config() and configs/demo.py: bucketed, not packed (config.data.packing = False). One clip per
    batch row; batches are grouped by clip shape (bucketed.py for user data, one shape for the shapes
    data), so every clip of a batch has the same token count.
  * config.data.packing = True: packed. pipeline.train_iterator packs the same clip stream (the shapes
    data, or the bucketed pipeline's per-process rows split into clips) into config.batch_size
    sequences of config.data.packing_length tokens per step, at most config.data.packing_segments clips
    each. Each clip attends only to itself, so variable durations and resolutions train together with
    little padding instead of one compiled shape per bucket.

A packed sequence holds, with N = packing_length, S = packing_segments, P = patch_dim, L = text length:
  'patches'      [N, P]          clean patch tokens (dit.patchify order within each clip), 0 at padding:
                                 the clips' dtype, uint8 pixels from the pipelines (the train step maps
                                 real tokens to [-1, 1] on device), or floats in [-1, 1]
  'positions'    int32 [N, 3]    (t, h, w) patch coordinates of each token within its own clip
  'segment_ids'  int32 [N]       0 = padding, k = the k-th clip of the sequence (1..S); a clip's tokens
                                 are contiguous
  'tokens', 'mask' [S, L]        caption (byte tokens, validity) of clip k in slot k - 1; empty slots hold
                                 the empty caption, so no caption mask is all False
A batch stacks these on a leading axis. models.TextToVideo.packed and train.make_train_step read them.

Why this lives in data_pipelines: packing is host-side numpy that runs in the input pipeline (and in
Grain workers); the model only consumes its arrays. Token order and coordinates come from dit.patchify's
convention (checked against rope.grid_positions by the tests), so data and model cannot drift apart.

The streaming transform (`pack_dataset`) is Grain's own FirstFitPackIterDataset: it packs N-D per-token
features (patches [n, P] and coordinates [n, 3] are sequence features of length n; a caption is a
[1, L] feature in a sequence of S slots, so max_sequences_per_bin = S keeps slots and segments aligned).
Its iterator state is the parent's state at the last emitted group plus the row within it, so resume is
exact: restoring replays the parent from that state and re-packs deterministically.

In packed mode each process packs its own rows, so a global batch depends on the process count (the
bucketed mode does not have this property to lose: there the global batch is fixed by the seed alone).
"""

from __future__ import annotations

import math

import grain
import numpy as np

from sora_jax.common import spacetime, tokenizers
from sora_jax.config import buckets as buckets_lib


def sequence_length(config) -> int:
  """Tokens per packed sequence: config.data.packing_length, or (0) the largest bucket's tokens."""
  if config.data.packing_length:
    return int(config.data.packing_length)
  patch = tuple(config.model.patch_size)
  return max(buckets_lib.tokens(s, patch) for s in buckets_lib.shapes(config))


def clip_positions(grid) -> np.ndarray:
  """[T*H*W, 3] int32 (t, h, w) patch coordinates in dit.patchify's (row-major) token order."""
  coords = np.meshgrid(*(np.arange(n) for n in grid), indexing='ij')
  return np.stack([c.ravel() for c in coords], axis=-1).astype(np.int32)


def patchify_clip(video, patch_size):
  """[T, H, W, C] -> (patch tokens [n, P], positions [n, 3] int32)."""
  patches, grid = spacetime.patchify(np.asarray(video)[None], tuple(patch_size))
  return patches[0], clip_positions(grid)


# ------------------------------------------------------------------------------ pure helpers --


def pack(clips, patch_size, seq_len: int, max_segments: int, tokens=None, mask=None) -> dict:
  """First-fit greedy packing of clips [T, H, W, C] into as few sequences as it takes.

  Each clip goes, in order, into the first sequence with room for its tokens and a free segment slot,
  else into a new one. Returns numpy arrays with a leading sequence axis K: 'patches' [K, seq_len, P],
  'positions' [K, seq_len, 3], 'segment_ids' [K, seq_len], 'clip_index' [K, max_segments] (-1: empty
  slot); with caption `tokens` / `mask` [num_clips, L] also 'tokens' / 'mask' [K, max_segments, L]
  (empty slots: the empty caption).
  """
  rows, used = [], []  # per sequence: [(clip index, patches, positions)], tokens used
  for i, clip in enumerate(clips):
    patches, positions = patchify_clip(clip, patch_size)
    n = len(patches)
    if n > seq_len:
      raise ValueError(f'Clip {i} of shape {np.shape(clip)} has {n} tokens > seq_len={seq_len}.')
    for r in range(len(rows)):
      if used[r] + n <= seq_len and len(rows[r]) < max_segments:
        break
    else:
      rows.append([])
      used.append(0)
      r = len(rows) - 1
    rows[r].append((i, patches, positions))
    used[r] += n
  patch_dim = math.prod(patch_size) * (np.shape(clips[0])[-1] if len(clips) else 0)
  dtype = np.asarray(clips[0]).dtype if len(clips) else np.float32
  k = len(rows)
  out = {
      'patches': np.zeros((k, seq_len, patch_dim), dtype),
      'positions': np.zeros((k, seq_len, 3), np.int32),
      'segment_ids': np.zeros((k, seq_len), np.int32),
      'clip_index': np.full((k, max_segments), -1, np.int32),
  }
  for r, row in enumerate(rows):
    start = 0
    for j, (i, patches, positions) in enumerate(row):
      end = start + len(patches)
      out['patches'][r, start:end] = patches
      out['positions'][r, start:end] = positions
      out['segment_ids'][r, start:end] = j + 1
      out['clip_index'][r, j] = i
      start = end
  if tokens is not None:
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    null_tokens, null_mask = tokenizers.tokenize([''], tokens.shape[-1])
    slot = out['clip_index'][..., None] >= 0
    index = np.maximum(out['clip_index'], 0)
    out['tokens'] = np.where(slot, tokens[index], null_tokens[0]).astype(np.int32)
    out['mask'] = np.where(slot, mask[index], null_mask[0])
  return out


def unpack(packed: dict, patch_size) -> list[np.ndarray]:
  """Clips [T, H, W, C] back from packed 'patches', 'positions', 'segment_ids' [K, N, ...].

  Works on pack()'s output (clips come back in their original order, via 'clip_index') and on packed
  batches (no 'clip_index': sequence by sequence, segment by segment). Each clip's grid is read from its
  tokens' positions.
  """
  patches, positions = np.asarray(packed['patches']), np.asarray(packed['positions'])
  segment_ids = np.asarray(packed['segment_ids'])
  channels = patches.shape[-1] // math.prod(patch_size)
  clips = {}
  for r in range(len(segment_ids)):
    for s in range(1, int(segment_ids[r].max(initial=0)) + 1):
      sel = segment_ids[r] == s
      if not sel.any():
        continue
      grid = tuple(int(g) for g in positions[r][sel].max(0) + 1)
      clip = spacetime.unpatchify(patches[r][sel][None], grid, tuple(patch_size), channels)[0]
      key = int(packed['clip_index'][r, s - 1]) if 'clip_index' in packed else len(clips)
      clips[key] = clip
  return [clips[k] for k in sorted(clips)]


# ----------------------------------------------------------------------- Grain transform --


class Unbatch(grain.experimental.FlatMapTransform):
  """A batch {'video', 'tokens', 'mask'} (e.g. a bucketed pipeline batch) -> its single clips."""

  max_fan_out = 1 << 16

  def flat_map(self, batch):
    return [{k: batch[k][i] for k in ('video', 'tokens', 'mask')}
            for i in range(len(batch['video']))]


class PatchifyClip(grain.transforms.Map):
  """{'video' [T, H, W, C], 'tokens' [L], 'mask' [L]} -> packable features (leading axis: length)."""

  def __init__(self, patch_size):
    self.patch_size = tuple(patch_size)

  def map(self, example):
    patches, positions = patchify_clip(example['video'], self.patch_size)
    return {
        'patches': patches,  # the clip's dtype: uint8 pixels stay uint8 (update.model_inputs)
        'coords': positions,
        'caption': np.asarray(example['tokens'], np.int32)[None],
        'caption_mask': np.asarray(example['mask'], bool)[None],
    }


class FinishPacked(grain.transforms.Map):
  """Grain's packed row -> the packed format above (empty caption slots get the empty caption)."""

  def __init__(self, max_length: int):
    self.null_tokens, self.null_mask = tokenizers.tokenize([''], max_length)

  def map(self, row):
    empty = row['caption_segment_ids'] == 0
    used = int((~empty).sum())
    # Caption slot k - 1 belongs to segment k: both are numbered by insertion order in the bin.
    assert np.array_equal(row['caption_segment_ids'][:used], np.arange(1, used + 1)), row
    return {
        'patches': row['patches'],
        'positions': row['coords'],
        'segment_ids': row['patches_segment_ids'].astype(np.int32),
        'tokens': np.where(empty[:, None], self.null_tokens, row['caption']).astype(np.int32),
        'mask': np.where(empty[:, None], self.null_mask, row['caption_mask']),
    }


def pack_dataset(clips: grain.IterDataset, *, patch_size, seq_len: int, max_segments: int,
                 batch_size: int, max_length: int, num_bins: int = 0,
                 seed: int = 0) -> grain.IterDataset:
  """A stream of single clips {'video', 'tokens', 'mask'} -> packed batches of static shape.

  First-fit over `num_bins` sequences at a time (0: batch_size): clips fill the first sequence with
  room; the first clip that fits none closes the group, whose sequences are emitted (in a seeded
  shuffled order) and batched by `batch_size`. More bins: less padding, more clips in flight.
  Checkpointable with the usual grain.DatasetIterator get_state / set_state.
  """
  ds = clips.map(PatchifyClip(patch_size))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={'patches': seq_len, 'coords': seq_len, 'caption': max_segments,
                         'caption_mask': max_segments},
      num_packing_bins=num_bins or batch_size, seed=seed, shuffle_bins=True,
      max_sequences_per_bin=max_segments)
  return ds.map(FinishPacked(max_length)).batch(batch_size, drop_remainder=True)


def unbatch(ds: grain.IterDataset) -> grain.IterDataset:
  return grain.experimental.FlatMapIterDataset(ds, Unbatch())

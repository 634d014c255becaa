"""Sequence packing: helpers, the packed model path against the unpacked one, the packed train step and
the Grain transform (static shapes, exact resume)."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import packing, pipeline
from sora_jax.common import spacetime, tokenizers
from sora_jax.config import geometry, validation
from sora_jax.diffusion import flow
from sora_jax.models import rope
from sora_jax.parallel import sharding
from sora_jax.training import factory
from sora_jax.training import state as state_lib
from sora_jax.training import update

PATCH = (2, 4, 4)
CAPTIONS = ['a red circle moving left', 'a blue square moving up', 'a green triangle', 'white']


def _clips(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(*s, 3)).astype(np.float32) for s in shapes]


def _perturb(params):
  """Zero-initialised (adaLN-zero) outputs would hide bugs: give every param a random value."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


def _perturbed(config):
  graphdef, params = nnx.split(factory.build(config, nnx.Rngs(0)), nnx.Param)
  return graphdef, _perturb(params)


def _fns(graphdef):
  unpacked = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  packed = jax.jit(lambda p, *a: nnx.merge(graphdef, p).packed(*a))
  return unpacked, packed


# ------------------------------------------------------------------------------- helpers --


def test_pack_unpack_round_trip_and_first_fit():
  shapes = [(4, 16, 16), (2, 8, 8), (6, 8, 16), (2, 16, 8), (4, 8, 8), (2, 4, 4)]
  clips = _clips(shapes)  # tokens: 32, 4, 24, 8, 8, 1
  tokens, mask = tokenizers.tokenize(CAPTIONS + ['x', 'y'], 40)
  packed = packing.pack(clips, PATCH, seq_len=40, max_segments=3, tokens=tokens, mask=mask)
  # First fit, in order: [32, 4, +1 (3 slots full)], [24, 8, 8], and the 1-token clip went to row 0.
  np.testing.assert_array_equal(packed['clip_index'], [[0, 1, 5], [2, 3, 4]])
  assert packed['patches'].shape == (2, 40, 96) and packed['positions'].shape == (2, 40, 3)
  np.testing.assert_array_equal(packed['segment_ids'][0], [1] * 32 + [2] * 4 + [3] + [0] * 3)
  np.testing.assert_array_equal(packed['patches'][0, 37:], 0)
  for got, want in zip(packing.unpack(packed, PATCH), clips):
    np.testing.assert_array_equal(got, want)
  # Captions follow their clips; positions are each clip's own grid, in dit.patchify order.
  np.testing.assert_array_equal(packed['tokens'][1, 0], tokens[2])
  np.testing.assert_array_equal(packed['positions'][1, :24], rope.grid_positions((3, 2, 4)))
  patches, _ = spacetime.patchify(clips[2][None], PATCH)
  np.testing.assert_array_equal(packed['patches'][1, :24], patches[0])
  # Empty slots hold the empty caption (never an all-False mask).
  sparse = packing.pack(clips[:1], PATCH, seq_len=40, max_segments=3, tokens=tokens, mask=mask)
  null_tokens, _ = tokenizers.tokenize([''], 40)
  np.testing.assert_array_equal(sparse['tokens'][0, 1:], np.repeat(null_tokens, 2, 0))
  assert sparse['mask'].any(-1).all()
  with pytest.raises(ValueError, match='tokens > seq_len'):
    packing.pack(clips, PATCH, seq_len=16, max_segments=3)


def test_rope_explicit_positions_match_grid():
  grid = (3, 2, 5)
  np.testing.assert_array_equal(packing.clip_positions(grid), rope.grid_positions(grid))
  positions = jnp.stack([rope.grid_positions(grid), rope.grid_positions(grid)[::-1]])
  cos, sin = rope.frequencies(positions, 24, 256.0)
  ref_cos, ref_sin = rope.frequencies(positions[1], 24, 256.0)
  np.testing.assert_array_equal(cos[1], ref_cos)
  np.testing.assert_array_equal(sin[1], ref_sin)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 30, 2, 24))
  np.testing.assert_array_equal(rope.apply(x, cos, sin)[1], rope.apply(x[1:], ref_cos, ref_sin)[0])


# --------------------------------------------------------------------------------- model --


def _packed_inputs(config, clips, captions, t):
  tokens, mask = tokenizers.tokenize(captions, config.text.max_length)
  p = packing.pack(clips, PATCH, seq_len=64, max_segments=3, tokens=tokens, mask=mask)
  assert len(p['segment_ids']) == 1  # one sequence
  return p, jnp.asarray([t + [0.5] * (3 - len(t))])


@pytest.mark.parametrize('prediction', ['velocity', 'x0'])
def test_packed_clips_match_each_clip_alone(config, prediction):
  config.diffusion.prediction = prediction
  graphdef, params = _perturbed(config)
  unpacked, packed = _fns(graphdef)
  a, b = _clips([(4, 16, 16), (2, 8, 24)], seed=1)  # 32 and 12 tokens, different grids
  t_a, t_b = 0.3, 0.8
  tokens, mask = tokenizers.tokenize(CAPTIONS[:2], config.text.max_length)
  alone = [spacetime.patchify(unpacked(params, clip[None], jnp.array([t]), tokens[i:i + 1],
                                 mask[i:i + 1]), PATCH)[0][0]
           for i, (clip, t) in enumerate(((a, t_a), (b, t_b)))]
  assert float(jnp.abs(alone[0]).max()) > 0.1  # a non-trivial output
  for order in ((0, 1), (1, 0)):  # either clip first
    clips, captions = [(a, b)[i] for i in order], [CAPTIONS[i] for i in order]
    p, t = _packed_inputs(config, clips, captions, [(t_a, t_b)[i] for i in order])
    out = packed(params, p['patches'], p['positions'], p['segment_ids'], t, p['tokens'], p['mask'])
    assert out.shape == p['patches'].shape
    for segment, i in enumerate(order, start=1):
      np.testing.assert_allclose(out[0][p['segment_ids'][0] == segment], alone[i], atol=1e-5)


def test_padding_and_empty_slots_change_nothing(config):
  graphdef, params = _perturbed(config)
  _, packed = _fns(graphdef)
  p, t = _packed_inputs(config, _clips([(4, 16, 16), (2, 8, 8)], seed=2), CAPTIONS[:2], [0.3, 0.6])
  args = lambda p, t: (p['patches'], p['positions'], p['segment_ids'], t, p['tokens'], p['mask'])
  ref = packed(params, *args(p, t))
  pad = p['segment_ids'] == 0
  assert pad.sum() == 28
  other = dict(p)
  other['patches'] = np.where(pad[..., None], 7.0, p['patches']).astype(np.float32)
  other['positions'] = np.where(pad[..., None], 5, p['positions']).astype(np.int32)
  other_tokens, other_mask = tokenizers.tokenize(['something else entirely'], config.text.max_length)
  other['tokens'] = p['tokens'].copy()
  other['mask'] = p['mask'].copy()
  other['tokens'][0, 2], other['mask'][0, 2] = other_tokens[0], other_mask[0]  # the unused slot
  out = packed(params, *args(other, t.at[0, 2].set(0.05)))
  np.testing.assert_allclose(out[~pad], ref[~pad], atol=1e-6)
  assert bool(jnp.isfinite(out).all())


# ---------------------------------------------------------------------------- train step --


def _packed_batch(config):
  """Two sequences of 64 tokens: [32 + 12 + 8 tokens], [24 + 32 tokens] (one empty slot)."""
  clips = _clips([(4, 16, 16), (2, 8, 24), (2, 16, 8), (6, 8, 16), (4, 16, 16)], seed=3)
  tokens, mask = tokenizers.tokenize(CAPTIONS + ['black'], config.text.max_length)
  p = packing.pack(clips, PATCH, seq_len=64, max_segments=3, tokens=tokens, mask=mask)
  np.testing.assert_array_equal(p['clip_index'], [[0, 1, 2], [3, 4, -1]])
  return p, clips, tokens, mask


def test_packed_train_step_loss_is_mean_token_loss_of_clips_alone(config):
  config.diffusion.prediction = 'x0'
  config.text.dropout_prob = 0.5
  config.seed = 2  # its dropout draw drops some of the segments, not all
  mesh = sharding.make_mesh(geometry.resolve_mesh_shape(config, 1), jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, _ = state_lib.init(config, mesh)
  state['params'] = _perturb(state['params'])
  p, clips, tokens, mask = _packed_batch(config)
  batch = {k: p[k] for k in ('patches', 'positions', 'segment_ids', 'tokens', 'mask')}
  step = jax.jit(update.make_train_step(graphdef, config, tx, schedule))
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['grad_norm'])) and float(metrics['grad_norm']) > 0
  assert int(new_state['step']) == 1

  # The same draws as the step: one t and caption dropout per segment slot, one noise per token.
  _, t_rng, noise_rng, drop_rng = jax.random.split(state['rng'], 4)
  drop = np.asarray(jax.random.bernoulli(drop_rng, 0.5, (2, 3, 1)))[..., 0]
  real_drops = [bool(drop[r, s]) for r in range(2) for s in range(3) if p['clip_index'][r, s] >= 0]
  assert any(real_drops) and not all(real_drops)  # both cases occur with this seed
  null_tokens, null_mask = tokenizers.tokenize([''], config.text.max_length)
  d = config.diffusion
  t = flow.sample_timesteps(t_rng, 2 * 3, logit_mean=d.logit_mean, logit_std=d.logit_std,
                            shift=1.0).reshape(2, 3)  # unshifted
  # Each segment's shift is the sampler's for its own clip shape (token count).
  shifts = [[geometry.timestep_shift(config, clips[i].shape[:3]) if i >= 0 else 1.0
             for i in row] for row in p['clip_index']]
  assert len({s for row in shifts for s in row}) > 2  # the clips' sizes differ
  t = flow.shift_timesteps(t, np.asarray(shifts, np.float32))
  noise = np.asarray(jax.random.normal(noise_rng, p['patches'].shape))
  unpacked, _ = _fns(graphdef)
  errors = []
  for r in range(2):
    for s, i in enumerate(p['clip_index'][r]):
      if i < 0:
        continue
      sel = p['segment_ids'][r] == s + 1
      grid = tuple(int(g) for g in p['positions'][r][sel].max(0) + 1)
      clip_noise = spacetime.unpatchify(noise[r][sel][None], grid, PATCH, 3)
      x_t = flow.interpolate(clips[i][None], clip_noise, t[r, s:s + 1])
      caption = (null_tokens, null_mask) if drop[r, s] else (tokens[i:i + 1], mask[i:i + 1])
      v = unpacked(state['params'], x_t, t[r, s:s + 1], *caption)
      err = jnp.square(v - flow.velocity_target(clips[i][None], clip_noise))
      errors.append(spacetime.patchify(err, PATCH)[0][0].mean(-1))  # per token
  expected = float(jnp.concatenate(errors).mean())
  assert len(jnp.concatenate(errors)) == int((p['segment_ids'] > 0).sum()) == 108
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)


# ------------------------------------------------------------------------------ pipeline --


class _ListSource:
  """Clips of mixed shapes with distinct captions: {'video', 'tokens', 'mask'} by index."""

  shapes = [(4, 16, 16), (2, 8, 8), (2, 8, 24), (6, 8, 16), (2, 16, 8), (4, 8, 8), (2, 4, 4)]

  def __init__(self, n, max_length):
    self.n, self.max_length = n, max_length

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng(i)
    video = rng.uniform(-1, 1, (*self.shapes[i % len(self.shapes)], 3)).astype(np.float32)
    tokens, mask = tokenizers.tokenize([f'clip {i}'], self.max_length)
    return {'video': video, 'tokens': tokens[0], 'mask': mask[0]}


def test_pack_dataset_static_shapes_content_and_exact_resume():
  source = _ListSource(1000, 16)
  clips = grain.MapDataset.source(source).to_iter_dataset()
  ds = packing.pack_dataset(clips, patch_size=PATCH, seq_len=48, max_segments=3, batch_size=4,
                            max_length=16, num_bins=6, seed=1)
  it = iter(ds)
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  state = json.loads(json.dumps(state))  # what grain.checkpoint stores
  later = [next(it) for _ in range(5)]
  shapes = {k: (v.shape, v.dtype) for k, v in batches[0].items()}
  assert shapes == {'patches': ((4, 48, 96), np.float32), 'positions': ((4, 48, 3), np.int32),
                    'segment_ids': ((4, 48), np.int32), 'tokens': ((4, 3, 16), np.int32),
                    'mask': ((4, 3, 16), np.bool_)}
  for batch in batches + later:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == shapes
  # Every clip comes back intact, with its own caption, each exactly once.
  seen = []
  for batch in batches + later:
    for r in range(4):
      row = {k: v[r:r + 1] for k, v in batch.items()}
      for s, clip in enumerate(packing.unpack(row, PATCH)):
        caption = bytes(int(b) - tokenizers.BYTE_OFFSET for b in batch['tokens'][r, s, 1:]
                        if b >= tokenizers.BYTE_OFFSET).decode()
        i = int(caption.split()[1])
        np.testing.assert_array_equal(clip, source[i]['video'])
        seen.append(i)
  assert len(seen) == len(set(seen)) > 8 * 4
  assert (np.concatenate([b['segment_ids'] for b in batches]) > 0).mean() > 0.7  # little padding

  resumed = iter(ds)
  resumed.set_state(state)
  for want in later:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_packed_train_iterator_from_config(config):
  assert not config.data.packing  # off by default
  config.data.packing = True
  config.data.packing_length = 80  # two 4x16x16 clips (32 tokens each) per sequence
  config.batch_size = 4
  validation.validate(config, 1)
  it = pipeline.train_iterator(config)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  later = [next(it) for _ in range(2)]
  for batch in first + later:
    assert batch['patches'].shape == (4, 80, 96) and batch['tokens'].shape == (4, 4, 40)
    np.testing.assert_array_equal((batch['segment_ids'] > 0).sum(1), 64)
  resumed = pipeline.train_iterator(config)
  resumed.set_state(state)
  for want in later:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Two processes each pack their own half of the clips.
  half = next(pipeline.train_iterator(config, process_index=1, process_count=2))
  assert half['patches'].shape == (2, 80, 96)


@pytest.mark.parametrize('edit,message', [
    (lambda d: d.update(dict(packing=True, packing_length=16)), 'config.data.packing_length=16'),
    (lambda d: d.update(dict(packing_segments=0)), 'config.data.packing_segments'),
    (lambda d: d.update(dict(packing_bins=-1)), 'config.data.packing_bins'),
])
def test_invalid_packing_configs_name_the_key(config, edit, message):
  edit(config.data)
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    validation.validate(config, 1)

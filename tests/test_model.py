import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.common import spacetime, tokenizers
from sora_jax.models import layers, rope, text
from sora_jax.parallel import sharding
from sora_jax.training import factory


def test_patchify_round_trip():
  video = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8, 12, 3))
  tokens, grid = spacetime.patchify(video, (2, 4, 4))
  assert grid == (3, 2, 3) and tokens.shape == (2, 18, 2 * 4 * 4 * 3)
  np.testing.assert_array_equal(spacetime.unpatchify(tokens, grid, (2, 4, 4), 3), video)
  # token 0 holds exactly the first 2x4x4 spacetime block
  np.testing.assert_array_equal(tokens[0, 0], video[0, :2, :4, :4].reshape(-1))


def test_rope_preserves_norm_and_is_relative():
  head_dim = 24
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, head_dim))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, head_dim))

  def rotated(x, pos):
    cos, sin = rope.frequencies(jnp.array([pos]), head_dim, 256.0)
    return rope.apply(x, cos, sin)

  np.testing.assert_allclose(jnp.linalg.norm(rotated(q, (3, 5, 7))), jnp.linalg.norm(q), rtol=1e-5)
  # <R(p) q, R(r) k> depends only on p - r, along every axis
  dot = lambda p, r: float(jnp.sum(rotated(q, p) * rotated(k, r)))
  np.testing.assert_allclose(dot((1, 2, 3), (0, 0, 0)), dot((5, 9, 4), (4, 7, 1)), rtol=1e-4)
  assert abs(dot((1, 0, 0), (0, 0, 0)) - dot((0, 0, 0), (0, 0, 0))) > 1e-3
  np.testing.assert_allclose(rotated(q, (0, 0, 0)), q, rtol=1e-6)
  assert sum(rope.axis_dims(head_dim)) == head_dim
  assert rope.grid_positions((2, 3, 4)).shape == (24, 3)
  np.testing.assert_array_equal(rope.grid_positions((2, 3, 4))[5], [0, 1, 1])


def _model(config, **overrides):
  for k, v in overrides.items():
    config.model[k] = v
  return factory.build(config, nnx.Rngs(0))


def _inputs(config, b=2, frames=None, size=None):
  tokens, mask = tokenizers.tokenize(['a red circle moving left', ''][:b], config.text.max_length)
  shape = (b, frames or config.data.num_frames, size or config.data.height,
           size or config.data.width, 3)
  return jax.random.normal(jax.random.PRNGKey(2), shape), jnp.array([0.2, 0.9][:b]), tokens, mask


def _perturb(model):
  """Zero-initialised (adaLN-zero) outputs would hide bugs: give every param a random value."""
  graphdef, params = nnx.split(model)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  leaves = [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_dit_shapes_any_duration_and_resolution(config):
  model = _perturb(_model(config))
  for frames, size in ((4, 16), (8, 24), (2, 32)):
    x, t, tokens, mask = _inputs(config, frames=frames, size=size)
    out = model(x, t, tokens, mask)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_adaln_zero_starts_at_zero_and_text_conditions(config):
  x, t, tokens, mask = _inputs(config)
  assert float(jnp.abs(_model(config)(x, t, tokens, mask)).max()) == 0.0
  model = _perturb(_model(config))
  other, other_mask = tokenizers.tokenize(['a blue square moving up'] * 2, config.text.max_length)
  diff = jnp.abs(model(x, t, tokens, mask) - model(x, t, other, other_mask)).max()
  assert float(diff) > 1e-3


def test_scan_and_loop_and_remat_agree(config):
  x, t, tokens, mask = _inputs(config)
  ref = _perturb(_model(config.copy_and_resolve_references()))(x, t, tokens, mask)
  for overrides in ({'scan_layers': False}, {'remat': 'full'}, {'remat': 'dots'}):
    out = _perturb(_model(config.copy_and_resolve_references(), **overrides))(x, t, tokens, mask)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(config):
  model = _perturb(_model(config, dtype='bfloat16'))
  _, params = nnx.split(model, nnx.Param)
  assert {l.dtype for l in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  x, t, tokens, mask = _inputs(config)
  assert model(x, t, tokens, mask).dtype == jnp.float32


def test_tokenizer():
  tokens, mask = tokenizers.tokenize(['ab', ''], 6)
  np.testing.assert_array_equal(tokens[0], [tokenizers.BOS, 97 + 3, 98 + 3, tokenizers.EOS, 0, 0])
  np.testing.assert_array_equal(mask[1], [True, True, False, False, False, False])
  long, _ = tokenizers.tokenize(['x' * 100], 6)
  assert long[0, -1] == tokenizers.EOS


def test_word_hashes_name_whole_words():
  tokens, _ = tokenizers.tokenize(['a red circle moving left', 'the  red  square', 'redd re'], 32)
  words = np.asarray(text.word_hashes(tokens, 1 << 20))
  # Every byte of a word carries that word's bucket; spaces, BOS/EOS and padding carry -1.
  row = words[0]
  np.testing.assert_array_equal(row[[0, 2, 6]], -1)  # BOS, spaces
  assert len(set(row[3:6])) == 1 and row[3] >= 0  # 'red'
  # The same word gets the same bucket wherever it stands, whatever the spacing around it ...
  assert row[3] == words[1][6]
  # ... and different words (even prefixes of each other) get different ones.
  assert len({row[1], row[3], row[7], row[14], row[21], words[1][11], words[2][1], words[2][6]}) == 8
  assert (words[:, 26:] == -1).all()


def test_per_frame_times(config):
  model = _perturb(_model(config))
  x, t, tokens, mask = _inputs(config)
  pt = config.model.patch_size[0]
  frames = x.shape[1]
  same = model(x, t, tokens, mask)
  # A per-frame time equal for every frame is the per-clip time.
  np.testing.assert_allclose(model(x, jnp.repeat(t[:, None], frames, 1), tokens, mask), same,
                             atol=1e-5)
  # The last temporal patch's own time reaches its frames.
  per_frame = jnp.repeat(t[:, None], frames, 1).at[:, -pt:].set(0.9)
  out = model(x, per_frame, tokens, mask)
  assert not np.allclose(out[:, -pt:], same[:, -pt:], atol=1e-4)


def test_attention_k_and_v_shard_the_same_heads():
  """With 'heads' over tensor=2, each device holds K and V kernel columns of the same heads (a
  fused [in, 2 * width] K|V kernel split in half put all of K on one shard, all of V on the
  other)."""
  width, num_heads = 64, 4
  attn = nnx.eval_shape(lambda: layers.Attention(width, num_heads, rngs=nnx.Rngs(0)))
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2, context=1), jax.devices()[:8])
  shardings = sharding.state_shardings(nnx.state(attn, nnx.Param), mesh)
  head_dim = width // num_heads

  def heads(proj):  # device -> the head indices of its block of the kernel's output columns
    index_map = shardings[proj]['kernel'].devices_indices_map((width, width))
    return {d: tuple(sorted({c // head_dim for c in range(width)[idx[1]]}))
            for d, idx in index_map.items()}

  k, v = heads('k'), heads('v')
  assert k == v == heads('q')
  assert sorted(set(k.values())) == [(0, 1), (2, 3)]  # really split over the two tensor shards

"""Attention backends agree with XLA's; ring / all-to-all context parallelism on 8 fake CPU devices
equals unsharded attention, forward and gradient; the models run sequence-sharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import dit
from sora_jax.parallel import attention, sharding

B, H, D = 2, 4, 8


# Inputs from numpy: every new shape of an eager jax.random call is a compilation.
def _normal(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _qkv(lq, lk=None):
  lk = lq if lk is None else lk
  return _normal(B, lq, H, D, seed=0), _normal(B, lk, H, D, seed=1), _normal(B, lk, H, D, seed=2)


def _segments(n):
  return jnp.asarray(np.sort(np.random.default_rng(3).integers(0, 4, (B, n)), axis=1))


def _loss_and_grads(fn, q, k, v):
  """Output and gradient of a non-linear function of it, wrt q, k, v (jitted)."""
  def loss(q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * jnp.sin(out)), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close(a, b, tol=1e-5):
  """Every leaf within tol x its largest magnitude (float32 summation-order noise)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=tol * float(np.abs(y).max()), rtol=0)


@pytest.mark.parametrize('masking', ['none', 'segments', 'mask_and_segments', 'cross_padding'])
def test_chunked_matches_xla_forward_and_grad(masking):
  # Lengths that do not divide the blocks (padding), several blocks each way.
  lk = 21 if masking == 'cross_padding' else 37
  q, k, v = _qkv(37, lk)
  kw = {}
  if masking in ('segments', 'mask_and_segments'):
    kw['segment_ids'] = _segments(37)
  if masking == 'mask_and_segments':
    mask = np.random.default_rng(4).random((B, 1, 37, 37)) < 0.7
    mask[0, 0, 5] = False  # a fully masked row: uniform average, as XLA
    kw['mask'] = jnp.asarray(mask)
  if masking == 'cross_padding':
    kw['mask'] = jnp.arange(lk)[None, None, None, :] < jnp.array([15, 21])[:, None, None, None]
  ref = _loss_and_grads(lambda q, k, v: attention.attention(q, k, v, impl='xla', **kw), q, k, v)
  got = _loss_and_grads(
      lambda q, k, v: attention.attention(q, k, v, impl='chunked', block_q=16, block_kv=8, **kw),
      q, k, v)
  _assert_close(got, ref)


def test_chunked_memory_grows_linearly():
  """Compiled temp memory of forward + backward at L = 1024 -> 2048 (4 heads, head_dim 64):
  XLA's scores quadruple, the chunked kernel's blocks stay."""
  @functools.cache
  def temp_bytes(impl, n):
    x = jax.ShapeDtypeStruct((1, n, 4, 64), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention.attention(q, k, v, impl=impl) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  xla = temp_bytes('xla', 2048) / temp_bytes('xla', 1024)
  chunked = temp_bytes('chunked', 2048) / temp_bytes('chunked', 1024)
  assert xla > 3.5 and chunked < 1.5, (xla, chunked)
  assert temp_bytes('chunked', 2048) < temp_bytes('xla', 2048) / 8


# The Pallas TPU kernel call, run by the Pallas interpreter on CPU (the public path refuses
# non-TPU platforms), and the context-parallel shard_map it can be the local kernel of.
_splash = attention._splash  # pylint: disable=protected-access
_context_parallel = attention._context_parallel  # pylint: disable=protected-access


def _splash_interpret(q, k, v, segment_ids=None, kv_segment_ids=None):
  kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
  return _splash(q, k, v, None, segment_ids, kv_segment_ids, scale=q.shape[-1] ** -0.5,
                 interpret=True)


@pytest.mark.parametrize('lq,lk,segments', [
    (256, 256, True), (200, 200, True), (200, 72, False)])
def test_splash_kernel_matches_xla_in_interpret_mode(lq, lk, segments):
  """Forward and gradient equal XLA's, with and without segment ids; lengths that are not
  multiples of 128 are padded (padded keys in a segment no real query has, padded query rows
  sliced off)."""
  q = _normal(1, lq, 2, 128, seed=0)
  k, v = _normal(1, lk, 2, 128, seed=1), _normal(1, lk, 2, 128, seed=2)
  seg = None
  if segments:
    seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 3, (1, lq)), axis=1))
  ref = _loss_and_grads(lambda q, k, v: attention.attention(q, k, v, segment_ids=seg, impl='xla'),
                        q, k, v)
  got = _loss_and_grads(lambda q, k, v: _splash_interpret(q, k, v, seg), q, k, v)
  _assert_close(got, ref)


def test_splash_shard_map_matches_xla_in_interpret_mode():
  """Under a mesh (data 2 x tensor 2 x context 2 CPU devices) splash runs in a shard_map over
  batch and heads, gathering the sequence; as the local kernel of all-to-all context parallelism
  (self-attention, then cross-attention to replicated keys) it runs in that shard_map instead.
  Forward and gradient equal unsharded XLA attention."""
  b, n, h, d, lt = 2, 200, 4, 128, 20
  q, k, v = (_normal(b, n, h, d, seed=i) for i in range(3))
  text = _normal(b, lt, h, d, seed=3)
  seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 3, (b, n)), axis=1))
  scale = d ** -0.5

  def self_then_cross(q, k, v, attend):
    x = attend(q, k, v, seg, seg, True)
    return x + attend(x, text, 2 * text, None, None, False)

  xla = lambda q, k, v, qs, ks, _: attention.attention(q, k, v, segment_ids=qs, kv_segment_ids=ks,
                                                       impl='xla')
  splash = lambda q, k, v, qs, ks, _: _splash_interpret(q, k, v, qs, ks)
  local = functools.partial(_splash, scale=scale, interpret=True)
  all_to_all = lambda q, k, v, qs, ks, kv_sharded: _context_parallel(
      q, k, v, None, qs, ks, axes=('context',), strategy='all_to_all', kv_sharded=kv_sharded,
      local=local, scale=scale, block_q=512, block_kv=512, check_vma=False)
  ref = _loss_and_grads(lambda q, k, v: self_then_cross(q, k, v, xla), q, k, v)
  with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, context=2))):
    for attend in (splash, all_to_all):
      fn = lambda q, k, v: self_then_cross(q, k, v, attend)  # pylint: disable=cell-var-from-loop
      _assert_close(_loss_and_grads(fn, q, k, v), ref)
      assert jax.jit(fn).lower(q, k, v).as_text().count('sdy.manual_computation') == 2


def test_auto_selection_and_clear_errors():
  short, long = (jax.ShapeDtypeStruct((1, n, H, D), jnp.float32) for n in (256, 4096))
  assert attention.select_impl(short, short) == 'xla'  # on CPU
  assert attention.select_impl(long, long) == 'chunked'
  q, k, v = _qkv(8)
  with pytest.raises(ValueError, match="impl='cudnn'.*needs a GPU"):
    attention.attention(q, k, v, impl='cudnn')
  with pytest.raises(ValueError, match="impl='splash'.*needs a TPU"):
    attention.attention(q, k, v, impl='splash')
  with pytest.raises(ValueError, match='expected one of'):
    attention.attention(q, k, v, impl='flash')
  with pytest.raises(ValueError, match='context_parallel'):
    attention.attention(q, k, v, context_parallel='ulysses')
  with pytest.raises(ValueError, match='segment_ids must be'):
    attention.attention(q, k, v, segment_ids=jnp.zeros((B, 5), jnp.int32))
  with pytest.raises(ValueError, match='mask must broadcast'):
    attention.attention(q, k, v, mask=jnp.ones((B, 1, 8, 5), bool))
  with pytest.raises(ValueError, match='agree on batch, heads'):
    attention.attention(q, k[:, :, :2], v[:, :, :2])
  with jax.set_mesh(sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, context=8))):
    with pytest.raises(ValueError, match='divisible by the context mesh axes'):
      attention.attention(*_qkv(12), context_parallel='ring')
    with pytest.raises(ValueError, match="'all_to_all' needs the heads"):
      attention.attention(*_qkv(16), context_parallel='all_to_all')


def _tpu_devices(name='v5p-8'):
  """The devices of a TPU slice, to compile for (not run on) from this host; a skip without
  libtpu (the `test` extra installs it)."""
  pytest.importorskip('libtpu')
  from sora_jax.parallel import topologies  # pylint: disable=g-import-not-at-top
  return topologies.devices(topologies.parse(name))


def _tpu_mesh(**axes):
  """A mesh over the 4 chips of a TPU v5p 2x2x1 (axes of size 1 unless given)."""
  return sharding.make_mesh({a: axes.get(a, 1) for a in sharding.MESH_AXES}, _tpu_devices())


def test_auto_picks_the_kernel_of_the_mesh_platform():
  """'auto' asks the mesh's devices, not this CPU host: splash for a TPU mesh at any length
  (Wan 2.1 480p x 81 frames: 32,760 tokens) with head_dim a multiple of 128 and no dense mask."""
  wan = jax.ShapeDtypeStruct((1, 32760, 12, 128), jnp.bfloat16)
  narrow = jax.ShapeDtypeStruct((1, 1000, 4, 64), jnp.bfloat16)
  assert attention.select_impl(wan, wan) == 'chunked'  # the CPU host, no mesh
  with jax.set_mesh(_tpu_mesh(fsdp=4)):
    assert attention.target_platform() == 'tpu'
    assert attention.select_impl(wan, wan) == 'splash'
    assert attention.select_impl(wan, wan, segments=True) == 'splash'
    assert attention.select_impl(wan, wan, dense_mask=True) == 'chunked'
    assert attention.select_impl(narrow, narrow) == 'xla'


TPU_CASES = {  # mesh axes, impl, context_parallel, segment ids
    'fsdp4_splash': (dict(fsdp=4), 'splash', None, False),
    'fsdp2_tensor2_auto': (dict(fsdp=2, tensor=2), 'auto', None, True),
    'fsdp2_context2_all_to_all_auto': (dict(fsdp=2, context=2), 'auto', 'all_to_all', True),
}


@pytest.mark.parametrize('case', TPU_CASES)
def test_splash_compiles_for_a_tpu_topology(case):
  """Forward and backward compiled ahead of time, from this CPU host, for 4 TPU v5p chips with
  batch, heads or sequence sharded: the Mosaic kernel runs in a shard_map (XLA cannot partition
  it), at a length (1000) that is not a multiple of 128; memory_analysis gives per-chip bytes."""
  axes, impl, context_parallel, segments = TPU_CASES[case]
  b, n, h, d = 4, 1000, 4, 128
  mesh = _tpu_mesh(**axes)
  spec = lambda *names: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(names))
  x = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16,
                           sharding=spec('batch', 'length', 'act_heads', None))
  seg = jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=spec('batch', 'length'))

  def loss(q, k, v, seg):
    out = attention.attention(q, k, v, segment_ids=seg if segments else None, impl=impl,
                              context_parallel=context_parallel)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
  # The forward kernel and the backward's dq and dk/dv kernels.
  assert compiled.as_text().count('tpu_custom_call') >= 3
  grad_bytes = 3 * b * n * h * d * 2  # dq, dk, dv in bf16, over the 4 chips
  out_bytes = compiled.memory_analysis().output_size_in_bytes
  assert grad_bytes // 4 <= out_bytes < grad_bytes // 4 + 1024, out_bytes


MESHES = {
    'context8': dict(data=1, fsdp=1, tensor=1, context=8),
    'context4_data2': dict(data=2, fsdp=1, tensor=1, context=4),
    'context2_fsdp2_tensor2': dict(data=1, fsdp=2, tensor=2, context=2),
}
N, LT = 32, 12


def _self_then_cross(q, k, v, context_parallel):
  """Self-attention (packed segments + key padding, example 1 with every key masked) then
  cross-attention (sharded queries, replicated text keys with padding)."""
  text = _normal(B, LT, H, D, seed=5)
  key_pad = jnp.arange(N)[None, None, None, :] < jnp.array([N - 5, 0])[:, None, None, None]
  text_mask = jnp.arange(LT)[None, None, None, :] < jnp.array([7, 12])[:, None, None, None]
  q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
  x = attention.attention(q, k, v, mask=key_pad, segment_ids=_segments(N), impl='xla',
                          context_parallel=context_parallel, block_q=4, block_kv=4)
  y = attention.attention(x, text, 2 * text, mask=text_mask, impl='xla',
                          context_parallel=context_parallel, kv_sharded=False)
  return x + y


@pytest.fixture(scope='module')
def unsharded():
  return _loss_and_grads(lambda q, k, v: _self_then_cross(q, k, v, None), *_qkv(N))


@pytest.mark.parametrize('mesh_name,strategy', [
    ('context8', 'ring'), ('context4_data2', 'ring'), ('context4_data2', 'all_to_all'),
    ('context2_fsdp2_tensor2', 'ring'), ('context2_fsdp2_tensor2', 'all_to_all')])
def test_context_parallel_matches_unsharded(unsharded, mesh_name, strategy):
  """Forward and gradient equal unsharded attention; the program really communicates."""
  q, k, v = _qkv(N)
  fn = lambda q, k, v: _self_then_cross(q, k, v, strategy)
  with jax.set_mesh(sharding.make_mesh(MESHES[mesh_name])):
    got = _loss_and_grads(fn, q, k, v)
    hlo = jax.jit(fn).lower(q, k, v).as_text()
  _assert_close(got, unsharded)
  assert ('collective_permute' if strategy == 'ring' else 'all_to_all') in hlo


def test_packed_dit_runs_sequence_sharded():
  """VideoDiT.packed (segment-masked self- and cross-attention) with its tokens sharded 4 ways
  (ring) x data 2: same output and parameter gradient as on one device."""
  model = nnx.eval_shape(lambda: dit.VideoDiT(
      channels=3, patch_size=(1, 2, 2), width=32, depth=1, num_heads=4, mlp_ratio=2.0,
      context_width=16, context_parallel='ring', rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  # Random values for every parameter (adaLN-zero init would zero the output), made by numpy:
  # eager init compiles an op per parameter shape.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(0.3 * rng.standard_normal(p.shape, np.float32)),
                        params)
  b, n, s, lc = 2, 32, 2, 6
  tokens = _normal(b, n, 12, seed=1)
  positions = jnp.asarray(rng.integers(0, 4, (b, n, 3)))
  segment_ids = jnp.array([[1] * 20 + [2] * 8 + [0] * 4, [1] * 32])
  t = jnp.array([[0.3, 0.7], [0.5, 0.1]])
  context = _normal(b, s, lc, 16, seed=2)
  context_mask = jnp.arange(lc)[None, None] < jnp.array([[4, 6], [3, 2]])[..., None]

  def loss(params):
    out = nnx.merge(graphdef, params).packed(tokens, positions, segment_ids, t, context,
                                             context_mask)
    return jnp.sum(out * jnp.sin(out)), out

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (_, ref_out), ref_grads = step(params)
  with jax.set_mesh(sharding.make_mesh(dict(data=2, fsdp=1, tensor=1, context=4))):
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  # Summation order alone (plain GSPMD sharding of the same model) moves gradients ~1.4e-5.
  _assert_close((out, grads), (ref_out, ref_grads), tol=5e-5)

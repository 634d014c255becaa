"""Where the frozen encoders' weights live: placed once on the mesh, FSDP-sharded by their logical axis
names, and the encode / decode programs compiled with explicit shardings (no per-call transfer of
umT5 / the VAE from device 0)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from sora_jax.inference import frozen as frozen_lib
from sora_jax.interop import umt5, wan_vae
from sora_jax.parallel import sharding

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
WAN_VAE = os.path.join(FIXTURES, 'wan_vae_tiny')  # 4x temporal, 8x spatial, 4 latent channels
UMT5 = os.path.join(FIXTURES, 'umt5_tiny')  # d_model 32, d_ff 64, vocab 384


def _config():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.autoencoder = WAN_VAE
  c.text.encoder, c.text.path, c.text.max_length = 'umt5', UMT5, 16
  return c


def _mesh(data, fsdp):
  devices = jax.devices()[:data * fsdp]
  return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=1, context=1), devices=devices)


def _split_over(spec):
  """Per dimension, the data / fsdp axes it is split over (RULES may also name tensor / context,
  size 1 in these meshes)."""
  names = lambda a: {a} if isinstance(a, str) else set(a or ())
  return [{a for a in names(axes) if a not in ('context', 'tensor')} for axes in spec]


@pytest.fixture(scope='module')
def frozen():
  return frozen_lib.Frozen(_config(), _mesh(2, 4))


def test_frozen_weights_are_committed_and_sharded_on_the_mesh(frozen):
  mesh = frozen.mesh
  for params in (frozen.text_params, frozen.vae_params):
    leaves = jax.tree.leaves(params)
    for x in leaves:
      assert isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh and x.committed
    # The big kernels are split over fsdp: each device holds a quarter of their 'embed' axis.
    big = [x for x in leaves if x.size >= 1024]
    assert big and all('fsdp' in jax.tree.leaves(tuple(x.sharding.spec)) for x in big)
    for x in big:
      local = x.addressable_shards[0].data.shape
      assert np.prod(local) * 4 == x.size, (x.shape, local)
  embedding = frozen.text_params['embed']['embedding'][...]  # [vocab 384, embed 32]
  assert _split_over(embedding.sharding.spec) == [set(), {'fsdp'}]
  assert embedding.addressable_shards[0].data.shape == (384, 8)
  q = frozen.text_params['blocks']['q']['kernel'][...]  # [layers, embed, heads]
  assert q.addressable_shards[0].data.shape == (2, 8, 32)


def test_sharded_encoders_match_the_unsharded_computation(frozen):
  rng = np.random.default_rng(0)
  # umT5, against the module as loaded (one device, no mesh); padded positions zeroed.
  module = umt5.load_umt5_module(UMT5)
  tokens = rng.integers(2, 384, (8, 16)).astype(np.int32)
  mask = np.arange(16)[None] < rng.integers(1, 17, (8, 1))
  reference = np.asarray(module(jnp.asarray(tokens), jnp.asarray(mask))) * mask[..., None]
  embeddings, out_mask = frozen.caption_inputs(tokens, mask)
  assert embeddings.sharding.is_equivalent_to(frozen.batch_sharding, embeddings.ndim)
  np.testing.assert_allclose(np.asarray(embeddings), reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out_mask), mask)
  # A batch whose rows do not divide over data x fsdp (one caption) runs replicated.
  one, _ = frozen.caption_inputs(tokens[:1], mask[:1])
  np.testing.assert_allclose(np.asarray(one), reference[:1], rtol=1e-5, atol=1e-5)
  # The VAE: normalised posterior means and decoded pixels, against the Wan VAE as loaded.
  ref_vae = wan_vae.load_wan_vae(WAN_VAE)
  mean, std = ref_vae.model.latent_stats()
  video = rng.uniform(-1, 1, (8, 5, 16, 16, 3)).astype(np.float32)
  z = frozen.encode(video)
  assert z.sharding.is_equivalent_to(frozen.batch_sharding, z.ndim)
  z_ref = (np.asarray(ref_vae.encode(video)) - mean) / std
  np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-4, atol=1e-4)
  pixels = frozen.decode(jnp.asarray(z_ref))
  np.testing.assert_allclose(np.asarray(pixels), np.asarray(ref_vae.decode(z_ref * std + mean)),
                             rtol=1e-4, atol=1e-4)


def test_indivisible_dimensions_are_replicated():
  """A 6-way fsdp axis divides none of the tiny models' widths (32, 16, 8): those dimensions are
  replicated instead of failing to place, and the encoders still run."""
  f = frozen_lib.Frozen(_config(), _mesh(1, 6))
  embedding = f.text_params['embed']['embedding'][...]
  assert _split_over(embedding.sharding.spec) == [set(), set()] and embedding.committed
  tokens = np.full((6, 16), 5, np.int32)
  embeddings, _ = f.caption_inputs(tokens, np.ones((6, 16), bool))
  assert embeddings.shape == (6, 16, 32)
  # What divides stays split: a 12-wide 'embed' axis over fsdp=6 (and 4 of 8 data x fsdp devices).
  abstract = nnx.state(nnx.eval_shape(lambda: nnx.Linear(
      3, 12, rngs=nnx.Rngs(0),
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, 'embed')))))
  split = lambda mesh: _split_over(sharding.state_shardings(abstract, mesh)['kernel'].spec)
  assert split(_mesh(1, 6)) == [set(), {'fsdp'}]
  assert split(_mesh(1, 8)) == [set(), set()]


def test_fake_cpu_devices_get_threads_enough_for_concurrent_collectives():
  """XLA:CPU's pools are max(cores, devices) threads: 8 fake devices on 2 cores could all block at
  two concurrent all-reduces (a train step aborted at the 40 s rendezvous timeout). The programs
  (cli.run -> topologies.enough_cpu_threads) raise that to 4 per device before JAX starts, and let
  a rendezvous wait 300 s for a late device."""
  code = (
      'import collections, os\n'
      'from sora_jax.parallel import topologies\n'
      'topologies.enough_cpu_threads()\n'
      'import jax, jax.numpy as jnp\n'
      'x = jax.device_put(jnp.ones((8, 4)), jax.sharding.NamedSharding(\n'
      '    jax.make_mesh((8,), ("d",)), jax.sharding.PartitionSpec("d")))\n'
      'jax.jit(jnp.sum)(x).block_until_ready()\n'
      'names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip()\n'
      '                            for t in os.listdir("/proc/self/task"))\n'
      'print(os.environ["NPROC"], names["tf_XLAEigen"],\n'
      '      int("terminate_timeout_seconds=300" in os.environ["XLA_FLAGS"]))\n')
  env = {k: v for k, v in os.environ.items() if k != 'NPROC'}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  nproc, threads, timeout = map(int, out.stdout.split())
  assert nproc == max(os.cpu_count(), 32)
  assert timeout
  if os.path.isdir('/proc/self/task'):  # Linux: the pool XLA:CPU made
    assert threads >= 32, threads

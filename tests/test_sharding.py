"""One training step on 8 fake CPU devices under several meshes matches the single-device step."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from data_pipelines import pipeline
from sora_jax.config import geometry
from sora_jax.parallel import sharding
from sora_jax.training import state as state_lib
from sora_jax.training import update


def one_step(config, devices):
  mesh = sharding.make_mesh(geometry.resolve_mesh_shape(config, len(devices)), devices)
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, state_sh = state_lib.init(config, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(update.make_train_step(graphdef, config, tx, schedule),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
  batch = jax.device_put(next(pipeline.train_iterator(config)), batch_sh)
  with jax.set_mesh(mesh):
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)  # second step: the first update changed the params
  return jax.device_get(metrics), state


@pytest.fixture(scope='module')
def reference():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.mesh.data = 1
  return one_step(config, jax.devices()[:1])


# CI runs one mesh with every axis and the ring; the others (~15 s of compilation each) are `slow`.
@pytest.mark.parametrize('mesh', [
    pytest.param(dict(data=8, fsdp=1, tensor=1), marks=pytest.mark.slow),
    pytest.param(dict(data=1, fsdp=8, tensor=1), marks=pytest.mark.slow),
    dict(data=2, fsdp=2, tensor=2),
    pytest.param(dict(data=1, fsdp=2, tensor=4), marks=pytest.mark.slow),
    dict(data=2, fsdp=1, tensor=2, context=2),  # ring attention over the token sequence
    pytest.param(dict(data=1, fsdp=2, tensor=1, context=4, context_parallel='all_to_all'),
                 marks=pytest.mark.slow),
])
def test_sharded_step_matches_single_device(config, reference, mesh):
  assert jax.device_count() == 8
  mesh = dict(mesh)
  config.model.context_parallel = mesh.pop('context_parallel', 'ring')
  config.mesh.update(mesh)
  metrics, state = one_step(config, jax.devices())
  ref_metrics, ref_state = reference
  for k in ('loss', 'grad_norm', 'learning_rate'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(ref_state['params'])):
    np.testing.assert_allclose(a, b, atol=2e-5)
  # The weights really are split: an MLP kernel is laid out over fsdp x tensor.
  kernel = state['params']['dit']['blocks']['mlp']['up']['kernel'][...]
  assert kernel.sharding.spec == P(None, ('fsdp', 'context'), 'tensor')
  shard = kernel.addressable_shards[0].data.shape
  assert shard == (kernel.shape[0], kernel.shape[1] // (mesh['fsdp'] * mesh.get('context', 1)),
                   kernel.shape[2] // mesh['tensor'])


def test_logical_rules():
  assert sharding.logical_to_spec(('batch', 'length', 'act_embed')) == P(('data', 'fsdp'),
                                                                         'context', None)
  assert sharding.logical_to_spec(('layers', 'embed', 'mlp')) == P(None, ('fsdp', 'context'),
                                                                   'tensor')
  assert sharding.logical_to_spec((None, 'heads', 'vocab')) == P(None, 'tensor', None)

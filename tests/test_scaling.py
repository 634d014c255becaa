"""The compiled train step keeps parameters and optimizer state sharded (no accidental replication),
and the logged model FLOPs follow the transformer formula."""

import jax
import numpy as np
import pytest

from sora_jax.config import validation
from sora_jax.parallel import sharding
from sora_jax.training import metrics
from sora_jax.training import state as state_lib
from sora_jax.training import update


def _compiled_step(config):
  mesh = sharding.make_mesh(validation.validate(config, 8))
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, abstract, state_sh = state_lib.shardings(config, mesh)
  shapes = dict(video=(config.batch_size, config.data.num_frames, config.data.height,
                       config.data.width, 3), tokens=(config.batch_size, config.text.max_length),
                mask=(config.batch_size, config.text.max_length))
  dtypes = dict(video=np.float32, tokens=np.int32, mask=np.bool_)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(s, dtypes[k], sharding=batch_sh) for k, s in shapes.items()}
  step = jax.jit(update.make_train_step(graphdef, config, tx, schedule),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=(0,))
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, batch).compile()
  return compiled, abstract, mesh


@pytest.mark.parametrize('axes', [dict(fsdp=8), dict(fsdp=4, tensor=2)])
def test_compiled_step_keeps_state_sharded(config, axes):
  config.mesh.data, config.mesh.fsdp = 1, axes['fsdp']
  config.mesh.tensor = axes.get('tensor', 1)
  config.model.width, config.model.num_heads = 64, 4  # every 'embed' dim divisible by 8
  config.text.width = 64
  compiled, abstract, _ = _compiled_step(config)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  per_device = compiled.memory_analysis().argument_size_in_bytes
  # Ideal: state / 8 (+ the batch / 8). Replicated leftovers are norm scales, biases over
  # unsharded axes and scalars: a few percent of a model this small, none of its matrices.
  assert per_device < 0.25 * state_bytes, (per_device, state_bytes)
  # Every parameter matrix (and its Adam moments) is split over the fsdp axis in the compiled step.
  in_state = jax.tree.leaves(compiled.input_shardings[0][0])
  for leaf, sh in zip(jax.tree.leaves(abstract), in_state):
    if leaf.ndim >= 2 and leaf.size >= 4096:
      assert not sh.is_fully_replicated, (leaf.shape, sh)
  # Outputs come back in the same shardings (no gather at the end of the step).
  out_state = jax.tree.leaves(compiled.output_shardings[0])
  for a, b in zip(in_state, out_state):
    assert a.is_equivalent_to(b, 5) or a.spec == b.spec


def test_model_flops_formula(config):
  config.batch_size = 8
  batch = {'video': np.zeros((8, 4, 16, 16, 3), np.float32)}
  flops = metrics.model_flops(config, 1000, batch)
  tokens = (4 // 2) * (16 // 4) * (16 // 4)  # patch (2, 4, 4)
  assert flops == 6 * 1000 * tokens * 8 + 12 * config.model.depth * config.model.width * tokens**2 * 8
  config.model.family = 'vae'
  assert metrics.model_flops(config, 1000, batch) == 0.0
  assert metrics.peak_tflops(override=123.0) == 123.0
  assert metrics.peak_tflops() is None  # CPU: unknown peak, so no MFU is logged

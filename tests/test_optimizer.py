"""Weight decay by parameter name: scanned layers stack every bias and norm scale into 2-D, so the
rank of an array says nothing about what it is."""

import jax
import numpy as np
from flax import nnx

from sora_jax.training import factory
from sora_jax.training import state as state_lib


def _name(path):
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]


def _decay_updates(config):
  """The optimizer's update of each parameter under zero gradients once the learning rate is
  positive: -lr * weight_decay * p where decayed, exactly 0 elsewhere (Adam's part is 0)."""
  params = nnx.state(factory.build(config, nnx.Rngs(0)), nnx.Param)
  params = jax.tree.map(lambda p: p + 1.0, params)  # no zero-initialised (adaLN-zero) leaves
  tx, _ = state_lib.make_optimizer(config)
  opt_state = tx.init(params)
  zeros = jax.tree.map(np.zeros_like, params)
  update = jax.jit(tx.update)
  for _ in range(config.optim.warmup_steps + 1):  # the first steps have learning rate 0
    updates, opt_state = update(zeros, opt_state, params)
  return jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(updates)


def _check(config, expect_stacked):
  leaves, updates = _decay_updates(config)
  names = {}
  for (path, p), u in zip(leaves, updates):
    decayed = bool(np.any(np.asarray(u) != 0))
    names.setdefault(_name(path), set()).add(decayed)
    if _name(path) in ('kernel', 'embedding'):
      assert decayed, jax.tree_util.keystr(path)
    else:
      assert not decayed, jax.tree_util.keystr(path)
  # The case the old ndim >= 2 rule got wrong: stacked (scanned) biases and norm scales.
  stacked = {_name(path) for path, p in leaves if 'blocks' in jax.tree_util.keystr(path)
             and p.ndim == 2 and _name(path) not in ('kernel', 'embedding')}
  assert expect_stacked <= stacked, stacked
  assert names['kernel'] == {True} and names['bias'] == {False}


def test_scanned_dit_decays_kernels_not_biases_or_norm_scales(config):
  assert config.model.scan_layers
  _check(config, {'bias', 'scale'})


def test_scanned_wan_decays_kernels_not_biases_norms_or_tables(tmp_path):
  from test_latent import wan_config, wan_pipeline  # pylint: disable=g-import-not-at-top
  config = wan_config(wan_pipeline(tmp_path / 'Wan-tiny'))
  config.optim.weight_decay = 0.01  # the fine-tune config turns it off
  assert config.model.scan_layers
  _check(config, {'bias', 'norm_q', 'norm_k', 'norm2_scale', 'norm2_bias'})

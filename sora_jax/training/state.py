"""Train state: a plain dict {step, params, ema, opt_state, rng}, born sharded on the mesh."""

import json
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sora_jax.config import validation
from sora_jax.parallel import sharding
from sora_jax.training import checkpoint, factory


def make_optimizer(config):
  """AdamW with linear warm-up + cosine decay and global-norm clipping; no decay on norms/biases.
  The warm-up is validation.warmup_steps: config.optim.warmup_steps, shortened for a shorter run."""
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=validation.warmup_steps(config),
      decay_steps=config.total_steps, end_value=o.learning_rate * o.end_lr_fraction)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask,
                  mu_dtype=o.mu_dtype or None))
  return tx, schedule


# Parameter names that weight decay applies to: the weight matrices / filters of linear, conv and
# embedding layers. Not by ndim: scanned layers stack every bias and norm scale into 2-D.
DECAYED = ('kernel', 'embedding')


def decays(path) -> bool:
  """Whether the parameter at a tree path (of an nnx.State of Params) is weight-decayed: its own
  name (the last string key, before Variable's '.value') is in DECAYED. Biases, norm scales /
  gammas, Wan's scale_shift_table and learned positions keep their magnitude."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
  return bool(names) and names[-1] in DECAYED


def _init(config, tx):
  model = factory.build(config, nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  state = dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
               opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed + 1))
  return graphdef, state


def shardings(config, mesh):
  """(graphdef, abstract state with shardings attached, state shardings)."""
  tx, _ = make_optimizer(config)
  graphdef, abstract = nnx.eval_shape(lambda: _init(config, tx))
  param_sh = sharding.state_shardings(abstract['params'], mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Optimizer moments mirror the params' sharding; scalars (counts) are replicated.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract['opt_state'], param_sh,
                                 transform_non_params=lambda _: replicated)
  state_sh = dict(step=replicated, params=param_sh, ema=param_sh, opt_state=opt_sh,
                  rng=replicated)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  return graphdef, abstract, state_sh


def init(config, mesh):
  """Initialises the state directly into its shardings (no full copy on one device)."""
  tx, _ = make_optimizer(config)
  graphdef, abstract, state_sh = shardings(config, mesh)
  state = jax.jit(lambda: _init(config, tx)[1], out_shardings=state_sh)()
  return graphdef, state, state_sh


def init_from(config, state, state_sh):
  """A fresh state whose params (and EMA) come from `config.init_from`: a diffusers
  WanTransformer3DModel folder (model.family='wan'; the byte text encoder, if any, keeps its init),
  or a sora_jax workdir with the same architecture (its latest checkpoint's EMA parameters)."""
  path = config.init_from
  if os.path.isfile(os.path.join(path, 'config.json')) and _is_workdir(path):
    # Only the EMA is read (a partial restore: no optimizer moments), onto this state's shardings.
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state['params'], state_sh['params'])
    params, _ = checkpoint.restore_params(checkpoint.manager(path, read_only=True), abstract)
  elif config.model.family == 'wan':
    graphdef, _, _ = shardings(config, _mesh_of(state_sh))
    from sora_jax.interop import \
        wan_transformer  # pylint: disable=g-import-not-at-top
    model = nnx.merge(graphdef, state['params'])
    model.dit = wan_transformer.load_wan_params(path, model.dit, mesh=_mesh_of(state_sh))
    params = jax.device_put(nnx.state(model, nnx.Param), state_sh['params'])
  else:
    raise ValueError(f'config.init_from={path!r}: neither a sora_jax workdir nor (for'
                     ' model.family="wan") a diffusers WanTransformer3DModel folder.')
  return dict(state, params=params, ema=jax.tree.map(jnp.copy, params))


def _mesh_of(state_sh):
  return jax.tree.leaves(state_sh['params'])[0].mesh


def _is_workdir(path):
  with open(os.path.join(path, 'config.json')) as f:
    return 'model' in json.load(f)

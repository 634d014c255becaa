"""Train state: a plain dict {step, params, ema, opt_state, rng}, born sharded on the mesh.

LoRA runs (config.lora.rank > 0, sora_jax/models/lora.py) add 'frozen': the base model's parameters,
which the step reads but never updates; 'params', 'ema' and 'opt_state' then hold the adapters only,
and so do checkpoints (`checkpointed`): the base is loaded again from config.init_from on resume,
after checking it against the record saved with the adapters (`base_record`).
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sora_jax.config import validation
from sora_jax.models import wan
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
DECAYED = ('kernel', 'embedding', 'lora_a', 'lora_b')


def decays(path) -> bool:
  """Whether the parameter at a tree path (of an nnx.State of Params) is weight-decayed: its own
  name (the last string key, before Variable's '.value') is in DECAYED. Biases, norm scales /
  gammas, Wan's scale_shift_table and learned positions keep their magnitude."""
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str)]
  return bool(names) and names[-1] in DECAYED


def _init(config, tx):
  model = factory.build(config, nnx.Rngs(config.seed))
  if config.lora.rank:
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
  else:
    (graphdef, params), frozen = nnx.split(model, nnx.Param), None
  state = dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
               opt_state=tx.init(params), rng=jax.random.PRNGKey(config.seed + 1))
  if frozen is not None:
    state['frozen'] = _base_dtype(config, frozen)
  return graphdef, state


def _base_dtype(config, frozen):
  dtype = config.lora.base_dtype
  return frozen if not dtype else jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def model_params(state, key: str = 'params'):
  """The whole model's parameters (for nnx.merge with the state's graphdef): state[key], joined with
  the frozen base in a LoRA run."""
  if 'frozen' not in state:
    return state[key]
  return nnx.merge_state(state['frozen'], state[key])


def checkpointed(state):
  """What a checkpoint holds: everything but the frozen base of a LoRA run."""
  return {k: v for k, v in state.items() if k != 'frozen'}


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
  if 'frozen' in abstract:
    state_sh['frozen'] = sharding.state_shardings(abstract['frozen'], mesh)
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
  or a sora_jax workdir with the same architecture (its latest checkpoint's EMA parameters).
  In a LoRA run those weights are the frozen base, and the adapters keep their init (or come from
  config.lora.init_from)."""
  if 'frozen' in state:
    adapters = None
    if config.lora.init_from:  # read and checked first: a bad file fails before a 14B base loads
      adapters = adapters_from_file(config, state['params'])
    state = dict(state, frozen=load_base(config, state['frozen'], state_sh['frozen']))
    if adapters is not None:
      state = dict(state, params=adapters, ema=jax.tree.map(jnp.copy, adapters))
    return state
  params = _pretrained(config, state['params'], state_sh['params'])
  return dict(state, params=params, ema=jax.tree.map(jnp.copy, params))


def wan_config(config):
  """The WanConfig of a model.family='wan' run's transformer (what its LoRA files must fit)."""
  return wan.WanConfig(**factory.wan_kwargs(config, factory.channels(config)))


def read_lora_file(config, path: str):
  """(adapters, rank, alpha) of a Wan LoRA file (ComfyUI, diffusers/PEFT or musubi layout) read for
  this run's model: {WanDiT module path: {'lora_a', 'lora_b'}}, float32 (interop/wan_lora.py).
  ValueError when the run is not of the Wan family or the file does not fit its model (naming the
  keys)."""
  if config.model.family != 'wan':
    raise ValueError(f'{path}: LoRA files are read for Wan 2.1 models (model.family=\'wan\'); this'
                     f' run is model.family={config.model.family!r}.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'LoRA file {path!r} not found.')
  from sora_jax.interop import wan_lora  # pylint: disable=g-import-not-at-top
  return wan_lora.import_lora(path, wan_config(config))


def lora_file(config):
  """(adapters, rank, alpha) of config.lora.init_from, checked against the run before anything
  loads or compiles: its rank must be config.lora.rank, its alpha config.lora.alpha (or that be 0)
  and its modules among those config.lora.targets adapts. ValueError naming what differs."""
  path, lo = config.lora.init_from, config.lora
  adapters, rank, alpha = read_lora_file(config, path)
  name = f'config.lora.init_from={path!r}'
  if rank != lo.rank:
    raise ValueError(f'{name} has rank {rank}; config.lora.rank={lo.rank}: set'
                     f' --config.lora.rank={rank} to continue from it.')
  if lo.alpha and alpha != lo.alpha:
    raise ValueError(f'{name} has alpha {alpha:g}; config.lora.alpha={lo.alpha:g}: set'
                     f' --config.lora.alpha={alpha:g} (or 0: its alpha / rank folded into lora_b).')
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: factory.build(config, nnx.Rngs(0)))
  adapted = {p[1:-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
             if p[0] == 'dit'}  # ('dit', *module, 'lora_a')
  extra = sorted('/'.join(m) for m in set(adapters) - adapted)
  if extra:
    raise ValueError(f'{name} adapts {len(extra)} module(s) this run does not'
                     f' (config.lora.targets={lo.targets!r}): {", ".join(extra)}')
  return adapters, rank, alpha


def adapters_from_file(config, params):
  """A LoRA run's initial adapters: `params` (the LoRAParam State, on its shardings) with the
  modules of config.lora.init_from (`lora_file`) taken from that file; the modules it lacks keep
  their init (lora_b = 0: no update). With config.lora.alpha = 0 (alpha = rank) the file's
  alpha / rank is folded into lora_b, so the run starts from exactly the file's update. Folded
  rather than adopted as the run's alpha: the model's scale is a constant of its graph, built from
  the config that train.py saved (and a resume, sample or export rebuilds) before this runs."""
  adapters, rank, alpha = lora_file(config)
  fold = 1.0 if config.lora.alpha else alpha / rank
  flat = dict(nnx.to_flat_state(params))
  for module, arrays in adapters.items():
    for part, value in arrays.items():
      variable = flat[('dit', *module, part)]
      old = variable.get_value()
      if part == 'lora_b' and fold != 1.0:
        value = value * np.float32(fold)
      value = value.astype(old.dtype)
      flat[('dit', *module, part)] = variable.replace(
          jax.make_array_from_callback(value.shape, old.sharding, lambda i, v=value: v[i]))
  return nnx.from_flat_state(list(flat.items()))


def load_base(config, frozen, frozen_sh):
  """The frozen base of a LoRA run from config.init_from, on `frozen_sh`, in config.lora.base_dtype.
  `frozen`: the current (initial or abstract) base parameters, whose paths the loaded ones take."""
  if not config.init_from:
    raise ValueError('config.lora.rank > 0 trains adapters on a pretrained base: set '
                     'config.init_from (a diffusers Wan folder or a sora_jax workdir).')
  as_trained = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, _trained_dtype(x.dtype)),
                            frozen)
  params = _pretrained(config, as_trained, frozen_sh, lora_base=True)
  return jax.device_put(_base_dtype(config, params), frozen_sh)


def _trained_dtype(dtype):
  return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype


def _pretrained(config, params, params_sh, lora_base=False):
  """`params` (a parameter State, concrete or abstract) replaced by config.init_from's weights."""
  path = config.init_from
  if os.path.isfile(os.path.join(path, 'config.json')) and _is_workdir(path):
    # Only the EMA is read (a partial restore: no optimizer moments), onto these shardings.
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            params, params_sh)
    restored, _ = checkpoint.restore_params(checkpoint.manager(path, read_only=True), abstract)
    return restored
  if config.model.family == 'wan':
    # The model as it is without adapters: the Wan name table covers exactly its parameters.
    base_config = config.copy_and_resolve_references()
    base_config.lora.rank = 0
    graphdef = nnx.eval_shape(lambda: nnx.split(factory.build(base_config, nnx.Rngs(0)),
                                                nnx.Param))[0]
    from sora_jax.interop import \
        wan_transformer  # pylint: disable=g-import-not-at-top
    model = nnx.merge(graphdef, params)
    # Wan 2.2 A14B: the run's expert of the pipeline folder (transformer/ or transformer_2/).
    model.dit = wan_transformer.load_wan_params(path, model.dit, mesh=_mesh_of(params_sh),
                                                expert=factory.wan_expert(config) or None)
    return jax.device_put(nnx.state(model, nnx.Param), params_sh)
  raise ValueError(f'config.init_from={path!r}: neither a sora_jax workdir nor (for'
                   ' model.family="wan") a diffusers WanTransformer3DModel folder.')


def base_record(config) -> dict:
  """What identifies the base a LoRA run adapts: config.init_from's path and a fingerprint of its
  weights (safetensors headers, i.e. every tensor's name, dtype, shape and offset, plus the first and
  last 64 KiB of each weights file; for a sora_jax workdir, its config and latest step). Saved with
  every checkpoint; resuming, sampling or exporting with another base is refused (`check_base`)."""
  path = os.path.abspath(config.init_from)
  digest = hashlib.sha256()
  if _is_workdir_path(path):
    with open(os.path.join(path, 'config.json'), 'rb') as f:
      digest.update(f.read())
    digest.update(str(checkpoint.manager(path, read_only=True).latest_step()).encode())
  else:
    from sora_jax.interop import \
        wan_transformer  # pylint: disable=g-import-not-at-top
    files = wan_transformer.weight_files(path, factory.wan_expert(config) or None)
    for name in sorted(set(files.values())):
      with open(name, 'rb') as f:
        header_len = int.from_bytes(f.read(8), 'little')
        digest.update(f.read(header_len))
        digest.update(f.read(1 << 16))
        f.seek(max(8 + header_len, os.path.getsize(name) - (1 << 16)))
        digest.update(f.read())
  return dict(init_from=path, fingerprint=digest.hexdigest()[:16])


def check_base(config, saved: dict | None):
  """Refuses a LoRA run's base whose fingerprint differs from the one its adapters were trained on."""
  if not config.lora.rank or saved is None:
    return
  current = base_record(config)
  if current['fingerprint'] != saved['fingerprint']:
    raise ValueError(
        f'These LoRA adapters were trained on the base at {saved["init_from"]} (fingerprint '
        f'{saved["fingerprint"]}); config.init_from={config.init_from!r} holds other weights '
        f'(fingerprint {current["fingerprint"]}). Point config.init_from at the base they were '
        'trained on, or start a new run (another --workdir) for this base.')


def _is_workdir_path(path):
  return os.path.isfile(os.path.join(path, 'config.json')) and _is_workdir(path)


def _mesh_of(shardings):
  return jax.tree.leaves(shardings)[0].mesh


def _is_workdir(path):
  with open(os.path.join(path, 'config.json')) as f:
    return 'model' in json.load(f)

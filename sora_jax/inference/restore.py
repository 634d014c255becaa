"""Loading a trained run (its saved config and a checkpoint) for sampling and evaluation.

Only the parameter tree that is used (the EMA, or the raw params) is read, straight into FSDP
shardings: no optimizer moments, no second copy, no whole model on any one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.config import schema
from sora_jax.parallel import sharding
from sora_jax.training import checkpoint, factory
from sora_jax.training import state as state_lib


def find_step(workdir: str, step: int | None = None) -> int:
  """The checkpoint step `load` would take (latest unless `step`), checked without loading it."""
  return checkpoint.resolve_step(checkpoint.manager(workdir, read_only=True), step)


def inference_mesh():
  """Every device on the fsdp axis (data = tensor = context = 1).

  Not the saved config's mesh: that was sized (and its tensor / context axes checked against the
  model's heads and lengths) for the training device count. FSDP over all devices fits any count,
  splits every 'embed' dimension of the weights N ways, and keeps the batch split over data x fsdp
  = all devices, as the data-parallel mesh inference used before did.
  """
  return sharding.make_mesh(dict(data=1, fsdp=jax.device_count(), tensor=1, context=1))


def place(tree, shardings):
  """Host-side arrays -> global arrays on `shardings`; each device receives only its own slice (no
  full copy on any accelerator, and it works across processes)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def abstract_params(config, mesh):
  """(graphdef, abstract parameters carrying their shardings) of the config's model; no
  optimizer state is built."""
  graphdef, abstract = nnx.eval_shape(
      lambda: nnx.split(factory.build(config, nnx.Rngs(config.seed)), nnx.Param))
  shardings = sharding.state_shardings(abstract, mesh)
  return graphdef, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load(workdir: str, *, step: int | None = None, use_ema: bool = True, mesh=None):
  """(config, mesh, graphdef, params, step) for the run in `workdir`: the EMA (or, without
  `use_ema`, the raw params) alone, FSDP-sharded over `mesh` (default: `inference_mesh()`)."""
  config = schema.load_config(workdir)
  mesh = inference_mesh() if mesh is None else mesh
  # The config says which mesh its parameters are on (code reading config.mesh sees this one).
  config.mesh.data, config.mesh.fsdp = mesh.shape['data'], mesh.shape['fsdp']
  config.mesh.tensor, config.mesh.context = mesh.shape['tensor'], mesh.shape['context']
  config.mesh.dcn_data = config.mesh.dcn_fsdp = 1
  graphdef, abstract = abstract_params(config, mesh)
  mngr = checkpoint.manager(workdir, read_only=True)
  key = 'ema' if use_ema else 'params'
  if not config.lora.rank:
    params, step = _restore_params(mngr, abstract, key, step)
    return config, mesh, graphdef, params, step
  # LoRA: the checkpoint holds the adapters; the base comes from config.init_from, checked before
  # it loads.
  adapters, base = nnx.split_state(abstract, nnx.LoRAParam, nnx.Param)
  adapters, step = _restore_params(mngr, adapters, key, step)
  state_lib.check_base(config, checkpoint.saved_base(mngr, step))
  base = state_lib.load_base(config, base, jax.tree.map(lambda a: a.sharding, base))
  return config, mesh, graphdef, nnx.merge_state(base, adapters), step


def _restore_params(mngr, abstract, key, step):
  """checkpoint.restore_params (without `step`: the newest that restores); a `step` the user named
  that does not restore raises checkpoint.DamagedCheckpoint (one line from the CLIs: sora_jax.cli)."""
  return checkpoint.restore_params(mngr, abstract, key, step)


def merge_lora(params, adapters: dict, scale: float):
  """A Wan-family run's `params` (from `load`) with a LoRA file's `adapters`
  (state.read_lora_file: {WanDiT module path: {'lora_a', 'lora_b'}}) merged into the kernels:
  kernel + scale * lora_a @ lora_b, in float32, stored in the kernel's dtype and sharding (what
  wan_lora.merge and PEFT's fuse_lora compute). A LoRA run's own adapters are left as they are, so
  both updates apply."""
  flat = dict(nnx.to_flat_state(params))
  for module, arrays in adapters.items():
    path = ('dit', *module, 'kernel')
    kernel = flat[path].get_value()
    replicated = jax.sharding.NamedSharding(kernel.sharding.mesh, jax.sharding.PartitionSpec())
    a, b = place((arrays['lora_a'], arrays['lora_b']), (replicated, replicated))
    flat[path] = flat[path].replace(_merged(kernel, a, b, float(scale)))
  return nnx.from_flat_state(list(flat.items()))


def _merged(kernel, a, b, scale: float):
  def merge(k, a, b):
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * scale
    return (k.astype(jnp.float32) + delta).astype(k.dtype)
  return jax.jit(merge, out_shardings=kernel.sharding)(kernel, a, b)

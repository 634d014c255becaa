"""Loading a trained run (its saved config and a checkpoint) for sampling and evaluation."""

import jax

from sora_jax.config import geometry, schema
from sora_jax.parallel import sharding
from sora_jax.training import checkpoint
from sora_jax.training import state as state_lib


def find_step(workdir: str, step: int | None = None) -> int:
  """The checkpoint step `load` would take (latest unless `step`), checked without loading it."""
  return checkpoint.resolve_step(checkpoint.manager(workdir, read_only=True), step)


def load(workdir: str, *, step: int | None = None, use_ema: bool = True):
  """(config, mesh, graphdef, params, step) for the run in `workdir`, on all local devices."""
  config = schema.load_config(workdir)
  # Inference needs no FSDP/tensor split at this scale: data-parallel over every device.
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.context = -1, 1, 1, 1
  mesh = sharding.make_mesh(geometry.resolve_mesh_shape(config, jax.device_count()))
  graphdef, abstract, _ = state_lib.shardings(config, mesh)
  mngr = checkpoint.manager(workdir, read_only=True)
  state = checkpoint.restore(mngr, abstract, step=step)
  return config, mesh, graphdef, state['ema' if use_ema else 'params'], int(state['step'])

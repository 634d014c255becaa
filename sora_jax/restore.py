"""Loading a trained run (its saved config and a checkpoint) for sampling and evaluation."""

import json
import os

import jax
import ml_collections

from sora_jax import checkpoint, config_lib, sharding
from sora_jax import state as state_lib


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a training workdir?')
  with open(path) as f:
    saved = json.load(f)
  # On top of today's defaults, so runs saved before a key existed still load (with its default).
  config = config_lib.base_config()
  _merge(config, saved)
  config.model.patch_size = tuple(config.model.patch_size)
  return config


def _merge(config, saved: dict):
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      with config.ignore_type():
        config[key] = value


def load(workdir: str, *, step: int | None = None, use_ema: bool = True):
  """(config, mesh, graphdef, params, step) for the run in `workdir`, on all local devices."""
  config = load_config(workdir)
  # Inference needs no FSDP/tensor split at this scale: data-parallel over every device.
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.context = -1, 1, 1, 1
  mesh = sharding.make_mesh(config_lib.resolve_mesh_shape(config, jax.device_count()))
  graphdef, abstract, _ = state_lib.shardings(config, mesh)
  mngr = checkpoint.manager(workdir, read_only=True)
  state = checkpoint.restore(mngr, abstract, step=step)
  return config, mesh, graphdef, state['ema' if use_ema else 'params'], int(state['step'])

"""Wan 2.2 A14B sampling: the run trains one expert (config.model.wan.expert), and the sampler switches
to the other one, its partner, at the boundary (sora_jax/diffusion/experts.py), as diffusers'
pipelines switch transformer / transformer_2. The partner comes from the A14B pipeline folder the
run started from (config.init_from; through a workdir's own init_from when it continued another
run), unchanged: what fine-tuning one expert upstream leaves to the other.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.config import schema, validation
from sora_jax.diffusion import experts
from sora_jax.inference import restore
from sora_jax.interop import wan_transformer
from sora_jax.training import factory
from sora_jax.training import state as state_lib


def pipeline_folder(config) -> str:
  """The Wan 2.2 A14B pipeline folder a run's experts come from."""
  path = config.init_from
  for _ in range(8):  # a workdir that continued another run: that run's folder
    if not path or validation.model_index(path):
      break
    try:
      path = schema.load_config(path).init_from
    except FileNotFoundError:
      break
  if not path or wan_transformer.boundary_ratio(path) is None:
    raise ValueError(f'config.init_from={config.init_from!r} does not lead to a Wan 2.2 A14B'
                     ' pipeline folder: sampling a config.model.wan.expert run needs it for the'
                     ' other expert.')
  return path


def partner_config(config):
  """The config of the partner expert: the same architecture, no adapters, from the folder."""
  other = config.copy_and_resolve_references()
  other.model.wan.expert = experts.partner(factory.wan_expert(config))
  other.lora.rank = 0
  other.init_from = pipeline_folder(config)
  return other


def partner_graphdef(config):
  other = partner_config(config)
  return nnx.eval_shape(lambda: nnx.split(factory.build(other, nnx.Rngs(0)), nnx.Param))[0]


def load_partner(config, mesh):
  """The partner expert's parameters on `mesh` (FSDP-sharded), in config.model.dtype."""
  other = partner_config(config)
  _, abstract = restore.abstract_params(other, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  params = state_lib._pretrained(other, abstract, shardings)  # pylint: disable=protected-access
  dtype = jnp.dtype(config.model.dtype)
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      params)

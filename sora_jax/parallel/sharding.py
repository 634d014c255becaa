"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (`nnx.with_partitioning`); activations are constrained with `constrain`.
Changing how the model is parallelised means editing RULES, nothing else. The names are resolved by
flax's own rule machinery (`nnx.logical_axis_rules`, `flax.core.spmd.from_sharding_rules`): a name
without a rule is kept as is, so a misspelt one fails loudly as an unknown mesh axis.
"""

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor', 'context')

RULES = (
    # activations
    ('batch', ('data', 'fsdp')),
    ('length', 'context'),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    # parameters
    # ZeRO-3 over every axis that splits the batch or an example's tokens: context-parallel chips
    # hold different tokens of one example but need the same weights, so they share the storage.
    ('embed', ('fsdp', 'context')),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', None),
    ('layers', None),
    ('patch', None),
)


def logical_to_spec(names, rules=RULES) -> P:
  """PartitionSpec for a tuple of logical axis names."""
  return P(*spmd.from_sharding_rules(tuple(names), rules))


def make_mesh(shape: dict[str, int], devices=None, dcn: dict[str, int] | None = None, *,
              physical: bool = False) -> Mesh:
  """Mesh over `devices` (default: all) with axis sizes `shape`.

  Device order follows the physical topology (mesh_utils: ICI rings on TPU, NVLink islands on GPU) so
  the innermost axes (tensor, context) get the fastest links. `dcn` (multi-slice TPU pods / several
  GPU hosts): how many of each axis' size spans slices over the data-centre network, e.g.
  {'data': 4} for 4 slices doing data parallelism between them. `physical`: arrange the given
  `devices` (e.g. a target topology's, for ahead-of-time compilation) by their coordinates too.
  """
  sizes = tuple(shape[a] for a in MESH_AXES)
  dcn_sizes = tuple((dcn or {}).get(a, 1) for a in MESH_AXES)
  if devices is not None and not physical:  # an explicit list keeps its order (tests, sub-meshes)
    grid = np.asarray(devices).reshape(sizes)
  elif any(d > 1 for d in dcn_sizes):
    ici = tuple(n // d for n, d in zip(sizes, dcn_sizes))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn_sizes, devices=devices,
                                                allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for an nnx.State from its parameters' logical-axis metadata; a mesh axis that
  does not divide its dimension is dropped there (that dimension replicated, e.g. a 96-channel conv
  kernel on a 64-way fsdp axis) instead of failing to place."""
  with nnx.logical_axis_rules(RULES):
    named = nnx.get_named_sharding(abstract_state, mesh)

  def fit(x, s):
    spec = []
    for dim, axes in zip(x.shape, tuple(s.spec) + (None,) * (len(x.shape) - len(s.spec))):
      kept, size = [], 1
      for a in (axes,) if isinstance(axes, str) else (axes or ()):
        if dim % (size * mesh.shape[a]) == 0:
          kept.append(a)
          size *= mesh.shape[a]
      spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return NamedSharding(mesh, P(*spec))

  return jax.tree.map(fit, abstract_state, named)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, logical_to_spec(('batch',)))


def constrain(x, names):
  """Sharding constraint by logical names; a no-op outside a mesh context (e.g. eager tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))

"""LoRA: low-rank adapters on chosen linear layers of any model family (the project's DiT, Wan).

`add(model, rank=..., alpha=..., targets=...)` replaces every `nnx.Linear` whose module path matches
the `targets` regular expression by a `LoRALinear` holding the same kernel and bias Variables (so the
base parameters keep their paths: checkpoints, `init_from` and the Wan name table still apply) plus
`lora_a` [din, r] and `lora_b` [r, dout] as `nnx.LoRAParam`. Scanned blocks stack every Variable on a
leading 'layers' axis, and the adapters follow: [L, din, r] and [L, r, dout].

    y = x @ W + b + (alpha / rank) * x @ lora_a @ lora_b

as PEFT computes it (so a LoRA file means the same thing here and in diffusers / ComfyUI). The
low-rank path runs on activations rather than merging into W, so no weight-sized gradient is ever
formed: the base's gradient is not asked for at all. `lora_b` starts at zero (the adapted model starts
as the base), `lora_a` at PEFT's Kaiming-uniform.

Adapters shard by the same logical axes as their kernel: `lora_a` takes the kernel's input axis,
`lora_b` its output axis, the rank dimension is replicated.
"""

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

# The attention projections and feed-forward of every block, in both families:
# Wan: blocks/attn1|attn2/to_q|to_k|to_v|to_out, blocks/ffn/up|down;
# DiT: blocks/self_attn|cross_attn/q|k|v|out, blocks/mlp/up|down.
DEFAULT_TARGETS = r'blocks/(attn1|attn2|self_attn|cross_attn|ffn|mlp)/[^/]+$'


class LoRALinear(nnx.Module):
  """A linear layer's kernel and bias (frozen by the trainer, not here) plus a low-rank update."""

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
    self.kernel, self.bias = base.kernel, base.bias
    self.dtype, self.precision, self.promote_dtype = base.dtype, base.precision, base.promote_dtype
    self.rank, self.scale = rank, alpha / rank
    lead = base.kernel.shape[:-2]  # the stacked 'layers' axis of scanned blocks, or ()
    din, dout = base.kernel.shape[-2:]
    names = base.kernel.get_metadata().get('out_sharding') or (None,) * base.kernel.ndim
    lead_names, in_name, out_name = tuple(names[:-2]), names[-2], names[-1]
    # PEFT's init: kaiming_uniform(a=sqrt(5)) on A [r, din] = U(-1/sqrt(din), 1/sqrt(din)).
    bound = 1.0 / math.sqrt(din)
    a = jax.random.uniform(rngs.params(), (*lead, din, rank), jnp.float32, -bound, bound)
    self.lora_a = nnx.LoRAParam(a.astype(base.kernel.dtype),
                                out_sharding=(*lead_names, in_name, None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, dout), base.kernel.dtype),
                                out_sharding=(*lead_names, None, out_name))

  def __call__(self, x):
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias, a, b = self.promote_dtype(
        (x, kernel, bias, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y + (x @ a @ b) * jnp.asarray(self.scale, y.dtype)


def linear_paths(model: nnx.Module) -> list[str]:
  """'/'-joined module paths of every nnx.Linear (and LoRALinear) in `model`."""
  return [_join(path) for path, node in nnx.iter_graph(model)
          if isinstance(node, (nnx.Linear, LoRALinear))]


def add(model: nnx.Module, *, rank: int, alpha: float, targets: str = DEFAULT_TARGETS,
        rngs: nnx.Rngs) -> list[str]:
  """Puts adapters on every linear layer of `model` whose path matches `targets` (re.search over
  '/'-joined paths such as 'dit/blocks/attn1/to_q'), in place. Returns the adapted paths.

  Raises ValueError when the pattern matches no linear layer (listing some that exist) or the rank
  exceeds a matched layer's smaller side (a rank that large is no longer low-rank)."""
  pattern = re.compile(targets)
  found = [(path, node) for path, node in nnx.iter_graph(model)
           if isinstance(node, nnx.Linear) and pattern.search(_join(path))]
  if not found:
    names = linear_paths(model)
    raise ValueError(f'config.lora.targets={targets!r} matches no linear layer; the model has '
                     f'{len(names)}, e.g. {", ".join(names[:8])}')
  too_small = [f'{_join(p)} ({n.kernel.shape[-2]}x{n.kernel.shape[-1]})' for p, n in found
               if rank > min(n.kernel.shape[-2:])]
  if too_small:
    raise ValueError(f'config.lora.rank={rank} is larger than the width of '
                     f'{", ".join(too_small[:5])}: use a rank below the smallest side')
  for path, node in found:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(parent, (list, dict)) else getattr(parent, key)
    setattr(parent, path[-1], LoRALinear(node, rank=rank, alpha=alpha, rngs=rngs))
  return [_join(p) for p, _ in found]


def _join(path) -> str:
  return '/'.join(str(k) for k in path)

"""3D rotary position embeddings over (t, h, w) patch coordinates, as pure functions.

The head dim is split Wan-style: h and w each get 2*(d//6) channels, t the rest, so any even head dim
works. Positions are integer patch indices, so clips of any duration and resolution get embeddings.
Positions may carry leading batch dims: one grid shared by the batch ([N, 3], the unpacked path) or
explicit per-token coordinates ([B, N, 3], packed sequences where each token keeps the (t, h, w) it has
in its own clip, so a packed clip sees exactly the rotations it would see alone).
"""

import jax.numpy as jnp


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def grid_positions(grid: tuple[int, int, int]) -> jnp.ndarray:
  """[T*H*W, 3] integer (t, h, w) coordinates in row-major token order."""
  t, h, w = jnp.meshgrid(*(jnp.arange(n) for n in grid), indexing='ij')
  return jnp.stack([t.ravel(), h.ravel(), w.ravel()], axis=-1)


def frequencies(positions: jnp.ndarray, head_dim: int, theta: float):
  """cos, sin of shape [..., N, head_dim // 2] for positions [..., N, 3] (e.g. [N, 3] or [B, N, 3])."""
  angles = []
  for axis, dim in enumerate(axis_dims(head_dim)):
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles.append(positions[..., axis, None].astype(jnp.float32) * inv_freq)
  angles = jnp.concatenate(angles, axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates channel pairs (2i, 2i+1) of x [B, N, heads, D] by the angles of each token.

  cos, sin: [N, D // 2] (shared by the batch) or [B, N, D // 2] (per-sequence positions).
  """
  x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)

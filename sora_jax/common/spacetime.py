"""Spacetime patches: the token layout every video model and the packer share.

A channels-last video [B, T, H, W, C] becomes tokens [B, N, pt*ph*pw*C] in row-major (t, h, w) grid
order, N = (T/pt)(H/ph)(W/pw). einops works on numpy (Grain workers) and JAX arrays (models) alike.
"""

import einops

_TOKENS = 'b (gt pt) (gh ph) (gw pw) c -> b (gt gh gw) (pt ph pw c)'


def patchify(video, patch):
  """[B, T, H, W, C] -> tokens [B, N, pt*ph*pw*C] and the patch grid (T/pt, H/ph, W/pw)."""
  pt, ph, pw = patch
  _, t, h, w, _ = video.shape
  grid = (t // pt, h // ph, w // pw)
  return einops.rearrange(video, _TOKENS, pt=pt, ph=ph, pw=pw), grid


def unpatchify(tokens, grid, patch, channels):
  """tokens [B, N, pt*ph*pw*C] on the patch grid -> [B, T, H, W, C] (inverse of `patchify`)."""
  pt, ph, pw = patch
  inverse = ' -> '.join(reversed(_TOKENS.split(' -> ')))
  return einops.rearrange(tokens, inverse, gt=grid[0], gh=grid[1], gw=grid[2], pt=pt, ph=ph, pw=pw,
                          c=channels)


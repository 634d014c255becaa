r"""Does a trained shapes model use each caption attribute? Clean-clip (x0) error with the true caption
vs. the caption with one attribute swapped (colour, shape, direction) or empty, at several noise levels.

  python benchmarks/caption_sensitivity.py runs/demo

An attribute the model ignores gives the same error as the true caption.
"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sora_jax import restore
from sora_jax.diffusion import flow
from sora_jax.models import text
from data_pipelines import shapes
config, mesh, graphdef, params, step = restore.load(sys.argv[1])
src = shapes.ShapesSource(num_frames=config.data.num_frames, height=config.data.height, width=config.data.width, split='train', seed=777)
recs = [src[i] for i in range(64)]
x0 = jnp.asarray(np.stack([r['video'] for r in recs]).astype(np.float32) / 127.5 - 1)
def swap(cap, which):
  c, s, d = shapes.parse_caption(cap)
  if which == 'color': c = list(shapes.COLORS)[(list(shapes.COLORS).index(c) + 1) % 7]
  if which == 'shape': s = shapes.SHAPES[(shapes.SHAPES.index(s) + 1) % 3]
  if which == 'direction': d = {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up'}[d]
  if which == 'empty': return ''
  return shapes.caption(c, s, d)
model = nnx.merge(graphdef, params)
@jax.jit
def x0err(tokens, mask, t, key):
  noise = jax.random.normal(key, x0.shape)
  tt = jnp.full((x0.shape[0],), t)
  xt = flow.interpolate(x0, noise, tt)
  v = model(xt, tt, tokens, mask)
  x0hat = xt - tt[:, None, None, None, None] * v
  return jnp.mean((x0hat - x0) ** 2)
for t in (0.3, 0.6, 0.8, 0.95):
  row = []
  for which in ('true', 'color', 'shape', 'direction', 'empty'):
    caps = [swap(r['caption'], which) if which != 'true' else r['caption'] for r in recs]
    tok, m = text.tokenize(caps, config.text.max_length)
    row.append(float(np.mean([x0err(tok, m, t, jax.random.PRNGKey(k)) for k in range(3)])))
  print(f't={t}', ' '.join(f'{w}={v:.4f}' for w, v in zip(('true', 'color', 'shape', 'direction', 'empty'), row)))

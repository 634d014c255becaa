r"""Does a trained shapes model use each caption attribute? Clean-clip (x0) error with the true caption
vs. the caption with one attribute swapped (colour, shape, direction) or empty, at several noise levels.

  python benchmarks/caption_sensitivity.py --workdir=runs/demo [--num_clips=64 --times=0.3,0.6,0.8,0.95]

An attribute the model ignores gives the same error as the true caption.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from data_pipelines import shapes
from sora_jax.common import tokenizers
from sora_jax.diffusion import flow
from sora_jax.inference import restore

flags.DEFINE_string('workdir', None, 'A run trained on the shapes dataset (pixel space).')
flags.DEFINE_integer('num_clips', 64, 'Training-split clips to score.')
flags.DEFINE_list('times', ['0.3', '0.6', '0.8', '0.95'], 'Flow times (noise levels) to score at.')
flags.DEFINE_integer('num_noises', 3, 'Noise draws averaged per time.')
flags.mark_flag_as_required('workdir')

VARIANTS = ('true', 'color', 'shape', 'direction', 'empty')
OPPOSITE = {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up'}


def variant(caption: str, which: str) -> str:
  """The caption with one attribute replaced by the next value (or '' for 'empty')."""
  if which == 'empty':
    return ''
  color, shape, direction = shapes.parse_caption(caption)
  colors = list(shapes.COLORS)
  if which == 'color':
    color = colors[(colors.index(color) + 1) % len(colors)]
  elif which == 'shape':
    shape = shapes.SHAPES[(shapes.SHAPES.index(shape) + 1) % len(shapes.SHAPES)]
  elif which == 'direction':
    direction = OPPOSITE[direction]
  return shapes.caption(color, shape, direction)


def main(argv):
  del argv
  f = flags.FLAGS
  config, _, graphdef, params, step = restore.load(f.workdir)
  if config.autoencoder:
    raise ValueError(f'{f.workdir} diffuses in an autoencoder latent space; this benchmark scores '
                     'pixel-space shapes models.')
  src = shapes.ShapesSource(num_frames=config.data.num_frames, height=config.data.height,
                            width=config.data.width, split='train', seed=777)
  records = [src[i] for i in range(f.num_clips)]
  x0 = jnp.asarray(np.stack([r['video'] for r in records]).astype(np.float32) / 127.5 - 1)
  model = nnx.merge(graphdef, params)

  @jax.jit
  def x0_error(tokens, mask, t, key):
    noise = jax.random.normal(key, x0.shape)
    tt = jnp.full((x0.shape[0],), t)
    x_t = flow.interpolate(x0, noise, tt)
    x0_hat = x_t - tt[:, None, None, None, None] * model(x_t, tt, tokens, mask)  # model: velocity
    return jnp.mean((x0_hat - x0) ** 2)

  print(f'{f.workdir} (step {step}): x0 mean squared error, {f.num_clips} clips')
  print('| t | ' + ' | '.join(VARIANTS) + ' |')
  print('|---' * (len(VARIANTS) + 1) + '|')
  for t in map(float, f.times):
    row = []
    for which in VARIANTS:
      tokens, mask = tokenizers.tokenize([r['caption'] if which == 'true' else variant(r['caption'], which)
                                    for r in records], config.text.max_length)
      row.append(np.mean([float(x0_error(tokens, mask, t, jax.random.PRNGKey(k)))
                          for k in range(f.num_noises)]))
    print(f'| {t} | ' + ' | '.join(f'{v:.4f}' for v in row) + ' |')


if __name__ == '__main__':
  app.run(main)

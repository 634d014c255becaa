r"""Times the jitted train step for config variants and prints a table.

  python benchmarks/train_step.py --config=configs/demo.py --variants="patch_size=(2,4,4)|patch_size=(4,4,4);width=128"

Variants are separated by '|'; each is `key=value;...` for config.model keys (or dotted keys such as
`data.num_frames=16` for other sections).
"""

import ast
import math
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from data_pipelines import pipeline
from sora_jax import config_lib, sharding, state as state_lib, train

config_flags.DEFINE_config_file('config', None, 'Base training config.')
flags.DEFINE_string('variants', '', 'Semicolon-separated variants of key=value overrides.')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (after one warm-up step).')


def apply(config, overrides: str):
  for item in filter(None, overrides.split(';')):
    key, value = item.split('=', 1)
    section, name = key.rsplit('.', 1) if '.' in key else ('model', key)
    node = config
    for part in section.split('.'):
      node = node[part]
    node[name] = ast.literal_eval(value)
  return config


def time_variant(config, steps):
  mesh = sharding.make_mesh(config_lib.validate(config, jax.device_count()))
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, state_sh = state_lib.init(config, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train.make_train_step(graphdef, config, tx, schedule),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                    donate_argnums=(0,))
  it = pipeline.train_iterator(config)
  batches = [jax.device_put(next(it), batch_sh) for _ in range(2)]
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    state, m = step_fn(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
      state, m = step_fn(state, batches[i % 2])
    jax.block_until_ready(m)
  params = sum(x.size for x in jax.tree.leaves(state['params']))
  return compile_s, (time.perf_counter() - t0) / steps, params


def main(argv):
  del argv
  base = flags.FLAGS.config
  print(f'{"variant":48s} {"tokens":>6s} {"params":>8s} {"compile s":>9s} {"s/step":>7s}'
        f' {"clips/s":>7s}')
  for variant in flags.FLAGS.variants.split('|') if flags.FLAGS.variants else ['']:
    config = apply(base.copy_and_resolve_references(), variant)
    tokens = math.prod(n // p for n, p in zip(
        (config.data.num_frames, config.data.height, config.data.width), config.model.patch_size))
    compile_s, step_s, params = time_variant(config, flags.FLAGS.steps)
    print(f'{variant or "(base)":48s} {tokens:6d} {params / 1e6:7.2f}M {compile_s:9.1f}'
          f' {step_s:7.3f} {config.batch_size / step_s:7.1f}', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)

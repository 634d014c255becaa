r"""Times the jitted train step for config variants and prints a table.

  python benchmarks/train_step.py --config=configs/demo.py --variants="patch_size=(2,4,4)|patch_size=(4,4,4);width=128"

Variants are separated by '|'; each is `key=value;...` for config.model keys (or dotted keys such as
`data.num_frames=16` for other sections).
"""

import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file('config', None, 'Base training config.')
flags.DEFINE_string('variants', '', "Variants separated by '|', each ';'-separated key=value"
                    ' overrides (bare keys: config.model).')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (after one warm-up step).')


def main(argv):
  del argv
  base = flags.FLAGS.config
  print(f'{"variant":48s} {"tokens":>6s} {"params":>8s} {"compile s":>9s} {"s/step":>7s}'
        f' {"clips/s":>7s}')
  for variant in flags.FLAGS.variants.split('|') if flags.FLAGS.variants else ['']:
    config = common.apply(base.copy_and_resolve_references(), variant)
    tokens = math.prod(n // p for n, p in zip(
        (config.data.num_frames, config.data.height, config.data.width), config.model.patch_size))
    compile_s, step_s, params = common.time_train_step(config, flags.FLAGS.steps)
    print(f'{variant or "(base)":48s} {tokens:6d} {params / 1e6:7.2f}M {compile_s:9.1f}'
          f' {step_s:7.3f} {config.batch_size / step_s:7.1f}', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)

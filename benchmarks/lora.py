r"""LoRA against full fine-tuning: trainable parameters, train-state bytes, step time and peak host
memory of the same model, each variant in its own process (peak RSS is per process).

  python benchmarks/lora.py --config=configs/demo.py \
      --variants="lora.rank=0|lora.rank=16|lora.rank=16;lora.base_dtype='bfloat16'"

Variants are separated by '|', each `key=value;...` (bare keys: config.model, as in
benchmarks/train_step.py). The base weights are the random init: step time and memory do not depend
on their values, so no config.init_from is needed here.
"""

import json
import os
import resource
import subprocess
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Base training config.')
flags.DEFINE_string('variants', "lora.rank=0|lora.rank=16|lora.rank=16;lora.base_dtype='bfloat16'",
                    "Variants separated by '|'.")
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (after one warm-up step).')
flags.DEFINE_string('one', None, 'Internal: run this one variant and print its figures as JSON.')


def _bytes(tree) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def one(config) -> dict:
  step_fn, state, _, _ = common.train_step(config)
  trainable = sum(x.size for x in jax.tree.leaves(state['params']))
  total = trainable + sum(x.size for x in jax.tree.leaves(state.get('frozen', {})))
  trained_bytes = _bytes({k: v for k, v in state.items() if k != 'frozen'})
  frozen_bytes = _bytes(state.get('frozen', {}))
  del step_fn, state
  compile_s, step_s, _ = common.time_train_step(config, flags.FLAGS.steps)
  return dict(trainable=trainable, total=total, trained_bytes=trained_bytes,
              frozen_bytes=frozen_bytes, compile_s=compile_s, step_s=step_s,
              peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.one is not None:
    config = common.apply(f.config.copy_and_resolve_references(), f.one)
    print('RESULT ' + json.dumps(one(config)), flush=True)
    return
  overrides = [a for a in sys.argv[1:] if a.startswith('--config')]
  print(f'{"variant":44s} {"trainable":>10s} {"of":>8s} {"state MiB":>9s} {"frozen MiB":>10s}'
        f' {"compile s":>9s} {"s/step":>7s} {"peak RSS MiB":>12s}')
  for variant in f.variants.split('|'):
    out = subprocess.run([sys.executable, __file__, *overrides, f'--steps={f.steps}',
                          f'--one={variant}'], capture_output=True, text=True, check=False)
    line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    if out.returncode or not line:
      print(f'{variant:44s} failed: {out.stderr.strip().splitlines()[-1:]}')
      continue
    r = json.loads(line[0][len('RESULT '):])
    print(f'{variant:44s} {r["trainable"] / 1e6:9.2f}M {r["total"] / 1e6:7.2f}M'
          f' {r["trained_bytes"] / 2**20:9.1f} {r["frozen_bytes"] / 2**20:10.1f}'
          f' {r["compile_s"]:9.1f} {r["step_s"]:7.3f} {r["peak_rss"] / 2**20:12.0f}', flush=True)


if __name__ == '__main__':
  app.run(main)

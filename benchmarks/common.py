"""What several benchmarks share: build the sharded train step for a config and time it.

Flag-free (the benchmark scripts define their absl flags at import), so any of them can import it.
"""

import ast
import time

import jax

from data_pipelines import pipeline
from sora_jax.config import validation
from sora_jax.parallel import sharding
from sora_jax.training import state as state_lib
from sora_jax.training import update


def apply(config, overrides: str):
  """`key=value;...` overrides (bare keys: config.model) applied to `config`."""
  for item in filter(None, overrides.split(';')):
    key, value = item.split('=', 1)
    section, name = key.rsplit('.', 1) if '.' in key else ('model', key)
    node = config
    for part in section.split('.'):
      node = node[part]
    node[name] = ast.literal_eval(value)
  return config


def train_step(config, mesh=None):
  """(jitted step with explicit shardings and donation, state, batch sharding, mesh)."""
  # weights=False: a LoRA variant times adapters on the random init (no base weights read).
  mesh = mesh or sharding.make_mesh(validation.validate(config, jax.device_count(), weights=False))
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, state_sh = state_lib.init(config, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  step_fn = jax.jit(update.make_train_step(graphdef, config, tx, schedule),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                    donate_argnums=(0,))
  return step_fn, state, batch_sh, mesh


def time_train_step(config, steps: int, batches=None):
  """(compile s, s/step, parameter count) of the train step on two alternating batches (default:
  from the config's own data pipeline)."""
  step_fn, state, batch_sh, mesh = train_step(config)
  if batches is None:
    it = pipeline.train_iterator(config)
    batches = [next(it) for _ in range(2)]
  batches = [jax.device_put(b, batch_sh) for b in batches]
  params = sum(x.size for x in jax.tree.leaves(state['params']))
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    state, m = step_fn(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
      state, m = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(m)
  return compile_s, (time.perf_counter() - start) / steps, params

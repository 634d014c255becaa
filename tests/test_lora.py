"""LoRA: adapters on linear layers (models/lora.py) and LoRA training runs (training/state.py)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config
from flax import nnx

from sora_jax import train
from sora_jax.inference import restore
from sora_jax.models import lora
from sora_jax.training import checkpoint, factory


def _lora_config(rank=4, **kw):
  c = tiny_config()
  c.lora.rank = rank
  for k, v in kw.items():
    c.lora[k] = v
  return c


def _inputs(config, batch=2):
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  d = config.data
  x = jax.random.normal(k[0], (batch, d.num_frames, d.height, d.width, 3))
  t = jax.random.uniform(k[1], (batch,))
  tokens = jax.random.randint(k[2], (batch, config.text.max_length), 0, 256)
  return x, t, tokens, jnp.ones(tokens.shape, bool)


def test_adapters_start_as_the_base_and_equal_a_merged_kernel():
  config = _lora_config(rank=4, alpha=8.0)
  base = factory.build(tiny_config(), nnx.Rngs(0))
  # Zero-initialised layers (adaLN-zero, the output layer) made random so every layer shows.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x if np.any(x) else jnp.asarray(
      rng.normal(0, 0.2, x.shape), x.dtype), nnx.state(base, nnx.Param))
  nnx.update(base, params)
  adapted = factory.build(config, nnx.Rngs(0))
  nnx.update(adapted, params)
  before = base(*_inputs(config))
  paths = [p for p in lora.linear_paths(adapted)
           if isinstance(_module(adapted, p), lora.LoRALinear)]
  # The default targets: q, k, v, out of both attentions and the MLP's up/down, nothing else.
  assert sorted(paths) == sorted(
      [f'dit/blocks/{a}/{p}' for a in ('self_attn', 'cross_attn') for p in 'q k v out'.split()]
      + ['dit/blocks/mlp/down', 'dit/blocks/mlp/up'])
  inputs = _inputs(config)
  np.testing.assert_allclose(adapted(*inputs), base(*inputs), rtol=0, atol=0)  # lora_b = 0

  # With random A and B, the output is the base model's with W + (alpha / rank) A @ B.
  for p in paths:
    m = _module(adapted, p)
    m.lora_b[...] = jnp.asarray(rng.normal(0, 0.2, m.lora_b.shape), jnp.float32)
    _module(base, p).kernel[...] = m.kernel[...] + 2.0 * m.lora_a[...] @ m.lora_b[...]
  got, want = adapted(*inputs), base(*inputs)
  assert float(jnp.linalg.norm(got - before)) > 0.1 * float(jnp.linalg.norm(before))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def _module(model, path):
  for key in path.split('/'):
    model = getattr(model, key)
  return model


def test_bad_targets_and_rank_are_config_errors():
  with pytest.raises(ValueError, match=r"targets='nothing_here' matches no linear layer.*dit/"):
    factory.build(_lora_config(targets='nothing_here'), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'rank=64 is larger than the width of dit/blocks/'):
    factory.build(_lora_config(rank=64), nnx.Rngs(0))


def _adapters(state):
  if isinstance(state, nnx.State):
    state = nnx.to_pure_dict(state)
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _flat(state):
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}


IN_CHILD = os.environ.get('SORA_JAX_LORA_CHILD') == '1'


def test_lora_training_on_two_devices():
  """The LoRA run below, in a child pytest on 2 fake CPU devices. On 8 (this process), XLA:CPU
  aborted it now and then: a device runs its independent all-reduces (LoRA: one per adapter
  gradient) concurrently, each blocking a pool thread, and 8 devices' worth took even 32 threads
  (the 40 s rendezvous timeout); with 2 devices the pool has 16 threads per device."""
  if IN_CHILD:
    return
  flags = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
  env = dict(os.environ, SORA_JAX_LORA_CHILD='1',
             XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count=2')
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__,
                        '-k', 'resumes_exactly'], cwd=os.path.dirname(os.path.dirname(__file__)),
                       capture_output=True, text=True, timeout=900, env=env)
  assert out.returncode == 0 and '1 passed' in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.skipif(not IN_CHILD, reason='runs in test_lora_training_on_two_devices\' child')
def test_lora_run_trains_adapters_only_resumes_exactly_and_keeps_its_base(tiny_run, tmp_path):
  assert jax.device_count() == 2
  _, base = tiny_run
  config = _lora_config(rank=4)
  config.init_from = base
  config.total_steps, config.checkpoint_every_steps = 8, 4
  config.optim.learning_rate, config.optim.warmup_steps = 1e-2, 1
  state = train.train(config, str(tmp_path / 'run'))

  # The base is the base run's EMA, untouched by training; the adapters moved and learned.
  _, _, graphdef, base_params, _ = restore.load(base)
  frozen, want = _flat(state['frozen']), _flat(base_params)
  assert frozen.keys() == want.keys()
  for k, v in frozen.items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  trained = _adapters(state['params'])
  assert trained and all(k.endswith(('lora_a', 'lora_b')) for k in trained)
  assert all(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith('lora_b'))
  losses = [json.loads(l)['loss'] for l in open(tmp_path / 'run' / 'metrics.jsonl')
            if '"loss"' in l]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

  # Checkpoints hold the adapters (and optimizer state / EMA of them) and the base's record only.
  saved = ocp.StandardCheckpointer().metadata(
      str(tmp_path / 'run' / 'checkpoints' / '8' / 'state')).item_metadata
  assert set(saved.keys()) == {'ema', 'opt_state', 'params', 'rng', 'step'}
  assert {k.removesuffix('/value') for k in _adapters(
      jax.tree.map(lambda _: 0, dict(saved['params'])))} == set(trained)
  mngr = checkpoint.manager(str(tmp_path / 'run'), read_only=True)
  record = checkpoint.saved_base(mngr, 8)
  assert record['init_from'] == os.path.abspath(base) and len(record['fingerprint']) == 16

  # Exact resume: from step 4 to 8 again gives the same adapters, bit for bit.
  shutil.copytree(tmp_path / 'run', tmp_path / 'resumed')
  shutil.rmtree(tmp_path / 'resumed' / 'checkpoints' / '8')
  resumed = train.train(config, str(tmp_path / 'resumed'))
  for k, v in _adapters(resumed['params']).items():
    np.testing.assert_array_equal(v, trained[k], err_msg=k)

  # Sampling / evaluation load the base and the EMA adapters together.
  _, _, graphdef, params, step = restore.load(str(tmp_path / 'run'))
  model = nnx.merge(graphdef, params)
  assert step == 8 and isinstance(model.dit.blocks.self_attn.q, lora.LoRALinear)
  np.testing.assert_array_equal(model.dit.blocks.mlp.up.lora_b[...],
                                state['ema']['dit']['blocks']['mlp']['up']['lora_b'][...])

  # Another base (same architecture, other weights) is refused, naming both.
  other = tmp_path / 'other_base'
  shutil.copytree(base, other)
  with open(other / 'config.json') as f:
    other_config = json.load(f)
  other_config['seed'] += 1
  with open(other / 'config.json', 'w') as f:
    json.dump(other_config, f)
  config.init_from = str(other)
  config.total_steps = 12
  with pytest.raises(ValueError, match='trained on the base at .*other weights'):
    train.train(config, str(tmp_path / 'resumed'))
  with open(tmp_path / 'run' / 'config.json') as f:
    saved_config = json.load(f)
  saved_config['init_from'] = str(other)
  shutil.copytree(tmp_path / 'run', tmp_path / 'moved')
  with open(tmp_path / 'moved' / 'config.json', 'w') as f:
    json.dump(saved_config, f)
  with pytest.raises(ValueError, match='trained on the base at'):
    restore.load(str(tmp_path / 'moved'))


def test_lora_config_errors_come_before_compiling(tmp_path):
  from sora_jax.config import validation  # pylint: disable=g-import-not-at-top
  cases = [({}, 'set config.init_from'),
           ({'init_from': str(tmp_path), 'lora.dropout': 0.1}, 'dropout is not implemented'),
           ({'init_from': str(tmp_path), 'lora.base_dtype': 'fp8'}, 'base_dtype'),
           ({'init_from': str(tmp_path), 'lora.targets': 'blocks/(q'}, 'not a regular expression'),
           ({'init_from': str(tmp_path), 'lora.init_from': str(tmp_path / 'x.safetensors')},
            'is not a file'),
           ({'lora.rank': 0, 'lora.init_from': 'x.safetensors'}, 'needs config.lora.rank > 0')]
  for overrides, message in cases:
    config = _lora_config()
    for k, v in overrides.items():
      section, _, key = k.rpartition('.')
      (config[section] if section else config)[key] = v
    with pytest.raises(ValueError, match=message):
      validation.validate(config, 1)

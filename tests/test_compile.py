"""Ahead-of-time compilation for TPU slices from this CPU host (python -m sora_jax.compile)."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from sora_jax import compile as compile_cli
from sora_jax.parallel import topologies

from conftest import tiny_config

sys.path.insert(0, os.path.dirname(__file__))
import programs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slice_names():
  s = topologies.parse('v5p-8')
  assert (s.chips, s.topology, s.chip.hbm_bytes) == (4, 'v5:2x2x1', 95 * 2**30)
  assert (topologies.parse('v6e-256').chips, topologies.parse('v4-32').topology) == (256, 'v4:2x2x4')
  assert topologies.parse('v5e-16').topology == 'v5e:4x4'
  for bad in ('v5p-6', 'v7-8', 'h100', 'v5p'):
    with pytest.raises(ValueError, match='unknown TPU slice or GPU node; known: h100-8, h200-8'):
      topologies.parse(bad)


def test_missing_libtpu_is_one_clear_error(monkeypatch):
  real = topologies.importlib.util.find_spec
  monkeypatch.setattr(topologies.importlib.util, 'find_spec',
                      lambda name: None if name == 'libtpu' else real(name))
  with pytest.raises(ValueError, match=r'needs libtpu: pip install -e "\.\[tpu\]"'):
    topologies.check_libtpu()


def _small_config():
  """A DiT whose attention fits splash (head_dim 128), on 8 chips as fsdp 2 x tensor 2 x context 2."""
  c = tiny_config()
  c.model.width, c.model.num_heads, c.model.depth = 512, 4, 2
  c.data.num_frames, c.data.height, c.data.width = 4, 32, 32  # 2 x 8 x 8 = 128 tokens
  # One bucket: each train program here is compiled three times (with its 1- and 2-layer FLOP
  # probes), ~25 s each on 2 CPU cores; test_cli_compiles_the_demo_and_writes_its_report compiles a
  # train program per bucket of two.
  c.data.buckets = ((4, 32, 32),)
  c.batch_size = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = 1, 2, 2, 2
  c.model.context_parallel = 'all_to_all'
  return c


def _shard_bytes(tree) -> int:
  """Bytes one chip holds of sharded abstract arrays, from their shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


# libtpu's client threads, once a TPU topology is made in a process, starve XLA:CPU's 8 device
# threads on a 2-core machine: a later multi-device CPU program in the same process can miss its
# collectives' 40 s rendezvous and abort. So the in-process TPU compiles run in a child pytest.
IN_CHILD = os.environ.get('SORA_JAX_TPU_CHILD') == '1'
in_child = pytest.mark.skipif(not IN_CHILD, reason='runs in the child process of'
                              ' test_in_process_tpu_compiles')


def test_in_process_tpu_compiles():
  pytest.importorskip('libtpu')
  if IN_CHILD:
    return
  out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__,
                        '-k', 'tpu_slice or adapter_state_only'], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env=dict(os.environ, SORA_JAX_TPU_CHILD='1'))
  assert out.returncode == 0 and '2 passed' in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


@in_child
def test_train_and_sample_steps_compile_for_a_tpu_slice():
  pytest.importorskip('libtpu')
  config = _small_config()
  target = topologies.parse('v5p-16')  # 8 chips
  mesh = compile_cli.target_mesh(config, target, 1)
  assert dict(mesh.shape) == dict(data=1, fsdp=2, tensor=2, context=2)
  assert mesh.devices.flat[0].platform == 'tpu'
  entries = compile_cli.compile_all(config, mesh, target, ('train', 'sample'), count_flops=True)
  assert [e['name'] for e in entries] == ['train 4x32x32 batch 2',
                                          'sample step batch 2 (CFG: 4 model rows)']
  from sora_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  _, abstract, _ = state_lib.shardings(config, mesh)
  state_bytes = _shard_bytes(abstract)
  total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))
  assert state_bytes < total / 4  # params, EMA and moments really are split over the chips
  for e in entries:
    assert e['fits'] and 0 < e['hbm_bytes_per_chip'] < 2**30, e
    # The compiler's peak of live buffers: at least the arguments, at most XLA's summed sizes.
    upper = e['argument_bytes'] + e['output_bytes'] + e['xla_temp_bytes'] - e['alias_bytes']
    assert e['memory_source'] == 'compiler peak', e
    assert e['argument_bytes'] < e['hbm_bytes_per_chip'] <= upper, e
    assert e['temp_bytes'] == e['hbm_bytes_per_chip'] - e['argument_bytes'], e
    # Splash attention (Mosaic kernels) inside the all-to-all context parallelism.
    assert e['mosaic_kernels'] >= (3 if e['program'] == 'train' else 1), e
    assert e['model_flops'] > 0 and e['compiled_flops'] > 0 and 0 < e['estimated_mfu'] <= 1, e
    assert e['estimated_step_s'] > 0
    # Parameters sharded over fsdp x context (and tensor) are all-gathered; Ulysses all-to-alls.
    assert e['collective_bytes']['all-gather'] > 0 and e['collective_bytes']['all-to-all'] > 0
  for e in entries[:1]:
    # The donated train state is the program's argument (and aliased output), chip by chip: exactly
    # what the sharding plan puts on one chip, plus this chip's rows of the batch.
    assert state_bytes <= e['argument_bytes'] < state_bytes + 2**20, (e, state_bytes)
    assert e['alias_bytes'] >= state_bytes
    assert e['collective_bytes']['reduce-scatter'] + e['collective_bytes']['all-reduce'] > 0
  # Remat / backward: the compiled train step does more than the forward-only sampling step per row.
  assert entries[0]['compiled_flops'] > entries[1]['compiled_flops'] / 2



@in_child
def test_lora_train_and_sample_steps_compile_and_hold_adapter_state_only():
  """A LoRA run's donated state on a chip: the bf16 frozen base plus adapters with their EMA and
  Adam moments; the sample step takes the base and the EMA adapters."""
  pytest.importorskip('libtpu')
  config = _small_config()
  config.lora.rank, config.lora.base_dtype = 8, 'bfloat16'
  target = topologies.parse('v5p-16')
  mesh = compile_cli.target_mesh(config, target, 1)
  entries = compile_cli.compile_all(config, mesh, target, ('train', 'sample'), count_flops=False)
  from sora_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  _, abstract, _ = state_lib.shardings(config, mesh)
  assert {x.dtype for x in jax.tree.leaves(abstract['frozen'])} == {np.dtype('bfloat16')}
  state_bytes = _shard_bytes(abstract)
  train, sample = entries
  assert state_bytes <= train['argument_bytes'] < state_bytes + 2**20, (train, state_bytes)
  adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract['params']))
  frozen = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract['frozen']))
  assert train['trainable_params'] == adapters and train['num_params'] == adapters + frozen
  assert adapters < frozen / 10
  # The frozen base costs 4 FLOPs per token (no weight gradient), the adapters 6.
  from sora_jax.config import buckets as buckets_lib  # pylint: disable=g-import-not-at-top
  from sora_jax.training import metrics, steps  # pylint: disable=g-import-not-at-top
  spec = steps.batch_spec(config, buckets_lib.make(config, 2)[0])
  chips = mesh.devices.size
  assert train['model_flops'] == pytest.approx(
      metrics.model_flops(config, adapters, spec, frozen_params=frozen) / chips)
  assert train['model_flops'] < 0.8 * metrics.model_flops(config, adapters + frozen, spec) / chips
  assert sample['fits'] and sample['argument_bytes'] >= _shard_bytes(
      {k: abstract[k] for k in ('ema', 'frozen')})


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='')  # as a user runs it: the CLI picks the platforms
  return programs.run('sora_jax.compile', *args, cwd=ROOT, env=env, timeout=600)


def _report(tmp_path, *args):
  """Runs the CLI with `args` and a --report; (completed process, the report's JSON)."""
  report = tmp_path / 'report.json'
  r = _run(*args, f'--report={report}')
  assert r.returncode == 0, r.stderr[-3000:]
  return r, json.loads(report.read_text())


def test_cli_refuses_bad_topologies_and_meshes_in_one_line():
  pytest.importorskip('libtpu')
  demo = 'configs/demo.py'
  r = _run(f'--config={demo}', '--topology=v5p-7')
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
      "sora_jax.compile: error: --topology='v5p-7': unknown TPU slice"), r.stderr[-2000:]
  r = _run(f'--config={demo}', '--topology=v5p-8', '--config.mesh.fsdp=3')
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('sora_jax.compile: error: config.mesh') and '(on 1 x v5p-8: 4 chips)' in last
  r = _run(f'--config={demo}', '--topology=v5p-8', '--num_slices=2')
  assert r.returncode == 2 and 'dcn_data * dcn_fsdp = 1 must equal it' in r.stderr


def test_cli_compiles_the_demo_and_writes_its_report(tmp_path):
  pytest.importorskip('libtpu')
  r, got = _report(tmp_path, '--config=configs/demo.py', '--topology=v5e-16',
                   '--count_flops=false', '--config.mesh.data=-1',
                   '--config.data.buckets=((12,32,32),(4,32,48))')  # a train program per bucket
  assert 'v5e-16 (16 chips of 16.0 GiB HBM)' in r.stdout
  assert 'libtpu' not in r.stderr.lower() or 'error' not in r.stderr.lower()
  assert got['topology'] == 'v5e-16' and got['chips'] == 16
  names = [p['name'] for p in got['programs']]
  assert names == ['train 12x32x32 batch 16', 'train 4x32x48 batch 16',
                   'sample step batch 16 (CFG: 32 model rows)'], names
  for p in got['programs']:
    for key in ('name', 'fits', 'hbm_bytes_per_chip', 'argument_bytes', 'output_bytes',
                'temp_bytes', 'model_flops', 'estimated_step_s', 'estimated_mfu'):
      assert key in p, key
    assert p['fits']


@pytest.mark.slow  # needs the cuda-compile extra (the CUDA PJRT plugin, ~180 MB), not in CI
def test_cli_compiles_for_a_gpu_node_without_a_gpu(tmp_path):
  pytest.importorskip('jax_cuda12_plugin')
  _, got = _report(tmp_path, '--config=configs/demo.py', '--topology=h100-8', '--count_flops=false',
                   '--config.mesh.data=-1')
  assert got['chips'] == 8 and all(p['fits'] for p in got['programs'])
  assert got['programs'][0]['argument_bytes'] > 0


@pytest.mark.slow  # ~10 minutes on 2 CPU cores: the real 1.3B architecture at 480p x 81 frames
def test_wan_1_3b_fits_v5p_8(tmp_path):
  pytest.importorskip('libtpu')
  _, got = _report(tmp_path, '--config=configs/wan2_1_t2v_1_3b.py', '--topology=v5p-8',
                   '--programs=train', '--count_flops=false')
  (train,) = got['programs']
  # 1.42B parameters x 16 bytes (weights, EMA, two moments) over 4 chips = 5.3 GiB of arguments.
  assert train['fits'] and 5.0 * 2**30 < train['argument_bytes'] < 6.0 * 2**30, train
  assert train['hbm_bytes_per_chip'] < 20 * 2**30 and train['mosaic_kernels'] >= 3, train

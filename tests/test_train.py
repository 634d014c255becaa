"""End to end on a tiny config: train, exact resume, sample CLI, evaluate."""

import json
import os
import shutil
import sys

import av
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sora_jax import train
from sora_jax.common import video_io
from sora_jax.config import validation
from sora_jax.evaluation import suite
from sora_jax.inference import restore, sampling
from sora_jax.parallel import sharding
from sora_jax.training import checkpoint
from sora_jax.training import state as state_lib

sys.path.insert(0, os.path.dirname(__file__))
import programs  # noqa: E402


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def trained(tiny_run):
  return tiny_run  # (tiny_config(), its trained workdir): conftest.py, shared with other modules


def test_training_writes_metrics_checkpoints_and_samples(trained):
  config, workdir = trained
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows] == list(range(1, 7))
  for r in rows:
    assert {'step', 'loss', 'grad_norm', 'learning_rate', 'steps_per_second'} <= set(r)
    assert np.isfinite(r['loss']) and r['grad_norm'] > 0
  assert rows[0]['learning_rate'] == 0.0 and rows[2]['learning_rate'] > 0  # warm-up
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '6']
  assert any(f.startswith('events') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  with open(os.path.join(workdir, 'samples', 'step_6', 'samples.json')) as f:
    samples = json.load(f)['samples']
  assert len(samples) == config.num_train_samples
  assert video_io.read_video(samples[0]['path']).shape == (4, 16, 16, 3)


def test_resume_after_crash_is_bit_exact(trained, tmp_path):
  config, workdir = trained
  # A crash after the step-2 checkpoint: later checkpoints never happened, later logs are stale.
  crashed = str(tmp_path / 'crashed')
  shutil.copytree(workdir, crashed)
  for step in ('4', '6'):
    shutil.rmtree(os.path.join(crashed, 'checkpoints', step))
  mngr = checkpoint.manager(crashed, read_only=True)
  assert checkpoint.saved_process_count(mngr) == 1  # the checkpoint's 'layout' item
  shutil.rmtree(os.path.join(crashed, 'checkpoints', '2', 'layout'))  # as written before it existed
  assert checkpoint.saved_process_count(mngr) == 1  # from Grain's per-process files
  train.train(config, crashed)
  timing = ('steps_per_second', 'tflops_per_device', 'mfu')
  strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
  assert strip(read_metrics(crashed)) == strip(read_metrics(workdir))


def test_loss_decreases(tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 60, 10, 60
  config.optim.learning_rate, config.optim.warmup_steps = 2e-3, 5
  train.train(config, str(tmp_path))
  losses = [r['loss'] for r in read_metrics(str(tmp_path))]
  assert losses[-1] < 0.7 * losses[0], losses


def test_sample_cli_writes_playable_h264(trained, tmp_path):
  _, workdir = trained
  prompts = ['a red circle moving left', 'a blue square moving up', 'a green triangle moving down']
  out = programs.run(
      'sora_jax.sample', f'--workdir={workdir}', '--output_dir', str(tmp_path), '--num_steps=2',
      '--batch_size=2', '--seed=3', *[f'--prompt={p}' for p in prompts])
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / 'samples.json') as f:
    samples = json.load(f)['samples']
  assert [s['prompt'] for s in samples] == prompts
  for s in samples:
    with av.open(s['path']) as container:
      stream = container.streams.video[0]
      assert stream.codec_context.name == 'h264' and stream.codec_context.pix_fmt == 'yuv420p'
      frames = [f.to_ndarray(format='rgb24') for f in container.decode(stream)]
    assert len(frames) == 4 and frames[0].shape == (16, 16, 3)


def test_sampling_is_deterministic_per_prompt(trained):
  _, workdir = trained
  config, mesh, graphdef, params, _ = restore.load(workdir)
  generate = sampling.make_generate(graphdef, config, num_steps=2, guidance_scale=3.0)
  prompts = ['a red circle moving left', 'a blue square moving up', 'a white circle moving down']
  kw = dict(config=config, mesh=mesh, seed=5)
  together = sampling.generate_videos(generate, params, prompts, batch_size=8, **kw)
  assert together.shape == (3, 4, 16, 16, 3) and together.dtype == np.uint8
  assert not np.array_equal(together[0], together[1])
  again = sampling.generate_videos(generate, params, prompts, batch_size=8, **kw)
  np.testing.assert_array_equal(together, again)
  # Noise is keyed by the prompt's position in the call, not by the batch it lands in.
  chunked = sampling.generate_videos(generate, params, prompts, batch_size=1, **kw)
  np.testing.assert_array_equal(together, chunked)


def test_evaluate_reports_loss_and_adherence(trained, tmp_path):
  _, workdir = trained
  output = str(tmp_path / 'eval.json')
  result = suite.evaluate(workdir, output, num_steps=2)
  with open(output) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  for split, n in (('seen', 17 * 4), ('held_out', 4 * 4)):
    assert result[split]['flow_matching_loss']['mean'] > 0
    assert len(result[split]['flow_matching_loss']['by_t']) == 2
    adherence = result[split]['adherence']
    assert adherence['num_videos'] == n
    assert set(adherence['rates']) == {'color', 'shape', 'direction', 'stable', 'size', 'all'}
    assert all(os.path.exists(v['path']) for v in adherence['videos'])


def _spy_reads(monkeypatch):
  """The names of the arrays Orbax reads from a checkpoint (its 'state' item), in a list."""
  names, deserialize = [], ocp.type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    names.extend(info.name for info in infos)
    return await deserialize(self, infos, args)
  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, 'deserialize', spy)
  return names


def test_restore_reads_only_the_used_parameters_fsdp_sharded(trained, monkeypatch):
  """Sampling, evaluation and init_from read one parameter tree (not the optimizer moments or the
  other copy), FSDP-sharded over all devices, with the values a full restore gives."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  _, workdir = trained
  reads = _spy_reads(monkeypatch)
  config, mesh, _, ema, step = restore.load(workdir)
  assert step == 6 and reads and {n.split('.')[0] for n in reads} == {'ema'}
  reads.clear()
  _, _, _, params, _ = restore.load(workdir, use_ema=False)
  assert reads and {n.split('.')[0] for n in reads} == {'params'}
  # On all 8 devices, the 'embed' axes split over fsdp.
  assert dict(mesh.shape) == dict(data=1, fsdp=8, tensor=1, context=1)
  big = max(jax.tree.leaves(ema), key=lambda x: x.size)
  assert 'fsdp' in jax.tree.leaves(tuple(big.sharding.spec))
  assert big.addressable_shards[0].data.size * 8 == big.size
  # The same values as a full restore of the train state.
  _, abstract, _ = state_lib.shardings(config, mesh)
  full = checkpoint.restore(checkpoint.manager(workdir, read_only=True), abstract)
  for key, restored in (('ema', ema), ('params', params)):
    for a, b in zip(jax.tree.leaves(full[key]), jax.tree.leaves(restored), strict=True):
      np.testing.assert_array_equal(a, b)
  # init_from a sora_jax workdir: the EMA alone, onto the new run's shardings.
  config = tiny_config()
  config.init_from = workdir
  mesh = sharding.make_mesh(validation.validate(config, jax.device_count()))
  _, state, state_sh = state_lib.init(config, mesh)
  reads.clear()
  state = state_lib.init_from(config, state, state_sh)
  assert reads and {n.split('.')[0] for n in reads} == {'ema'}
  for a, b in zip(jax.tree.leaves(full['ema']), jax.tree.leaves(state['params']), strict=True):
    np.testing.assert_array_equal(a, b)

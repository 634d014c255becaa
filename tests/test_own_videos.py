"""README "Your own videos, end to end", as a user runs it: a folder of real H.264 clips and captions
-> inspect -> prepare --cache_latents --cache_text -> LoRA fine-tune of a (tiny random) Wan pipeline
folder with validation prompts -> evaluate on held-out clips -> export for diffusers / ComfyUI."""

import csv
import glob
import json
import os

import numpy as np
import programs
import test_latent
from safetensors.numpy import load_file

from data_pipelines import example_videos
from sora_jax.interop import wan_lora
from sora_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/wan2_1_t2v_1_3b_lora.py at the tiny pipeline's dimensions (test_latent.wan_config).
TINY = ['--config.model.wan.num_attention_heads=2', '--config.model.wan.attention_head_dim=16',
        '--config.model.wan.ffn_dim=64', '--config.model.wan.num_layers=2',
        '--config.model.wan.freq_dim=32', '--config.model.dtype=float32',
        '--config.model.remat=none', '--config.data.num_frames=5', '--config.data.height=32',
        '--config.data.width=32', '--config.data.fps=8', '--config.text.max_length=16',
        '--config.diffusion.shift_base_tokens=8', '--config.batch_size=8',
        '--config.mesh.data=1', '--config.mesh.fsdp=-1', '--config.mesh.context=1']


def run(module, *args):
  out = programs.run(module, *args, cwd=ROOT, timeout=300)
  assert out.returncode == 0, (module, out.stderr[-4000:])
  return out


def test_own_videos_end_to_end(tmp_path):
  pipe = test_latent.wan_pipeline(tmp_path / 'Wan-tiny')
  config = [f'--config={ROOT}/configs/wan2_1_t2v_1_3b_lora.py:{pipe}', *TINY]
  manifest = example_videos.write_examples(str(tmp_path / 'videos'), num_videos=10, num_images=0)
  with open(manifest) as f:
    rows = list(csv.DictReader(f))
  for name, part in (('train.csv', rows[:8]), ('held_out.csv', rows[8:])):
    with open(tmp_path / 'videos' / name, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=['path', 'caption'])
      writer.writeheader()
      writer.writerows(part)
  train_csv, held_out = str(tmp_path / 'videos' / 'train.csv'), str(tmp_path / 'videos' / 'held_out.csv')

  run('data_pipelines.inspect', *config, f'--config.data.manifest={train_csv}', '--num_batches=2',
      f'--report={tmp_path / "inspect.json"}')
  report = json.loads((tmp_path / 'inspect.json').read_text())
  assert report['error'] is None and report['skipped_counts'] == {}
  assert [(b['rows'], b['batches_per_epoch']) for b in report['buckets']] == [(8, 1)]
  prepared = str(tmp_path / 'prepared')
  run('sora_jax.prepare', *config, f'--manifest={train_csv}', f'--output_dir={prepared}',
      '--cache_latents', '--cache_text')
  index = json.loads(open(os.path.join(prepared, 'index.json')).read())
  assert index['num_rows'] == 8 and set(index['cached']) == {'latents', 'text'}

  workdir = str(tmp_path / 'runs' / 'mine_lora')
  run('sora_jax.train', *config, f'--config.data.prepared={prepared}', f'--workdir={workdir}',
      "--config.sample.prompts=('a dog runs along a beach', 'a red car turns left')",
      '--config.total_steps=4', '--config.sample_every_steps=2', '--config.checkpoint_every_steps=2',
      '--config.log_every_steps=1', '--config.optim.warmup_steps=1', '--config.sample.num_steps=2')
  # Validation samples of the config's prompts, on disk and in TensorBoard beside the loss.
  for step in (2, 4):
    assert len(glob.glob(f'{workdir}/samples/step_{step}/*.mp4')) == 2, step
  events = b''.join(open(p, 'rb').read() for p in glob.glob(f'{workdir}/tensorboard/*'))
  assert b'samples/0' in events and b'samples/1' in events and b'a dog runs along a beach' in events
  losses = [json.loads(l) for l in open(f'{workdir}/metrics.jsonl') if '"loss"' in l]
  assert len(losses) == 4 and all(np.isfinite(l['loss']) for l in losses)

  out = tmp_path / 'eval.json'
  run('sora_jax.evaluate', f'--workdir={workdir}', f'--eval_data={held_out}', f'--output={out}')
  result = json.loads(out.read_text())
  assert result['num_examples'] == 2 and np.isfinite(result['flow_loss'])
  assert len(result['flow_loss_by_t']) >= 2 and 'adherence' not in result

  lora_file = str(tmp_path / 'mine_lora.safetensors')
  run('sora_jax.export', f'--workdir={workdir}', f'--output={lora_file}', '--format=lora')
  keys = load_file(lora_file).keys()
  assert 'diffusion_model.blocks.0.self_attn.q.lora_A.weight' in keys  # what diffusers reads
  with open(os.path.join(pipe, 'transformer', 'config.json')) as f:
    adapters, rank, alpha = wan_lora.import_lora(lora_file, json.load(f))
  assert (rank, alpha) == (32, 32.0) and ('blocks', 'ffn', 'up') in adapters
  assert checkpoint.saved_base(checkpoint.manager(workdir, read_only=True), 4)['init_from'] == pipe

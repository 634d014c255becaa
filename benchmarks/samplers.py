r"""Prompt adherence and wall time per ODE sampler and step count, on a trained shapes run.

  python benchmarks/samplers.py --workdir=runs/demo --output_dir=runs/samplers_bench \
      [--samplers=euler,heun,dpm++2m] [--steps=8,16,32] [--guidance_scale=4] [--negative_prompt=]

For each (sampler, steps) it runs `evaluate`'s adherence protocol (every seen / held-out (colour,
shape) pair x direction x config.eval.samples_per_prompt, one video each, written as mp4, decoded and
judged), with the same seed for all, so rows differ only by the solver. The checkpoint is loaded once.
Prints a table and writes OUTPUT_DIR/results.json (judged videos under OUTPUT_DIR/videos/).

Model calls per video (each on the doubled CFG batch): euler N, heun 2N - 1, dpm++2m N. Times: the
first batch (compilation + one batch), then generation of both splits after it (steady state; mp4
writing and judging excluded). ODE error: RMS distance, in model space (pixels in [-1, 1]), of the
first batch's samples from the same noise solved with Heun at --reference_steps: how far each solver
is from the exact ODE solution, which adherence (a few hundred judged videos) resolves coarsely.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sora_jax.common import video_io
from sora_jax.diffusion import flow, samplers
from sora_jax.evaluation import adherence
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import restore, sampling
from sora_jax.parallel import sharding
from sora_jax.training import checkpoint

flags.DEFINE_string('workdir', None, 'Trained shapes run (config.json + checkpoints/); read only.')
flags.DEFINE_string('output_dir', None, 'Where results.json and the judged videos go.')
flags.DEFINE_list('samplers', list(samplers.SAMPLERS), 'Solvers to compare.')
flags.DEFINE_list('steps', ['8', '16', '32'], 'Step counts.')
flags.DEFINE_float('guidance_scale', None, 'CFG scale (default: config.sample.guidance_scale).')
flags.DEFINE_string('negative_prompt', None, 'Negative prompt (default: the empty caption).')
flags.DEFINE_enum('guidance_schedule', None, list(flow.GUIDANCE_SCHEDULES), 'CFG scale schedule.')
flags.DEFINE_list('guidance_interval', None, 'lo,hi for --guidance_schedule=interval.')
flags.DEFINE_integer('seed', 0, 'Noise seed (as evaluate --seed).')
flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint (default: latest).')
flags.DEFINE_integer('reference_steps', 128, 'Heun steps of the ODE-error reference.')

KEYS = ('color', 'shape', 'direction', 'stable', 'size', 'all')


def first_batch(config, mesh, frozen, prompts, seed):
  """The model inputs of generate_videos' first batch (same prompts, same noise keys)."""
  tokens, mask = frozen.tokenize(prompts)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
      jnp.arange(len(prompts)))
  tokens, mask, keys = jax.device_put((tokens, mask, keys), sharding.batch_sharding(mesh))
  return (*frozen.caption_inputs(tokens, mask), keys)


def run_one(generate, params, config, mesh, frozen, videos_dir, seed, batch, reference):
  """Adherence rates per split, timings and the ODE error for one compiled `generate`."""
  prompts = {name: adherence.adherence_prompts(split, config.eval.samples_per_prompt)
             for name, split in adherence.SPLITS.items()}
  kw = dict(config=config, mesh=mesh, seed=seed, batch_size=config.eval.batch_size, frozen=frozen)
  start = time.perf_counter()
  first = np.asarray(generate(params, *batch))
  row = {'first_batch_s': time.perf_counter() - start, 'generate_s': 0.0, 'num_videos': 0,
         'ode_error': float(np.sqrt(np.mean(np.square(first - reference))))}
  for name, split_prompts in prompts.items():
    start = time.perf_counter()
    videos = sampling.generate_videos(generate, params, split_prompts, **kw)
    row['generate_s'] += time.perf_counter() - start
    row['num_videos'] += len(split_prompts)
    samples = video_io.write_videos(videos, split_prompts, os.path.join(videos_dir, name),
                                    fps=config.data.fps)
    row[name] = adherence.adherence(samples)['rates']
  return row


def table(rows) -> str:
  head = (f'{"sampler":8} {"steps":>5} {"calls":>5} | ' + ' '.join(f'{k:>5.5}' for k in KEYS)
          + ' | ' + ' '.join(f'{k:>5.5}' for k in KEYS) + ' | ode_err first_s  gen_s  s/video')
  lines = [f'{"":21} | {"seen":^29} | {"held-out":^29} |', head, '-' * len(head)]
  for r in rows:
    lines.append(f'{r["sampler"]:8} {r["num_steps"]:5d} {r["model_calls"]:5d} | '
                 + ' '.join(f'{r["seen"][k]:5.2f}' for k in KEYS) + ' | '
                 + ' '.join(f'{r["held_out"][k]:5.2f}' for k in KEYS)
                 + f' | {r["ode_error"]:7.4f} {r["first_batch_s"]:7.1f} {r["generate_s"]:6.1f} '
                 + f'{r["generate_s"] / r["num_videos"]:8.3f}')
  return '\n'.join(lines)


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  f = flags.FLAGS
  config, mesh, graphdef, params, step = restore.load(f.workdir, step=f.checkpoint_step)
  frozen = frozen_lib.Frozen(config)
  interval = tuple(float(v) for v in f.guidance_interval) if f.guidance_interval else None
  os.makedirs(f.output_dir, exist_ok=True)
  out_path = os.path.join(f.output_dir, 'results.json')
  options = dict(guidance_scale=f.guidance_scale, negative_prompt=f.negative_prompt,
                 guidance_schedule=f.guidance_schedule, guidance_interval=interval)
  prompts = adherence.adherence_prompts('train', config.eval.samples_per_prompt)
  batch = first_batch(config, mesh, frozen, prompts[:config.eval.batch_size], f.seed)
  with jax.set_mesh(mesh):
    reference = np.asarray(sampling.make_generate(
        graphdef, config, frozen=frozen,
        **sampling.settings(config, num_steps=f.reference_steps, sampler='heun', **options))(
            params, *batch))
  rows = []
  for name in f.samplers:
    for num_steps in (int(n) for n in f.steps):
      settings = sampling.settings(config, num_steps=num_steps, sampler=name, **options)
      generate = sampling.make_generate(graphdef, config, frozen=frozen, **settings)
      videos_dir = os.path.join(f.output_dir, 'videos', f'{name}_{num_steps}')
      with jax.set_mesh(mesh):
        row = run_one(generate, params, config, mesh, frozen, videos_dir, f.seed, batch, reference)
      rows.append({**settings, 'model_calls': samplers.model_calls(name, num_steps), **row})
      print(table(rows[-1:]).splitlines()[-1], flush=True)
      with open(out_path, 'w') as fp:
        json.dump({'workdir': os.path.abspath(f.workdir), 'step': step, 'seed': f.seed,
                   'device': jax.devices()[0].device_kind,
                   'reference': f'heun, {f.reference_steps} steps', 'rows': rows}, fp, indent=2)
  print(f'\n{f.workdir} step {step}, seed {f.seed}, {jax.devices()[0].device_kind};'
        f' ode_err vs heun at {f.reference_steps} steps')
  print(table(rows))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'output_dir'])
  app.run(main)

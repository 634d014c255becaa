r"""Samples videos from a trained run.

  python -m sora_jax.sample --workdir=runs/demo --prompt="a red circle moving left" \
      --prompt="a green square moving up" --output_dir=out [--sampler=dpm++2m --num_steps=16]
      [--negative_prompt="a blue triangle"]
      [--guidance_schedule=interval --guidance_interval=0.2,0.8]

Writes one H.264 mp4 per prompt and OUT/samples.json = {"samples": [{"prompt", "path"}, ...]}.
"""

import jax
from absl import app, flags, logging

from sora_jax import checkpoint, restore, sampling
from sora_jax import frozen as frozen_lib


def define_flags():
  """Defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints/).')
  flags.DEFINE_multi_string('prompt', None, 'Text prompt; repeat the flag for several videos.')
  flags.DEFINE_string('output_dir', None, 'Where the mp4 files and samples.json go.')
  flags.DEFINE_integer('seed', 0, 'Noise seed; video i uses fold_in(seed, i).')
  sampling.define_sampler_flags()
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint to load (default: latest).')
  flags.DEFINE_bool('use_ema', True, 'Sample with the EMA parameters.')
  flags.DEFINE_integer('batch_size', 16, 'Videos generated per compiled call.')


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  f = flags.FLAGS
  config, mesh, graphdef, params, step = restore.load(f.workdir, step=f.checkpoint_step,
                                                      use_ema=f.use_ema)
  try:
    options = sampling.settings(config, **sampling.flag_values())
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  logging.info('Sampling %d prompts from step %d (%s).', len(f.prompt), step, options)
  if config.model.family == 'vae':
    raise app.UsageError(f'{f.workdir} holds an autoencoder (model.family=vae), not a text-to-video'
                         ' model; use it as --config.autoencoder of a DiT run.')
  frozen = frozen_lib.Frozen(config)
  generate = sampling.make_generate(graphdef, config, frozen=frozen, **options)
  with jax.set_mesh(mesh):
    videos = sampling.generate_videos(generate, params, f.prompt, config=config, mesh=mesh,
                                      seed=f.seed, batch_size=f.batch_size, frozen=frozen)
  if jax.process_index() == 0:
    samples = sampling.write_videos(videos, f.prompt, f.output_dir, fps=config.data.fps)
    for s in samples:
      print(s['path'])


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['workdir', 'prompt', 'output_dir'])
  app.run(main)

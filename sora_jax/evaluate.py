r"""Evaluates a trained run: held-out flow-matching loss and (shapes) prompt adherence from pixels.

  python -m sora_jax.evaluate --workdir=runs/demo --output=runs/demo/eval.json \
      [--sampler=dpm++2m --num_steps=16 --negative_prompt=... --guidance_schedule=linear]

Loss: mean velocity MSE on fresh clips (seed disjoint from training) at a fixed timestep grid with fixed
noise, for seen and held-out (colour, shape) pairs. Adherence: one video per prompt (every pair x every
direction x eval.samples_per_prompt), written as mp4, decoded again and judged by
`data_pipelines.shapes.judge_clip`: colour, shape, direction, and a stable object in every frame.
Runs trained with config.condition.mix also get image-to-video, forward extension and 4x-length
sliding-window videos judged, with temporal consistency at window boundaries
(sora_jax/evaluation/conditioned.py; --conditioned=image_to_video,extension,long_video,
long_video_from_image or none).
Upscaler runs (config.upscale.factor > 1): PSNR of the upscaled eval clips (and of bilinear
upsampling) against the real ones, plus the judged adherence of the upscaled mp4s;
--upscale_workdir=UP on a base run judges the base model's videos after that upscaler.
Runs trained on user data (config.data.manifest / prepared / tfds_name, LoRA or not): no shapes
judge, nothing sampled; the flow loss at the same fixed timestep grid with fixed noise, by flow
time, on held-out videos: --eval_data=held_out.csv (a manifest, or a folder `python -m
sora_jax.prepare` wrote like the training data's); without it, on the training data (reported:
eval_split 'train'). sora_jax/evaluation/user_data.py.
"""

from absl import flags

from data_pipelines import bucketed
from sora_jax import cli
from sora_jax.config import schema
from sora_jax.evaluation import adherence, suite, user_data
from sora_jax.inference import restore, sampling, upscale
from sora_jax.training import checkpoint


def define_flags():
  """Defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string('workdir', None, 'Training workdir.')
  flags.DEFINE_string('output', None, 'JSON file for the results.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint to evaluate (default: latest).')
  flags.DEFINE_integer('seed', 0, 'Sampling noise seed.')
  cli.define_sampler_flags()
  flags.DEFINE_bool('flow_loss', True, 'Also measure the held-out flow-matching loss (it does not'
                    ' depend on the sampling flags).')
  flags.DEFINE_bool('use_ema', True, 'Evaluate the EMA parameters.')
  flags.DEFINE_string('videos_dir', None, 'Where judged videos go (default: next to --output).')
  flags.DEFINE_string('upscale_workdir', None, 'An upscaler run (config.upscale.factor > 1): judge'
                      ' the base videos after upscaling them with it (what sample'
                      ' --upscale_workdir writes).')
  cli.define_noise_flag()
  flags.DEFINE_string('eval_data', None, 'A run trained on user data: its held-out videos, a'
                      ' manifest (.csv / .jsonl) or a prepared folder like its training data'
                      ' (default: the training data itself, reported as eval_split "train").')
  flags.DEFINE_list('conditioned', ['image_to_video', 'extension', 'long_video',
                                    'long_video_from_image'],
                    'Conditioned protocols judged on runs trained with config.condition.mix'
                    ' (sora_jax/evaluation/conditioned.py); "none" for none.')


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  f = flags.FLAGS
  with cli.user_errors():  # every input checked before restoring and compiling anything
    options = cli.flag_values()
    suite.check_options(f.conditioned, f.upscale_noise)
    config = schema.load_config(f.workdir)
    user_data.check_options(config, f.eval_data, flow_loss=f.flow_loss,
                            upscale_workdir=f.upscale_workdir)
    sampling.settings(config, **options)
    restore.find_step(f.workdir, f.checkpoint_step)
    if f.upscale_workdir:
      upscale.Upscaler(f.upscale_workdir, noise=f.upscale_noise).check_input(
          config.data.num_frames, config.data.height, config.data.width)
  try:
    result = suite.evaluate(f.workdir, f.output, step=f.checkpoint_step, seed=f.seed,
                            use_ema=f.use_ema, videos_dir=f.videos_dir, flow_loss=f.flow_loss,
                            conditioned=f.conditioned, upscale_workdir=f.upscale_workdir,
                            upscale_noise=f.upscale_noise, eval_data=f.eval_data, **options)
  except bucketed.TooManySkips as e:  # --eval_data's rows: the user's data, not a bug
    raise cli.UserError(cli.one_line(e)) from e
  if 'flow_loss' in result:  # a user-data run
    print('flow loss', round(result['flow_loss'], 4), 'on', result['num_examples'],
          result['eval_split'], 'examples; by t',
          {t: round(l, 4) for t, l in result['flow_loss_by_t'].items()})
    return
  for name in adherence.SPLITS:
    if 'reconstruction' in result[name]:
      print(name, result[name]['reconstruction'])
    elif 'upscaling' in result[name]:
      print(name, result[name]['upscaling']['rates'], 'PSNR dB',
            result[name]['upscaling']['psnr_db'])
    elif 'flow_matching_loss' in result[name]:
      print(name, 'loss', round(result[name]['flow_matching_loss']['mean'], 4),
            result[name]['adherence']['rates'])
    else:
      print(name, result[name]['adherence']['rates'])
  for name, splits in result.get('conditioned', {}).items():
    for split, r in splits.items():
      print(name, split, r['rates'], 'jump rate', r['continuity']['jump_rate'])


if __name__ == '__main__':
  cli.run(main, define_flags, required=['workdir', 'output'])

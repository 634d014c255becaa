from absl import flags

from sora_jax.diffusion import flow, samplers


def define_noise_flag():
  """`--upscale_noise`, shared by sample and evaluate."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_float('upscale_noise', None, 'Flow time in [0, 1) the upscaler noises its'
                     ' low-resolution input to (default: its config.upscale.sample_noise); higher'
                     ' trusts the base video less. Keep it within the noise_aug it was trained with.')


def define_sampler_flags():
  """The sampling flags shared by the `sample` and `evaluate` programs (unset: config.sample's)."""
  flags.DEFINE_integer('num_steps', None, 'ODE steps (default: config.sample.num_steps).')
  flags.DEFINE_float('guidance_scale', None, 'CFG scale (default: config.sample.guidance_scale).')
  flags.DEFINE_enum('sampler', None, list(samplers.SAMPLERS),
                    'ODE solver (default: config.sample.sampler, else euler). Model calls per video'
                    ' for N steps: euler N, heun 2N - 1, dpm++2m N.')
  flags.DEFINE_string('negative_prompt', None, 'Caption CFG guides away from (default:'
                      ' config.sample.negative_prompt, else the empty caption).')
  flags.DEFINE_enum('guidance_schedule', None, list(flow.GUIDANCE_SCHEDULES),
                    'CFG scale over flow time t: constant; linear (scale at t=1 down to 1 at t=0);'
                    ' interval (scale inside --guidance_interval, 1 outside).')
  flags.DEFINE_list('guidance_interval', None, 'lo,hi in flow time for --guidance_schedule=interval'
                    ' (default: config.sample.guidance_interval, else 0,1).')


def flag_values() -> dict:
  """The flags of `define_sampler_flags` as `settings` keywords (None where unset)."""
  f = flags.FLAGS
  interval = f.guidance_interval
  if interval is not None:
    if len(interval) != 2:
      raise ValueError(f'--guidance_interval={",".join(interval)} must be two numbers, lo,hi.')
    interval = tuple(float(v) for v in interval)
  return {'num_steps': f.num_steps, 'guidance_scale': f.guidance_scale, 'sampler': f.sampler,
          'negative_prompt': f.negative_prompt, 'guidance_schedule': f.guidance_schedule,
          'guidance_interval': interval}

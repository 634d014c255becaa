"""What the programs (train, sample, evaluate, prepare) share: their sampling flags, and how a user's
mistake ends: one line on stderr, `PROGRAM: error: what is wrong`, and exit status 2, never a
traceback or a screen of --help. Errors that are not the user's (a bug, a crashed device) keep their
traceback.
"""

import contextlib
import os
import sys

from absl import app, flags

from sora_jax.diffusion import flow, samplers
from sora_jax.parallel import topologies
from sora_jax.training import checkpoint


class UserError(Exception):
  """A mistake in what the user asked for (flags, config, paths): reported as one line."""


@contextlib.contextmanager
def user_errors():
  """Inputs checked inside this block that raise ValueError / FileNotFoundError are the user's."""
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    raise UserError(one_line(e)) from e


def one_line(error) -> str:
  """An exception's message on one line (a KeyError's without its quotes)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return ' '.join(line.strip() for line in str(message).splitlines() if line.strip())


def program() -> str:
  """`sora_jax.train` for `python -m sora_jax.train` (sys.argv[0] is then the file's path)."""
  path = sys.argv[0] if sys.argv else 'sora_jax'
  name = os.path.splitext(os.path.basename(path))[0]
  parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
  return f'{parent}.{name}' if parent == 'sora_jax' else name


def fail(message):
  text = one_line(message) if isinstance(message, BaseException) else message
  sys.stderr.write(f'{program()}: error: {text}\n')
  sys.exit(2)


def _config_error(error) -> str:
  """What went wrong in a --config file or override, from ml_collections' chain of exceptions."""
  chain = []
  while error is not None:
    chain.append(error)
    error = error.__cause__ or error.__context__
  keys = [e for e in chain if isinstance(e, KeyError)]
  if keys:  # a misspelt key: ml_collections' own suggestion, if it made one
    hinted = [e for e in keys if 'Did you mean' in one_line(e)]
    return 'unknown key ' + one_line((hinted or keys)[0])
  return one_line(chain[0])


def _parse_flags(argv, required):
  try:
    argv = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:
      hasattr(flags.FLAGS.config, 'to_json')  # a config file that failed to load raises here
    missing = [n for n in required if flags.FLAGS[n].value is None]
  except flags.Error as e:
    fail(e)
  except (OSError, KeyError, AttributeError, TypeError, ValueError) as e:  # a --config file/override
    fail(f'--config: {_config_error(e)}')
  if missing:
    fail(f'{", ".join("--" + n for n in missing)} required (--helpshort lists the flags).')
  return argv


def run(main, define_flags, required=()):
  """absl's app.run for a program: flags defined here (so modules import cleanly), flag errors,
  UserErrors and a checkpoint the user named that does not restore, from `main`, as one line."""
  topologies.skip_absent_tpu()
  topologies.enough_cpu_threads()
  define_flags()

  def checked_main(argv):
    try:
      main(argv)
    except (UserError, checkpoint.DamagedCheckpoint) as e:
      fail(e)

  app.run(checked_main, flags_parser=lambda argv: _parse_flags(argv, required))


def define_noise_flag():
  """`--upscale_noise`, shared by sample and evaluate."""
  flags.DEFINE_float('upscale_noise', None, 'Flow time in [0, 1) the upscaler noises its'
                     ' low-resolution input to (default: its config.upscale.sample_noise); higher'
                     ' trusts the base video less. Keep it within the noise_aug it was trained with.')


def define_sampler_flags():
  """The sampling flags shared by the `sample` and `evaluate` programs (unset: config.sample's)."""
  flags.DEFINE_integer('num_steps', None, 'ODE steps (default: config.sample.num_steps).')
  flags.DEFINE_float('guidance_scale', None, 'CFG scale (default: config.sample.guidance_scale).')
  flags.DEFINE_float('guidance_scale_2', None, 'Wan 2.2 A14B: the low-noise expert\'s CFG scale'
                     ' (default: config.sample.guidance_scale_2; 0: --guidance_scale).')
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
          'guidance_interval': interval, 'guidance_scale_2': f.guidance_scale_2}

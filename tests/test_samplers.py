"""ODE samplers (sora_jax/diffusion/samplers.py) on flows with a known solution, parity with
diffusers' schedulers, and classifier-free guidance with negative prompts and guidance schedules.

Fixture: tests/fixtures/gen_samplers.py (run with the torch reference venv; see its header).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.config import geometry
from sora_jax.diffusion import flow, samplers
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import sampling

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'samplers_io.npz')
MU, S = 0.5, 0.3
ORDERS = {'euler': 1, 'heun': 2, 'dpm++2m': 2}


def gaussian_velocity(x, t, mu=MU, s=S):
  """Rectified-flow velocity E[noise - x0 | x_t = x] for x0 ~ N(mu, s^2), noise ~ N(0, 1); t [B]."""
  t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
  var = (1 - t) ** 2 * s ** 2 + t ** 2
  return -mu + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * mu)


def gaussian_path(t, z, mu=MU, s=S):
  """The exact ODE solution through noise z at t = 1: x_t ~ N((1 - t) mu, var_t) is a monotone
  1-D transport of N(0, 1), so it keeps z's quantile."""
  return (1 - t) * mu + np.sqrt((1 - t) ** 2 * s ** 2 + t ** 2) * z


def test_the_analytic_flow_is_right():
  rng = np.random.default_rng(0)
  x0, noise = MU + S * rng.standard_normal(400_000), rng.standard_normal(400_000)
  for t in (0.2, 0.7):
    # The velocity is the least-squares regression of noise - x0 on x_t (linear: all Gaussian).
    slope, intercept = np.polyfit((1 - t) * x0 + t * noise, noise - x0, 1)
    x = np.array([0.0, 1.0])
    np.testing.assert_allclose(gaussian_velocity(x, np.full(2, t)), intercept + slope * x,
                               atol=0.01)
  # The path solves dx/dt = v.
  z, t, eps = np.linspace(-3, 3, 7), np.linspace(0.05, 0.95, 7), 1e-5
  deriv = (gaussian_path(t + eps, z) - gaussian_path(t - eps, z)) / (2 * eps)
  np.testing.assert_allclose(deriv, gaussian_velocity(gaussian_path(t, z), t), rtol=1e-6)


Z = jnp.linspace(-3.0, 3.0, 61)[:, None]
# Jitted once per solver: a schedule of the same length reuses the compilation.
SOLVE = {name: jax.jit(lambda x, ts, fn=fn: fn(gaussian_velocity, x, ts))
         for name, fn in samplers.SAMPLERS.items()}


def rms_error(name, timesteps):
  """RMS error over Z of `name` integrating the Gaussian flow along `timesteps` (exact start)."""
  t0, t1 = float(timesteps[0]), float(timesteps[-1])
  out = SOLVE[name](gaussian_path(t0, Z), timesteps)
  return float(jnp.sqrt(jnp.mean(jnp.square(out - gaussian_path(t1, Z)))))


def orders(name, grid, steps):
  errors = [rms_error(name, grid(n)) for n in steps]
  return [float(np.log2(a / b)) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize('name', list(ORDERS))
def test_error_falls_at_the_solvers_order(name):
  # Between t = 0.9 and 0.1 the solvers' error analysis applies: euler 0.98, 0.99; heun 1.98, 2.00;
  # dpm++2m 2.35, 2.33 (then 2.2, 2.1) when the steps double from 16 to 64.
  got = orders(name, lambda n: jnp.linspace(0.9, 0.1, n + 1), (16, 32, 64))
  assert all(abs(p - ORDERS[name]) < 0.4 for p in got), got


@pytest.mark.parametrize('name', list(ORDERS))
def test_order_on_the_whole_schedule(name):
  # From noise (t = 1) to data (t = 0) on the sampling schedule. DPM-Solver++ works in
  # lambda = log((1 - t) / t), where uniform-t steps near t = 0 stay O(1) long: its error there is
  # O(log N / N^2), measured order 1.76 at 256 -> 512 steps, 1.80 at 512 -> 1024.
  (got,) = orders(name, flow.sampling_schedule, (256, 512))
  assert got > ORDERS[name] - (0.3 if name == 'dpm++2m' else 0.1), got


def test_second_order_solvers_beat_euler_at_equal_model_calls():
  for n in (8, 16, 32):
    ts = lambda steps: flow.sampling_schedule(steps)
    euler_n, euler_2n = rms_error('euler', ts(n)), rms_error('euler', ts(2 * n - 1))
    assert rms_error('dpm++2m', ts(n)) < 0.6 * euler_n  # n calls each
    assert rms_error('heun', ts(n)) < 0.7 * euler_2n  # 2n - 1 calls each
  # With the shifted schedule too (SD3 shift 3). Heun's last step is Euler over the widest interval,
  # so it needs more steps there: at n = 8 and 16 it loses to Euler at equal calls.
  ts = lambda steps: flow.sampling_schedule(steps, 3.0)
  for n in (8, 16, 32):
    assert rms_error('dpm++2m', ts(n)) < rms_error('euler', ts(n))
  assert rms_error('heun', ts(32)) < 0.7 * rms_error('euler', ts(63))


@pytest.mark.parametrize('name', list(ORDERS))
def test_point_mass_is_exact(name):
  # Straight paths (data is one point): every solver lands exactly on it, whatever the step count.
  out = samplers.get(name)(lambda x, t: gaussian_velocity(x, t, 1.7, 0.0), Z,
                           flow.sampling_schedule(3, 3.0))
  np.testing.assert_allclose(out, np.full_like(Z, 1.7), atol=1e-5)


@pytest.mark.parametrize('name', list(ORDERS))
def test_one_model_call_site_and_the_times_it_is_called_at(name):
  traces, calls = [], []

  def velocity(x, t):
    traces.append(t)
    jax.debug.callback(lambda t: calls.append(float(t[0])), t, ordered=True)
    return -x

  ts = flow.sampling_schedule(4, 3.0)
  jax.block_until_ready(jax.jit(lambda z: samplers.get(name)(velocity, z, ts))(jnp.ones((2, 3))))
  jax.effects_barrier()
  assert len(traces) == 1  # the model is traced (and compiled) once
  assert len(calls) == samplers.model_calls(name, 4)
  ts = np.asarray(ts)
  # Heun: predict at t_i, correct at t_{i+1}, ..., Euler from t_{N-1}; the others: t_0 .. t_{N-1}.
  expected = np.concatenate([ts[:1], np.repeat(ts[1:-1], 2)]) if name == 'heun' else ts[:-1]
  np.testing.assert_allclose(calls, expected, rtol=1e-6)


MIXTURE = ((0.3, -1.0, 0.2), (0.7, 0.8, 0.4))  # as in fixtures/gen_samplers.py


def mixture_velocity(x, t):
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  logits, vs = [], []
  for w, mu, s in MIXTURE:
    var = (1 - t) ** 2 * s ** 2 + t ** 2
    d = x - (1 - t) * mu
    logits.append(np.log(w) - 0.5 * jnp.log(var) - 0.5 * d ** 2 / var)
    vs.append(-mu + (t - (1 - t) * s ** 2) / var * d)
  return (jax.nn.softmax(jnp.stack(logits), 0) * jnp.stack(vs)).sum(0)


@pytest.mark.parametrize('name,ref', [('euler', 'euler'), ('heun', 'heun'), ('dpm++2m', 'dpm')])
def test_matches_diffusers(name, ref):
  # FlowMatchEuler / FlowMatchHeun / DPMSolverMultistep(dpmsolver++, 2M, use_flow_sigmas) on their own
  # shifted sigmas, on a nonlinear (mixture) velocity field. Measured rel. L2 <= 5.4e-7.
  f = np.load(FIXTURE)
  for n in (6, 20):
    out = samplers.get(name)(mixture_velocity, jnp.asarray(f['noise']),
                             jnp.asarray(f[f'{ref}_{n}_sigmas']))
    want = f[f'{ref}_{n}_x0']
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-5


def test_unknown_sampler():
  with pytest.raises(ValueError, match="Unknown sampler 'ddim'.*dpm\\+\\+2m"):
    samplers.get('ddim')


def test_guidance_schedules():
  t = jnp.array([1.0, 0.6, 0.4, 0.2, 0.1, 0.0])
  assert flow.guidance_schedule(4.0) == 4.0
  np.testing.assert_allclose(flow.guidance_schedule(5.0, 'linear')(t),
                             [5.0, 3.4, 2.6, 1.8, 1.4, 1.0], rtol=1e-6)
  np.testing.assert_allclose(flow.guidance_schedule(5.0, 'interval', (0.2, 0.6))(t),
                             [1.0, 5.0, 5.0, 5.0, 1.0, 1.0])
  np.testing.assert_allclose(flow.guidance_schedule(5.0, 'hat')(jnp.array([1.0, 0.5, 0.25, 0.0])),
                             [1.0, 5.0, 4.0, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match='Unknown guidance schedule'):
    flow.guidance_schedule(5.0, 'cosine')
  with pytest.raises(ValueError, match='0 <= lo <= hi <= 1'):
    flow.guidance_schedule(5.0, 'interval', (0.7, 0.2))


def test_guided_velocity_scale_per_example():
  def model_fn(x, t):  # first half conditional (velocity 3), second half negative (1)
    b = x.shape[0] // 2
    return jnp.concatenate([jnp.full_like(x[:b], 3.0), jnp.full_like(x[b:], 1.0)])
  v = flow.guided_velocity(model_fn, flow.guidance_schedule(5.0, 'linear'))(
      jnp.zeros((3, 2, 2)), jnp.array([1.0, 0.5, 0.0]))
  np.testing.assert_allclose(v[:, 0, 0], [1 + 5.0 * 2, 1 + 3.0 * 2, 1 + 1.0 * 2])


class CaptionProbe(nnx.Module):
  """A 'model' whose velocity is a number read off the caption, so a sample shows which caption each
  half of the CFG batch saw: v = scale * mean(tokens)."""

  def __init__(self):
    self.scale = nnx.Param(jnp.asarray(0.01))

  def __call__(self, x, t, tokens, mask):
    m = mask.astype(jnp.float32)
    c = self.scale[...] * (tokens * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
    return jnp.broadcast_to(c.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)


def probe_velocity(frozen, probe, prompt):
  tokens, mask = frozen.tokenize([prompt])
  return float(probe(jnp.zeros((1, 1)), jnp.zeros(1), jnp.asarray(tokens), jnp.asarray(mask))[0, 0])


def test_make_generate_negative_prompt_schedule_and_sampler(config):
  frozen = frozen_lib.Frozen(config)
  probe = CaptionProbe()
  graphdef, params = nnx.split(probe)
  prompt, negative = 'a red circle moving left', 'a blue square moving up'
  tokens, mask = frozen.tokenize([prompt, prompt])
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  noise = jax.vmap(lambda k: jax.random.normal(k, frozen_lib.model_video_shape(config)))(keys)
  c, c_neg, c_null = (probe_velocity(frozen, probe, p) for p in (prompt, negative, ''))
  assert len({c, c_neg, c_null}) == 3

  def generate(**kw):
    kw = {'num_steps': 3, 'guidance_scale': 4.0, **kw}
    gen = sampling.make_generate(graphdef, config, frozen=frozen, **kw)
    return gen(params, jnp.asarray(tokens), jnp.asarray(mask), keys)

  # A velocity constant along the path: every solver integrates it exactly, x0 = noise - v.
  np.testing.assert_allclose(generate(), noise - (c_null + 4.0 * (c - c_null)), atol=1e-5)
  np.testing.assert_allclose(generate(sampler='dpm++2m', negative_prompt=negative),
                             noise - (c_neg + 4.0 * (c - c_neg)), atol=1e-5)
  # A scale schedule: Euler sums the scale at each step's start time.
  ts = np.asarray(flow.sampling_schedule(3, geometry.timestep_shift(config)))
  scale = 1.0 + 3.0 * ts[:-1]
  want = noise - np.sum((ts[:-1] - ts[1:]) * (c_null + scale * (c - c_null)))
  np.testing.assert_allclose(generate(guidance_schedule='linear'), want, atol=1e-5)


def test_settings_fill_from_the_config(config):
  got = sampling.settings(config)
  assert got == {'num_steps': 3, 'guidance_scale': config.sample.guidance_scale, 'sampler': 'euler',
                 'negative_prompt': '', 'guidance_schedule': 'constant',
                 'guidance_interval': (0.0, 1.0)}
  config.sample.sampler, config.sample.guidance_schedule = 'heun', 'interval'
  config.sample.guidance_interval = (0.1, 0.8)
  got = sampling.settings(config, num_steps=5, negative_prompt='blurry')
  assert (got['num_steps'], got['sampler'], got['negative_prompt'], got['guidance_schedule'],
          got['guidance_interval']) == (5, 'heun', 'blurry', 'interval', (0.1, 0.8))
  assert sampling.settings(config, sampler='dpm++2m')['sampler'] == 'dpm++2m'
  with pytest.raises(ValueError, match='Unknown sampler'):
    sampling.settings(config, sampler='ddim')
  with pytest.raises(ValueError, match='num_steps=0 must be positive'):
    sampling.settings(config, num_steps=0)
  with pytest.raises(ValueError, match='0 <= lo <= hi <= 1'):
    sampling.settings(config, guidance_interval=(0.5, 2.0))

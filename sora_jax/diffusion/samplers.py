"""ODE samplers for rectified flow: Euler, Heun and DPM-Solver++(2M), as pure functions.

Each integrates dx/dt = v(x, t) from timesteps[0] (noise, t = 1) to timesteps[-1] (data, t = 0)
with the common signature `sample(velocity_fn, noise, timesteps) -> x0`, where
velocity_fn(x [B, ...], t [B]) -> v and `timesteps` is decreasing (`flow.sampling_schedule`). The step
count is the static length of `timesteps`; every solver is one `lax.scan` whose body calls the model
once, so a large model is traced and compiled once whatever the solver (a two-call body would compile
it twice).

Model calls for N = len(timesteps) - 1 steps: euler N, heun 2N - 1, dpm++2m N.
"""

import jax
import jax.numpy as jnp

from sora_jax.diffusion import flow


def euler(velocity_fn, noise, timesteps):
  """First order: x <- x + (t_next - t) v(x, t), as diffusers' FlowMatchEulerDiscreteScheduler."""
  return flow.euler_sample(velocity_fn, noise, timesteps)


# Heun stages: (a, b, c, d) in x' = x + dt (a v + b v_prev), y' = x + dt (c v + d v_prev).
_PREDICT = (0.0, 0.0, 1.0, 0.0)  # keep x, evaluate next at the Euler guess
_CORRECT = (0.5, 0.5, 0.5, 0.5)  # trapezoid with the guess's velocity
_EULER = (1.0, 0.0, 1.0, 0.0)    # final step: plain Euler


def heun(velocity_fn, noise, timesteps):
  """Heun's second-order method: an Euler guess at t_next, then the trapezoid rule with the velocity
  there. The last step is plain Euler (EDM's rule), so v is never needed at t = 0, where an
  x0-predicting model divides by t. Matches diffusers' FlowMatchHeunDiscreteScheduler (s_churn = 0) on
  the same times. 2N - 1 model calls.

  Runs as 2N - 1 one-call stages (predict, correct, ..., predict, correct, euler). A stage evaluates
  v at the point y and updates the accepted point x and the next evaluation point y linearly (the
  tables above), with v_prev the previous stage's velocity.
  """
  t, t_next = timesteps[:-1], timesteps[1:]
  n = t.shape[0]
  t_eval = jnp.concatenate([jnp.stack([t[:-1], t_next[:-1]], 1).reshape(-1), t[-1:]])
  dt = jnp.concatenate([jnp.repeat(t_next[:-1] - t[:-1], 2), t_next[-1:] - t[-1:]])
  coef = jnp.asarray([_PREDICT, _CORRECT] * (n - 1) + [_EULER], jnp.float32)

  def stage(carry, s):
    x, y, v_prev = carry
    t_s, dt_s, (a, b, c, d) = s
    v = velocity_fn(y, jnp.full((y.shape[0],), t_s))
    return (x + dt_s * (a * v + b * v_prev), x + dt_s * (c * v + d * v_prev), v), None

  (x, _, _), _ = jax.lax.scan(stage, (noise, noise, jnp.zeros_like(noise)), (t_eval, dt, coef))
  return x


def _half_log_snr(t):
  """lambda = log(alpha / sigma) = log((1 - t) / t): -inf at t = 1, +inf at t = 0."""
  return jnp.log1p(-t) - jnp.log(t)


def dpm_solver_2m(velocity_fn, noise, timesteps):
  """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
  algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint', use_flow_sigmas=True,
  prediction_type='flow_prediction', final_sigmas_type='zero'. N model calls.

  The flow is a diffusion with alpha_t = 1 - t, sigma_t = t, lambda_t = log(alpha_t / sigma_t). The
  solver integrates the linear part exactly and extrapolates the data prediction D = x - t v linearly
  in lambda from the last two steps. Rewritten in t (sigma_next / sigma = t_next / t and
  -alpha_next (e^-h - 1) = 1 - t_next / t), a step is
    x_next = (t_next / t) x + (1 - t_next / t) (D_i + r_i / 2 (D_i - D_{i-1})),
    r_i = h_i / h_{i-1},  h_i = lambda_{i+1} - lambda_i,
  finite even at t = 1. With r = 0 it is exactly an Euler step: the first step (no D_{i-1}) and the
  last (lambda(0) = inf: it returns D, the x0 prediction at the last time) are first order. A step
  after t = 1 has h_{i-1} = inf, so r = 0 there too: the extrapolation starts at the third step.
  """
  t, t_next = timesteps[:-1], timesteps[1:]
  n = t.shape[0]
  lam = _half_log_snr(timesteps)
  h = lam[1:] - lam[:-1]
  h_prev = jnp.concatenate([jnp.full((1,), jnp.inf, h.dtype), h[:-1]])
  i = jnp.arange(n)
  second_order = (i > 0) & (i < n - 1) & jnp.isfinite(h_prev) & jnp.isfinite(h)
  r = jnp.where(second_order, h / jnp.where(second_order, h_prev, 1.0), 0.0)
  ratio = t_next / t
  coef = jnp.stack([ratio, (1.0 - ratio) * (1.0 + 0.5 * r), -(1.0 - ratio) * 0.5 * r], 1)

  def step(carry, s):
    x, d_prev = carry
    t_s, (a, b, c) = s
    d = x - t_s * velocity_fn(x, jnp.full((x.shape[0],), t_s))
    return (a * x + b * d + c * d_prev, d), None

  (x, _), _ = jax.lax.scan(step, (noise, jnp.zeros_like(noise)), (t, coef))
  return x


SAMPLERS = {'euler': euler, 'heun': heun, 'dpm++2m': dpm_solver_2m}


def get(name: str):
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}.')
  return SAMPLERS[name]


def model_calls(name: str, num_steps: int) -> int:
  """Velocity evaluations (each a doubled batch under CFG) for `num_steps` steps."""
  get(name)
  return 2 * num_steps - 1 if name == 'heun' else num_steps

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.config import geometry
from sora_jax.diffusion import flow


def test_interpolation_endpoints_and_velocity():
  x0, noise = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.zeros(2)), x0)
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.ones(2)), noise)
  # dx_t/dt is the velocity target
  t, eps = jnp.full((2,), 0.3), 1e-3
  fd = (flow.interpolate(x0, noise, t + eps) - flow.interpolate(x0, noise, t - eps)) / (2 * eps)
  np.testing.assert_allclose(fd, flow.velocity_target(x0, noise), rtol=1e-3)
  assert flow.loss(flow.velocity_target(x0, noise), x0, noise).shape == (2,)
  np.testing.assert_allclose(flow.loss(flow.velocity_target(x0, noise), x0, noise), 0.0)


def test_logit_normal_timesteps_and_shift():
  t = flow.sample_timesteps(jax.random.PRNGKey(0), 100_000)
  assert 0 < float(t.min()) and float(t.max()) < 1
  # logit(t) ~ N(0, 1)
  logit = np.log(t / (1 - t))
  assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02
  shifted = flow.sample_timesteps(jax.random.PRNGKey(0), 100_000, shift=3.0)
  assert float(jnp.median(shifted)) == pytest.approx(0.75, abs=0.01)  # 3*0.5/(1+2*0.5)
  np.testing.assert_allclose(flow.shift_timesteps(jnp.array([0.0, 1.0]), 5.0), [0.0, 1.0])


def test_resolution_dependent_shift():
  assert geometry.shift_for_tokens(384, 1.0, 384) == 1.0
  assert geometry.shift_for_tokens(4 * 384, 1.0, 384) == pytest.approx(2.0)
  assert geometry.shift_for_tokens(4 * 384, 3.0, 384) == pytest.approx(6.0)


def test_sampling_schedule():
  ts = flow.sampling_schedule(10, 3.0)
  assert ts.shape == (11,) and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
  assert bool(jnp.all(jnp.diff(ts) < 0))


def gaussian_velocity(mu, s):
  """Exact rectified-flow velocity E[noise - x0 | x_t] for data x0 ~ N(mu, s^2)."""
  def v(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 * s**2 + t**2
    return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)
  return v


def test_euler_is_exact_for_a_point_mass():
  # For a point mass the ODE paths are straight lines: one Euler step lands exactly on the data.
  mu, z = 1.7, jax.random.normal(jax.random.PRNGKey(0), (16, 1))
  out = flow.euler_sample(gaussian_velocity(mu, 0.0), z, flow.sampling_schedule(1))
  np.testing.assert_allclose(out, mu, atol=1e-5)


def test_euler_converges_to_the_gaussian_flow_map():
  # The exact flow map of N(0,1) -> N(mu, s^2) is x0 = mu + s * z; Euler error shrinks as O(1/N).
  mu, s = 0.5, 0.3
  z = jax.random.normal(jax.random.PRNGKey(1), (4096, 1))
  errors = []
  for n in (8, 32, 128, 512):
    out = flow.euler_sample(gaussian_velocity(mu, s), z, flow.sampling_schedule(n))
    errors.append(float(jnp.abs(out - (mu + s * z)).max()))
  assert errors[-1] < 0.005  # over 4096 draws, |z| up to ~4
  assert all(a / b > 3.5 for a, b in zip(errors, errors[1:]))  # first order: 4x steps, ~4x less
  out = flow.euler_sample(gaussian_velocity(mu, s), z, flow.sampling_schedule(128, shift=3.0))
  assert abs(float(out.mean()) - mu) < 0.02 and abs(float(out.std()) - s) < 0.02


def test_classifier_free_guidance_combination():
  def model_fn(x, t):  # first half conditional (velocity 3), second half unconditional (1)
    b = x.shape[0] // 2
    return jnp.concatenate([jnp.full_like(x[:b], 3.0), jnp.full_like(x[b:], 1.0)])
  v = flow.guided_velocity(model_fn, 2.5)(jnp.zeros((4, 2)), jnp.zeros(4))
  np.testing.assert_allclose(v, 1.0 + 2.5 * (3.0 - 1.0))

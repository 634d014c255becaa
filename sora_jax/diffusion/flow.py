"""Rectified flow (flow matching) as pure functions.

Convention (SD3 / diffusers FlowMatchEuler): x_t = (1 - t) * x0 + t * noise, t in [0, 1], t=1 is pure
noise; the model predicts the velocity v = noise - x0 = dx_t/dt. Sampling integrates from t=1 to t=0.
"""

import jax
import jax.numpy as jnp


def shift_timesteps(t, shift: float):
  """SD3 time shift: t' = s t / (1 + (s - 1) t); s > 1 moves mass towards t = 1 (noise)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(rng, batch: int, *, logit_mean=0.0, logit_std=1.0, shift=1.0, t_range=None):
  """Logit-normal t (SD3), then shifted. t_range (lo, hi): that distribution restricted to
  lo <= t < hi (Wan 2.2 A14B: one expert's side of the boundary), exactly: the normal on the logit
  is truncated to the range's preimage (no clipping, no rejection loop), so the shape within the
  range is the run's shift and logit-normal unchanged."""
  if t_range is None:
    z = jax.random.normal(rng, (batch,))
  else:
    lo, hi = t_range
    def bound(t):  # flow time -> the standard-normal value mapping to it
      u = t / (shift - (shift - 1.0) * t)  # the shift's inverse
      return (jnp.log(u) - jnp.log1p(-u) - logit_mean) / logit_std
    z = jax.random.truncated_normal(rng, bound(lo), bound(hi), (batch,))
  t = shift_timesteps(jax.nn.sigmoid(logit_mean + logit_std * z), shift)
  if t_range is not None:  # float rounding at the range's ends
    t = jnp.clip(t, t_range[0], jnp.nextafter(jnp.float32(t_range[1]), jnp.float32(0.0)))
  return t


def _bcast(t, x):
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0, noise, t):
  t = _bcast(t, x0)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
  return noise - x0


def velocity_from_x0(x0_pred, x_t, t, t_min: float = 0.05):
  """Velocity implied by a clean-data prediction: v = (x_t - x0) / t, with t clamped away from 0.

  t has the leading dims of x: [B] per clip, or [B, N] per token of packed sequences.

  Predicting x0 and training on the velocity loss ("JiT", Li & He 2025) lets a narrow transformer
  denoise large pixel patches: clean data is low-dimensional, noise is not.
  """
  return (x_t - x0_pred) / jnp.maximum(_bcast(t, x_t), t_min)


def loss_weight(t, t_floor: float):
  """Velocity-loss weight min(1, (t / t_floor)^2); 1 everywhere when t_floor is 0.

  With x0 prediction the velocity error is the x0 error / t, so its implicit x0 weight 1/t^2 explodes
  near clean data and a few low-noise examples dominate the gradient; this caps that weight at
  1 / t_floor^2 (the truncation idea of Min-SNR weighting, Hang et al. 2023).
  """
  t = jnp.asarray(t, jnp.float32)
  if not t_floor:
    return jnp.ones_like(t)
  return jnp.minimum(1.0, jnp.square(t / t_floor))


def loss(v_pred, x0, noise, weight=None):
  """Per-example mean squared velocity error [B]; `weight` ([B] or [B, T], see loss_weight) scales
  each example or frame."""
  err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x0, noise))
  if weight is not None:
    err = err * _bcast(weight, err)
  return err.reshape(err.shape[0], -1).mean(-1)


def packed_loss(v_pred, x0, noise, segment_ids, weight=None):
  """Mean squared velocity error per token [B, N, patch_dim] -> mean over real tokens (segment > 0);
  `weight` [B, N] scales each token."""
  err = jnp.square(v_pred.astype(jnp.float32) - velocity_target(x0, noise)).mean(-1)
  if weight is not None:
    err = err * weight
  real = (segment_ids > 0).astype(jnp.float32)
  return (err * real).sum() / jnp.maximum(real.sum(), 1.0)


def sampling_schedule(num_steps: int, shift: float = 1.0):
  """Decreasing times from 1 to 0, num_steps + 1 points, shifted like the training distribution."""
  return shift_timesteps(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def euler_sample(velocity_fn, noise, timesteps):
  """Integrates dx/dt = velocity_fn(x, t) from timesteps[0] (noise) to timesteps[-1] with Euler steps.

  velocity_fn(x, t) takes a batch x and a scalar-per-example t [B]. Uses `lax.scan`, so the step count
  is a trace-time constant and the loop is compiled once.
  """
  def step(x, ts):
    t, t_next = ts
    v = velocity_fn(x, jnp.full((x.shape[0],), t))
    return x + (t_next - t) * v, None

  x, _ = jax.lax.scan(step, noise, (timesteps[:-1], timesteps[1:]))
  return x


GUIDANCE_SCHEDULES = ('constant', 'linear', 'interval', 'hat')


def guidance_schedule(scale: float, kind: str = 'constant', interval=(0.0, 1.0)):
  """The CFG scale as `guided_velocity` takes it: a float, or a function of flow time t [B] -> [B].

  constant: `scale` at every t.
  linear:   `scale` at t = 1 (noise) falling to 1 (no guidance) at t = 0: full guidance while the
            coarse layout forms, none on the last, detail-level steps.
  interval: `scale` for t in [lo, hi], 1 elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a
            limited interval"): guidance at high noise mostly costs diversity, and at low noise it
            is not needed.
  hat:      1 + (scale - 1) * 4 t (1 - t): `scale` at t = 0.5, none at either end; the smooth form of
            an interval. Near t = 1 the prediction is a blur over every place the object could be, and
            guiding it swells that blur into an oversized object (the demo's squares: 31% of the
            data's size with the linear schedule, 75% with this one); none at t = 0 as for linear.
  """
  if kind == 'constant':
    return float(scale)
  if kind == 'linear':
    return lambda t: 1.0 + (scale - 1.0) * t
  if kind == 'interval':
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
      raise ValueError(f'Guidance interval {tuple(interval)} must satisfy 0 <= lo <= hi <= 1.')
    return lambda t: jnp.where((t >= lo) & (t <= hi), scale, 1.0)
  if kind == 'hat':
    return lambda t: 1.0 + (scale - 1.0) * 4.0 * t * (1.0 - t)
  raise ValueError(f'Unknown guidance schedule {kind!r}; choose one of {GUIDANCE_SCHEDULES}.')


def guided_velocity(model_fn, guidance_scale):
  """Classifier-free guidance: v = v_neg + g(t) * (v_cond - v_neg), one batched model call.

  model_fn(x2, t2) is evaluated on the doubled batch: its first half must see the prompts, its second
  half the negative prompt (the empty caption for plain CFG). `guidance_scale` is a float or a function
  t [B] -> scale [B] (see `guidance_schedule`).
  """
  def velocity(x, t):
    v = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    v_cond, v_uncond = jnp.split(v, 2)
    scale = guidance_scale
    if callable(scale):
      scale = _bcast(jnp.asarray(scale(t), v.dtype), v)
    return v_uncond + scale * (v_cond - v_uncond)
  return velocity

"""Wan 2.2 TI2V-5B (issue 19 part 2): one transformer, text- and image-to-video, whose image is a given
first latent frame at timestep 0 (diffusers' expand_timesteps), over the tiny random pipeline of
tests/fixtures/gen_wan22_ti2v.py: parity with diffusers (forward with per-token timesteps, T2V and
I2V denoising), training and sampling through the given-frames objective and sampler, LoRA, and the
refusals (VAE / transformer pairs, configs)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.config import schema, validation
from sora_jax.diffusion import flow, given_frames
from sora_jax.inference import frame_inputs
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import sampling
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import wan
from sora_jax.parallel import sharding
from sora_jax.training import factory, steps, update
from sora_jax.training import state as state_lib
from sora_jax.training.objectives import frame_conditioned

from test_latent import tiny_wan, wan_pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TI2V = os.path.join(FIXTURES, 'wan22_ti2v_tiny')
IO = np.load(os.path.join(FIXTURES, 'wan22_ti2v_tiny_io.npz'))


def rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def ti2v_pipeline(root, vae='wan22_vae_tiny', transformer=TI2V):
  """A full TI2V pipeline folder: the fixture's transformer and model_index.json with the tiny
  Wan 2.2 VAE and umT5 (what a user downloads, in miniature). `transformer`: a pipeline folder or a
  transformer folder alone."""
  folder = os.path.join(transformer, 'transformer')
  index = os.path.join(transformer, 'model_index.json')
  return wan_pipeline(root, folder if os.path.isdir(folder) else transformer, vae=vae,
                      model_index=index if os.path.isfile(index) else None)


def ti2v_config(path):
  """configs/wan2_2_ti2v_5b.py on a tiny folder, at the tiny transformer's dims: 5 frames of 64 x 64
  -> 2 x 4 x 4 latents (x16 VAE), 8 tokens."""
  c = tiny_wan(schema.config_file(os.path.join(ROOT, 'configs', 'x'),
                                  'wan2_2_ti2v_5b.py').get_config(path))
  c.data.height = c.data.width = 64
  c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 2, 1, 2
  c.mesh.data, c.mesh.fsdp, c.mesh.context = 2, -1, 1
  c.optim.warmup_steps = 1
  c.sample.num_steps, c.num_train_samples = 3, 1
  return c


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
  return ti2v_pipeline(tmp_path_factory.mktemp('ti2v') / 'TI2V-5B-tiny')


def test_forward_with_per_frame_timesteps_matches_diffusers():
  """diffusers' per-token timesteps (0 on the first frame's tokens) are our per-frame [B, T]."""
  assert wt.expand_timesteps(TI2V)
  f = wt.load_wan_transformer(TI2V, task='t2v')
  assert f.model.expand_timesteps
  out = f(IO['forward_latents'], IO['forward_timesteps'], IO['forward_text'])
  err = rel_l2(out, IO['forward_out'])
  print(f'TI2V forward (per-frame timesteps) rel L2 vs diffusers: {err:.2e}')
  assert err < 1e-4
  # The flow-time call with a given-frame mask is the same computation.
  given = (IO['forward_timesteps'] == 0).astype(np.float32)
  out2 = f.model(IO['forward_latents'], IO['forward_timesteps'] / 1000.0, IO['forward_text'],
                 given=given)
  assert rel_l2(out2, IO['forward_out']) < 1e-4


@pytest.mark.parametrize('task', ['t2v', 'i2v'])
def test_denoising_matches_diffusers(task):
  """The given-frames sampler's step (the first frame reset to the image latents with t = 0 on it;
  nothing given for T2V) against WanPipeline / WanImageToVideoPipeline(expand_timesteps), step by
  step, and the output (I2V: first frame exactly the condition)."""
  model = wt.load_wan_transformer(TI2V).model
  text = jnp.concatenate([IO[f'{task}_prompt'], IO[f'{task}_negative']])
  sigmas = IO[f'{task}_sigmas']
  np.testing.assert_allclose(sigmas, flow.sampling_schedule(3, float(IO['shift'])), rtol=1e-6)
  x = jnp.asarray(IO[f'{task}_latents'])
  given = np.zeros((1, x.shape[1]), np.float32)
  cond = jnp.zeros_like(x)
  if task == 'i2v':
    given[:, 0] = 1
    cond = cond.at[:, :1].set(IO['i2v_condition'])
  keep = (jnp.asarray(given) > 0)[:, :, None, None, None]
  both_given = jnp.concatenate([given, given])

  def model_fn(x2, t2):  # as sampling.make_generate's given-frames model_fn
    t_frames = jnp.where(both_given > 0, 0.0, t2[:, None])
    return model(x2, t_frames, text, given=both_given)
  guided = flow.guided_velocity(model_fn, float(IO['guidance']))
  velocity = jax.jit(lambda y, t: jnp.where(keep, 0.0, guided(jnp.where(keep, cond, y), t)))
  errors = []
  for i in range(3):
    x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, jnp.full((1,), sigmas[i], jnp.float32))
    # diffusers' scheduler also moves its (never used) first frame: compare the generated ones.
    errors.append(rel_l2(x[:, 1:], IO[f'{task}_steps'][i][:, 1:]))
  final = jnp.where(keep, cond, x)
  errors.append(rel_l2(final, IO[f'{task}_final']))
  print(f'TI2V {task} rel L2 per step (and output) vs diffusers: {errors}')
  assert max(errors) < 1e-4, errors
  if task == 'i2v':
    np.testing.assert_array_equal(final[:, :1], IO['i2v_condition'])
  # The compiled sampler (lax.scan over the steps) agrees with the step loop.
  from sora_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  start = jnp.where(keep, cond, jnp.asarray(IO[f'{task}_latents']))
  out = jnp.where(keep, cond, samplers.get('euler')(velocity, start, jnp.asarray(sigmas)))
  assert rel_l2(out, IO[f'{task}_final']) < 1e-4


def test_released_config_builds_abstractly():
  """configs/wan2_2_ti2v_5b.py without weights: the released architecture (5.0B parameters),
  704 x 1280 x 121 frames -> 31 x 44 x 80 latents, shift 5 there."""
  from sora_jax.config import geometry  # pylint: disable=g-import-not-at-top
  c = schema.config_file(os.path.join(ROOT, 'configs', 'x'), 'wan2_2_ti2v_5b.py').get_config()
  c.batch_size = 2
  validation.validate(c, 8, weights=False)
  assert geometry.model_clip_shape(c) == (31, 44, 80) and geometry.timestep_shift(c) == 5.0
  assert geometry.autoencoder_geometry(c.autoencoder) == dict(temporal=4, spatial=16, z_dim=48)
  model = nnx.eval_shape(lambda: factory.build(c, nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 4_999_787_712 and model.dit.expand_timesteps
  # The shipped transformer config.json is the one the config builds.
  arch = os.path.join(ROOT, 'sora_jax', 'interop', 'architectures', 'wan2_2_ti2v')
  assert wan.WanConfig.from_diffusers(wt.wan_config_from_diffusers(arch)) == state_lib.wan_config(c)
  assert wan.is_ti2v(state_lib.wan_config(c)) and wt.expand_timesteps(arch)


@pytest.mark.parametrize('lora', [0, 4])
def test_trains_and_samples_from_text_and_image(pipe, lora):
  """init_from loads the TI2V transformer (LoRA: as the frozen base); the frame-conditioned objective
  (half the clips with the first frame given) trains a few finite steps; sampling from text, and from
  an image the way `sample --image` builds it, whose latents come out exactly as the first frame,
  matching a plain step loop."""
  config = ti2v_config(pipe)
  config.lora.rank = lora
  assert update.objective(config) is frame_conditioned and factory.wan_ti2v(config)
  mesh = sharding.make_mesh(validation.validate(config, 8))
  graphdef, state, state_sh = state_lib.init(config, mesh)
  state = state_lib.init_from(config, state, state_sh)
  f = frozen_lib.Frozen(config, mesh)
  params = state_lib.model_params(state)
  x, t = IO['forward_latents'], IO['forward_timesteps']
  if not lora:  # the loaded weights are the fixture's
    np.testing.assert_allclose(nnx.merge(graphdef, params).dit(x, t / 1000.0, IO['forward_text']),
                               IO['forward_out'], rtol=1e-4, atol=1e-4)
  tx, schedule = state_lib.make_optimizer(config)
  step = steps.jit_train_step(graphdef, config, tx, schedule, f.null_caption(), state_sh, mesh)
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (8, 5, 64, 64, 3), dtype=np.uint8)
  tokens, mask = f.tokenize(['a red ball'] * 8)
  batch = f.encode_batch(dict(video=update.normalize_pixels(jnp.asarray(pixels)),
                              tokens=jnp.asarray(tokens), mask=jnp.asarray(mask)),
                         sharding.batch_sharding(mesh))
  given, _ = given_frames.sample_given(jax.random.PRNGKey(0), config, 8, 2)
  assert 0 < float(given[:, 0].sum()) < 8  # both kinds of clips
  with jax.set_mesh(mesh):
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(float(metrics['loss']))
  print(f'TI2V lora={lora} losses: {losses}')
  assert np.all(np.isfinite(losses)), losses
  params = state_lib.model_params(state, 'ema')
  generate = sampling.make_generate(graphdef, config, frozen=f, **sampling.settings(config))
  # From an image, as sample --image: the clip with the image first, encoded; the first latent
  # frame given.
  image = ((IO['i2v_image'] + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
  frame = image.astype(np.float32) / 127.5 - 1
  clip, _, given = frame_inputs.given_inputs(config, image=frame)
  np.testing.assert_array_equal(given, [1, 0])
  video = np.asarray(f.encode(jnp.asarray(clip[None])))[0]
  if not lora:  # the image's latents are diffusers' condition (the VAE encodes one frame first)
    encode_one = lambda im: np.asarray(f.encode(jnp.asarray(im[None, None])))[0]
    assert rel_l2(encode_one(IO['i2v_image']), IO['i2v_condition'][0]) < 1e-4
    assert rel_l2(video[:1], encode_one(frame)) < 1e-4
  with jax.set_mesh(mesh):
    out = sampling.generate_videos(generate, params, ['a cat'], config=config, mesh=mesh, seed=0,
                                   batch_size=2, frozen=f, video=video, given=given, decode=False)
    text_out = sampling.generate_videos(generate, params, ['a cat'], config=config, mesh=mesh,
                                        seed=0, batch_size=2, frozen=f, decode=False)
  np.testing.assert_array_equal(out[0, 0], video[0])
  assert np.isfinite(text_out).all() and not np.allclose(text_out[0, 0], video[0])
  if lora:
    return
  # Reference: the sampler's noise, a plain loop over the steps, the first frame reset each step.
  model = nnx.merge(graphdef, params)
  tok, msk = f.caption_inputs(*map(jnp.asarray, f.tokenize(['a cat'])))
  neg, neg_mask = f.null_caption()
  timesteps = flow.sampling_schedule(3, 5.0)
  y = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), out.shape[1:])[None]
  g = jnp.asarray(given)[None]
  for i in range(3):
    y = y.at[:, :1].set(video[:1])
    tf = jnp.where(g > 0, 0.0, timesteps[i])
    v_c, v_u = model(y, tf, tok, msk, given=g), model(y, tf, neg, neg_mask, given=g)
    v = v_u + config.sample.guidance_scale * (v_c - v_u)
    y = y + (timesteps[i + 1] - timesteps[i]) * v
  y = y.at[:, :1].set(video[:1])
  err = rel_l2(out[:1], np.asarray(y))
  print(f'TI2V image-to-video sampling vs reference loop: rel L2 {err:.2e}')
  assert err < 1e-4


def test_mismatched_vae_and_config_errors(pipe, tmp_path):
  # A TI2V transformer with the Wan 2.1 VAE, and a Wan 2.1 transformer with the Wan 2.2 VAE.
  wrong = ti2v_pipeline(tmp_path / 'ti2v_wan21_vae', vae='wan_vae_tiny')
  with pytest.raises(ValueError, match=r"(?s)Wan 2.2 TI2V transformer.*ti2v_wan21_vae/vae.*Wan 2.1"
                                       r" VAE.*released with the Wan 2.2 VAE"):
    wt.load_wan_transformer(wrong)
  wan21 = ti2v_pipeline(tmp_path / 'wan21_wan22_vae', vae='wan22_vae_tiny',
                        transformer=os.path.join(FIXTURES, 'wan_transformer_tiny_t2v'))
  with pytest.raises(ValueError, match=r"(?s)Wan 2.1 / 2.2 A14B transformer.*wan21_wan22_vae/vae"
                                       r".*Wan 2.2 VAE.*released with the Wan 2.1 VAE"):
    wt.load_wan_transformer(wan21)
  config = ti2v_config(pipe)
  validation.validate(config, 8)
  bad = config.copy_and_resolve_references()  # the run's VAE is not the transformer's
  bad.autoencoder = os.path.join(FIXTURES, 'wan_vae_tiny')
  with pytest.raises(ValueError, match='Wan 2.2 TI2V transformer.*Wan 2.1 VAE'):
    validation.validate(bad, 8)
  bad = config.copy_and_resolve_references()  # the TI2V folder with a Wan 2.1 config
  bad.model.wan.expand_timesteps = False
  bad.condition.mix = (('none', 1.0),)
  with pytest.raises(ValueError, match='is a Wan 2.2 TI2V pipeline.*wan2_2_ti2v_5b'):
    validation.validate(bad, 8)
  bad = config.copy_and_resolve_references()  # given frames on a Wan 2.1 model
  bad.model.wan.expand_timesteps = False
  bad.init_from = ''
  with pytest.raises(ValueError, match='expand_timesteps'):
    validation.validate(bad, 8, weights=False)
  bad = config.copy_and_resolve_references()
  bad.condition.context_noise = 0.1
  with pytest.raises(ValueError, match='context_noise and sample_context_noise must be 0'):
    validation.validate(bad, 8)
  bad = config.copy_and_resolve_references()
  bad.model.wan.image_condition = True
  with pytest.raises(ValueError, match='takes no image_dim, image_condition or expert'):
    validation.validate(bad, 8)
  # A Wan model built without expand_timesteps takes no given frames.
  f = wt.load_wan_transformer(os.path.join(FIXTURES, 'wan_transformer_tiny_t2v'))
  x = np.zeros((1, 2, 4, 4, 4), np.float32)
  with pytest.raises(ValueError, match='takes no given frames'):
    f.model(x, np.zeros((1, 2), np.float32), np.zeros((1, 3, 32), np.float32),
            given=np.ones((1, 2), np.float32))

"""Wan 2.2 A14B (issue 19 part 3): two experts switched by timestep, T2V and I2V, over the tiny random
pipelines of tests/fixtures/gen_wan22_a14b.py: import and refusals, the two-expert sampling loop
against diffusers' (recorded trajectories), one-expert training and switched sampling."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.config import schema, validation
from sora_jax.diffusion import experts, flow, samplers
from sora_jax.inference import experts as experts_lib
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import sampling
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import wan
from sora_jax.parallel import sharding
from sora_jax.training import steps, update
from sora_jax.training import state as state_lib
from sora_jax.training.objectives import text_to_video

from test_latent import tiny_wan, wan_pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2V = os.path.join(FIXTURES, 'wan22_a14b_tiny')
I2V = os.path.join(FIXTURES, 'wan22_i2v_a14b_tiny')
IO = np.load(os.path.join(FIXTURES, 'wan22_a14b_tiny_io.npz'))


def rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def a14b_pipeline(root, experts_from=T2V):
  """A full A14B pipeline folder: the fixture's two experts and model_index.json, with the tiny VAE
  and umT5 (what a user downloads, in miniature)."""
  return wan_pipeline(root, os.path.join(experts_from, 'transformer'),
                      transformer_2=os.path.join(experts_from, 'transformer_2'),
                      model_index=os.path.join(experts_from, 'model_index.json'))


def a14b_config(path, expert='high_noise'):
  """configs/wan2_2_a14b.py on a tiny folder, at the tiny transformer's dims (test_latent)."""
  c = tiny_wan(schema.config_file(os.path.join(ROOT, 'configs', 'x'),
                                  'wan2_2_a14b.py').get_config(path))
  c.model.wan.expert = expert
  c.batch_size, c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 8, 2, 1, 2
  c.mesh.data, c.mesh.fsdp, c.mesh.context = 2, -1, 1
  c.optim.warmup_steps = 1
  c.sample.num_steps, c.num_train_samples = 4, 1
  c.diffusion.shift = 3.0
  return c


@pytest.fixture(scope='module')
def t2v_pipe(tmp_path_factory):
  return a14b_pipeline(tmp_path_factory.mktemp('a14b') / 'T2V-A14B-tiny')


@pytest.fixture(scope='module')
def i2v_pipe(tmp_path_factory):
  return a14b_pipeline(tmp_path_factory.mktemp('a14b') / 'I2V-A14B-tiny', I2V)


def test_import_experts_and_refusals():
  with pytest.raises(ValueError, match="Wan 2.2 A14B pipeline.*expert='high_noise'"):
    wt.load_wan_transformer(T2V)
  with pytest.raises(ValueError, match='expected one of'):
    wt.load_wan_transformer(T2V, expert='middle')
  single = os.path.join(FIXTURES, 'wan_transformer_tiny_bf16')  # a one-transformer pipeline folder
  with pytest.raises(ValueError, match='not a Wan 2.2 A14B pipeline folder'):
    wt.load_wan_transformer(single, expert='low_noise')
  assert wt.boundary_ratio(T2V) == 0.875 and wt.boundary_ratio(I2V) == 0.9
  assert wt.boundary_ratio(single) is None
  # I2V-A14B's experts: the 2C + 4 channel input, no CLIP tokens; they load and run.
  config = wt.wan_config_from_diffusers(I2V, 'low_noise')
  cfg = wan.WanConfig.from_diffusers(config)
  assert wt.wan_task(config) == 'i2v' and not cfg.is_i2v and wan.image_condition_only(cfg)
  f = wt.load_wan_experts(I2V, task='i2v')
  x = np.zeros((1, 2, 4, 4, 12), np.float32)
  text = IO['i2v_prompt']
  assert f.expert(950.0) == 'high_noise' and f.expert(899.0) == 'low_noise'
  assert not np.allclose(f(x, 950.0, text), f(x, 899.0, text))
  with pytest.raises(ValueError, match='text-to-video'):
    wt.load_wan_transformer(T2V, task='i2v', expert='high_noise')


@pytest.mark.parametrize('task', ['t2v', 'i2v'])
def test_two_expert_sampling_matches_diffusers(task):
  """sampling's expert switch (_Switched: one lax.cond per step), per-expert CFG scale and Euler
  step against diffusers' pipeline on the same latents, embeddings and sigmas, step by step."""
  path = T2V if task == 't2v' else I2V
  f = wt.load_wan_experts(path)
  ratio = float(IO[f'{task}_boundary'])
  model = sampling._Switched(f.high.model, f.low.model, ratio)  # pylint: disable=protected-access
  text = jnp.concatenate([IO[f'{task}_prompt'], IO[f'{task}_negative']])
  cond = jnp.asarray(IO[f'{task}_condition']) if task == 'i2v' else None
  if cond is not None:  # the condition the pipeline built: [frame mask; first-frame latents]
    np.testing.assert_array_equal(cond[..., :4], wan.i2v_frame_mask(cond.shape))
    cond = jnp.concatenate([cond, cond])

  def call(m, x2, t2):
    return m(x2 if cond is None else wan.i2v_input(x2, cond), t2, text)

  scale = sampling._switched_scale(*IO[f'{task}_guidance'], ratio)  # pylint: disable=protected-access
  velocity = jax.jit(flow.guided_velocity(
      lambda x2, t2: sampling._call(model, call, x2, t2), scale))  # pylint: disable=protected-access
  sigmas = IO[f'{task}_sigmas']
  np.testing.assert_allclose(sigmas, flow.sampling_schedule(4, 3.0 if task == 't2v' else 4.0),
                             rtol=1e-6)
  assert experts.step_experts(sigmas, ratio) == [
      ['high_noise', 'low_noise'][i] for i in IO[f'{task}_expert']]
  x = jnp.asarray(IO[f'{task}_latents'])
  errors = []
  for i in range(4):
    x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, jnp.full((1,), sigmas[i], jnp.float32))
    errors.append(rel_l2(x, IO[f'{task}_steps'][i]))
  print(f'{task} rel L2 per step vs diffusers: {errors}')
  assert max(errors) < 1e-4, errors
  # The compiled sampler (lax.scan over the steps) agrees with the step loop.
  out = samplers.get('euler')(velocity, jnp.asarray(IO[f'{task}_latents']), jnp.asarray(sigmas))
  assert rel_l2(out, IO[f'{task}_steps'][-1]) < 1e-4


def test_config_errors_before_compiling(t2v_pipe):
  config = a14b_config(t2v_pipe)
  validation.validate(config, 8)
  for key, value, match in (
      ('expert', 'middle', 'expected one of'),
      ('expert', '', 'trains one expert per run'),
      ('boundary_ratio', 0.5, 'released with boundary_ratio=0.875'),
      ('boundary_ratio', 1.5, r'in \(0, 1\)')):
    bad = config.copy_and_resolve_references()
    bad.model.wan[key] = value
    with pytest.raises(ValueError, match=match):
      validation.validate(bad, 8)
  bad = config.copy_and_resolve_references()  # an expert on a one-transformer folder
  bad.init_from = os.path.join(FIXTURES, 'wan_transformer_tiny_bf16')
  with pytest.raises(ValueError, match='not a Wan 2.2 A14B pipeline folder'):
    validation.validate(bad, 8)
  bad = config.copy_and_resolve_references()  # the A14B folder as a Wan 2.1 run
  bad.model.wan.expert, bad.model.wan.boundary_ratio = '', 0.0
  with pytest.raises(ValueError, match='is a Wan 2.2 A14B pipeline'):
    validation.validate(bad, 8)
  bad = config.copy_and_resolve_references()
  bad.model.wan.image_condition, bad.model.wan.image_dim = True, 32
  with pytest.raises(ValueError, match='two different models'):
    validation.validate(bad, 8)
  with pytest.raises(ValueError, match='guidance_scale_2'):
    sampling.settings(_wan21(config), guidance_scale_2=2.0)


def _wan21(config):
  c = config.copy_and_resolve_references()
  c.model.wan.expert, c.model.wan.boundary_ratio = '', 0.0
  return c


@pytest.mark.parametrize('expert', experts.EXPERTS)
def test_training_times_stay_on_the_experts_side(t2v_pipe, expert):
  config = a14b_config(t2v_pipe, expert)
  config.diffusion.frame_noise_prob = 0.5
  t = text_to_video.flow_times(jax.random.PRNGKey(0), config, (4096, 2, 4, 4, 4))
  high = np.asarray(experts.is_high_noise(t, 0.875))
  assert high.all() if expert == 'high_noise' else not high.any()
  # The run's (shifted logit-normal) distribution restricted to the range: same conditional law.
  full = np.asarray(text_to_video.flow_times(jax.random.PRNGKey(1), _wan21(config),
                                             (1 << 16, 2, 4, 4, 4)))
  lo, hi = experts.time_range(expert, 0.875)
  kept = full[(full >= lo) & (full < hi)]
  np.testing.assert_allclose(np.quantile(np.asarray(t), [0.25, 0.5, 0.75]),
                             np.quantile(kept, [0.25, 0.5, 0.75]), atol=0.02)


@pytest.mark.parametrize('task,expert,lora', [('t2v', 'low_noise', 0), ('i2v', 'high_noise', 4)])
def test_one_expert_trains_and_samples_switching(request, task, expert, lora):
  """init_from loads the run's expert (LoRA: as the frozen base), a few train steps stay finite,
  and sampling (from text; I2V from an image) runs the run's expert on its side of the boundary
  and the folder's other expert on the other, as a step-by-step reference loop does."""
  path = request.getfixturevalue(f'{task}_pipe')
  config = a14b_config(path, expert)
  config.lora.rank = lora
  mesh = sharding.make_mesh(validation.validate(config, 8))
  graphdef, state, state_sh = state_lib.init(config, mesh)
  state = state_lib.init_from(config, state, state_sh)
  f = frozen_lib.Frozen(config, mesh)
  own = wt.load_wan_transformer(path, expert=expert)
  partner = wt.load_wan_transformer(path, expert=experts.partner(expert))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 2, 4, 4, 12 if task == 'i2v' else 4)).astype(np.float32)
  text = rng.standard_normal((2, 16, 32)).astype(np.float32)
  params = state_lib.model_params(state)
  np.testing.assert_allclose(nnx.merge(graphdef, params).dit(x, jnp.array([0.3, 0.9]), text),
                             own(x, jnp.array([300.0, 900.0]), text), rtol=1e-4, atol=1e-4)
  # A few steps on one batch: finite losses.
  tx, schedule = state_lib.make_optimizer(config)
  null = f.null_caption()
  step = steps.jit_train_step(graphdef, config, tx, schedule, null, state_sh, mesh)
  pixels = rng.integers(0, 256, (8, 5, 32, 32, 3), dtype=np.uint8)
  tokens, mask = f.tokenize(['a red ball'] * 8)
  batch = f.encode_batch(dict(video=update.normalize_pixels(jnp.asarray(pixels)),
                              tokens=jnp.asarray(tokens), mask=jnp.asarray(mask)),
                         sharding.batch_sharding(mesh))
  assert ('image_condition' in batch) == (task == 'i2v') and 'image_embeds' not in batch
  with jax.set_mesh(mesh):
    losses = []
    for _ in range(2):
      state, metrics = step(state, batch)
      losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)), losses
  # Sampling: the run's expert on its side, the folder's other expert on the other.
  params = state_lib.model_params(state, 'ema')
  opts = sampling.settings(config)
  assert opts['guidance_scale_2'] == config.sample.guidance_scale_2
  generate = sampling.make_generate(graphdef, config, frozen=f, **opts)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  kw = dict(image=image) if task == 'i2v' else {}
  with jax.set_mesh(mesh):
    out = sampling.generate_videos(generate, params, ['a cat'], config=config, mesh=mesh, seed=0,
                                   batch_size=2, frozen=f, decode=False, **kw)
  timesteps = flow.sampling_schedule(4, 3.0)
  chosen = experts.step_experts(timesteps, config.model.wan.boundary_ratio)
  assert chosen == ['high_noise', 'high_noise', 'low_noise', 'low_noise'], chosen
  # Reference: plain Python over the steps, each expert's own model call.
  trained = nnx.merge(graphdef, params)
  other = nnx.merge(experts_lib.partner_graphdef(config), f.expert_partner())
  np.testing.assert_allclose(other.dit(x, jnp.array([0.3, 0.9]), text),
                             partner(x, jnp.array([300.0, 900.0]), text), rtol=1e-4, atol=1e-4)
  tok, msk = f.caption_inputs(*map(jnp.asarray, f.tokenize(['a cat'])))
  neg, neg_mask = f.null_caption()
  cond = None
  if task == 'i2v':
    cond = sampling.image_inputs(config, f, image)['image_condition']
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 0), out.shape[1:])[None]
  x = noise
  for i, name in enumerate(chosen):
    t = jnp.full((1,), timesteps[i])
    inp = lambda y: y if cond is None else wan.i2v_input(y, cond)
    model = trained if name == expert else other
    run = lambda y, c, m: model(inp(y), t, c, m)
    scale = config.sample.guidance_scale if name == 'high_noise' else config.sample.guidance_scale_2
    v_c, v_u = run(x, tok, msk), run(x, neg, neg_mask)
    x = x + (timesteps[i + 1] - timesteps[i]) * (v_u + scale * (v_c - v_u))
  err = rel_l2(out[:1], np.asarray(x))
  print(f'{task} {expert} switched sampling vs reference loop: rel L2 {err:.2e}')
  assert err < 1e-4

"""Conditioning on given frames: masks, loss, exact reproduction, SDEdit, sliding windows, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.common import tokenizers, video_io
from sora_jax.config import geometry, schema, validation
from sora_jax.diffusion import flow, given_frames
from sora_jax.evaluation import conditioned as conditioned_eval
from sora_jax.evaluation import adherence
from sora_jax.inference import frame_inputs
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import sampling
from sora_jax.parallel import sharding
from sora_jax.training import factory
from sora_jax.training import state as state_lib
from sora_jax.training import update


def cond_config():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  c.data.num_frames = 6  # 3 temporal patches of 2 frames
  c.condition.mix = (('none', 0.25), ('first', 0.25), ('first_k', 0.25), ('last_k', 0.25))
  c.condition.max_frames = 2
  c.sample.num_steps = 2
  return c


@pytest.fixture(scope='module')
def model_and_mesh():
  c = cond_config()
  model = factory.build(c, nnx.Rngs(0))
  # Random (non-zero) head so the outputs depend on the inputs.
  graphdef, params = nnx.split(model)
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'context': 1},
                            devices=jax.devices()[:1])
  return c, graphdef, params, mesh


def test_pattern_masks():
  m = lambda p, k: given_frames.pattern_mask(p, k, 6, 2).astype(int).tolist()
  assert m('none', 1) == [0] * 6
  assert m('first', 2) == [1, 1, 0, 0, 0, 0]
  assert m('first_k', 2) == [1, 1, 1, 1, 0, 0]
  assert m('last_k', 1) == [0, 0, 0, 0, 1, 1]
  assert m('first_last', 1) == [1, 1, 0, 0, 1, 1]


def test_sample_given_patterns_align_with_patches():
  c = cond_config()
  given, image = given_frames.sample_given(jax.random.PRNGKey(0), c, 256, 6)
  given, image = np.asarray(given), np.asarray(image)
  assert given.shape == (256, 6) and image.shape == (256,)
  given_frames.check_mask(given, 2)
  patches = given[:, ::2]
  assert (patches.sum(1) < 3).all()  # one patch always left to generate
  seen = {tuple(r) for r in patches.astype(int).tolist()}
  assert seen == {(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1)}
  # 'first' clips are flagged as images (only they, and all of them give exactly the first patch).
  assert image.any() and (patches[image] == [1, 0, 0]).all()
  # max_frames counts temporal patches; image clips (1 patch) get nothing given.
  given, image = given_frames.sample_given(jax.random.PRNGKey(0), c, 64, 2)
  assert np.asarray(given).sum() == 0 and not np.asarray(image).any()


def test_image_pattern_repeats_the_first_frame():
  x0 = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 2, 2, 3))
  out = np.asarray(given_frames.as_image(x0, jnp.asarray([True, False]), 2))
  np.testing.assert_array_equal(out[0, 1], np.asarray(x0)[0, 0])  # the patch shows frame 0 twice
  np.testing.assert_array_equal(out[0, 2:], np.asarray(x0)[0, 2:])
  np.testing.assert_array_equal(out[1], np.asarray(x0)[1])
  np.testing.assert_array_equal(given_frames.as_image(x0, jnp.asarray([True, True]), 1), x0)


def test_loss_ignores_given_frames():
  x0, noise, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 4, 2, 2, 3)) for i in range(3))
  given = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
  grad = jax.grad(lambda v: given_frames.masked_loss(v, x0, noise, None, given).sum())(v)
  assert float(jnp.abs(grad[0, :2]).max()) == 0.0 and float(jnp.abs(grad[0, 2:]).min()) > 0
  # Nothing given: the plain flow loss.
  np.testing.assert_allclose(given_frames.masked_loss(v, x0, noise, None, given)[1],
                             flow.loss(v, x0, noise)[1], rtol=1e-6)
  err = np.square(np.asarray(v - (noise - x0)))[0, 2:].mean()
  np.testing.assert_allclose(given_frames.masked_loss(v, x0, noise, None, given)[0], err, rtol=1e-5)


def test_unconditioned_model_has_no_mask_channel():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  plain = factory.build(tiny_config(), nnx.Rngs(0))
  cond = factory.build(cond_config(), nnx.Rngs(0))
  assert not plain.dit.condition_channel and cond.dit.condition_channel
  assert cond.dit.patch_embed.kernel.shape[0] == plain.dit.patch_embed.kernel.shape[0] * 4 // 3


@pytest.mark.parametrize('context_noise', [0.0, 0.1])
def test_train_step_runs_with_conditioning(context_noise):
  c = cond_config()
  c.batch_size = 2
  c.condition.context_noise = context_noise
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'context': 1},
                            devices=jax.devices()[:1])
  graphdef, state, _ = state_lib.init(c, mesh)
  tx, schedule = state_lib.make_optimizer(c)
  step = jax.jit(update.make_train_step(graphdef, c, tx, schedule))
  tokens, mask = tokenizers.tokenize(['a red circle', 'a blue square'], c.text.max_length)
  batch = {'video': jax.random.normal(jax.random.PRNGKey(0), (2, 6, 16, 16, 3)),
           'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(mask)}
  _, m = step(state, batch)
  assert np.isfinite(float(m['loss'])) and float(m['grad_norm']) > 0


def _inputs(c, n=2):
  tokens, mask = tokenizers.tokenize(['a red circle moving left'] * n, c.text.max_length)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
  return jnp.asarray(tokens), jnp.asarray(mask), keys


def test_given_frames_are_reproduced_exactly(model_and_mesh):
  c, graphdef, params, _ = model_and_mesh
  generate = sampling.make_generate(graphdef, c, num_steps=2, guidance_scale=2.0, sampler='dpm++2m')
  video = jax.random.uniform(jax.random.PRNGKey(5), (2, 6, 16, 16, 3), minval=-1, maxval=1)
  given = jnp.asarray([given_frames.pattern_mask('first_k', 1, 6, 2),
                       given_frames.pattern_mask('last_k', 2, 6, 2)])
  out = np.asarray(generate(params, *_inputs(c), video, given))
  assert out.shape == (2, 6, 16, 16, 3)
  np.testing.assert_array_equal(out[0, :2], np.asarray(video)[0, :2])
  np.testing.assert_array_equal(out[1, 2:], np.asarray(video)[1, 2:])
  assert np.abs(out[0, 2:] - np.asarray(video)[0, 2:]).mean() > 0.1  # the rest is generated


def test_context_noise_changes_generation_but_keeps_given_frames(model_and_mesh):
  c, graphdef, params, _ = model_and_mesh
  video = jax.random.uniform(jax.random.PRNGKey(5), (1, 6, 16, 16, 3), minval=-1, maxval=1)
  given = jnp.asarray([given_frames.pattern_mask('first_k', 1, 6, 2)])
  outs = []
  for level in (0.0, 0.3):
    c2 = c.copy_and_resolve_references()
    c2.condition.sample_context_noise = level
    generate = sampling.make_generate(graphdef, c2, num_steps=2, guidance_scale=2.0)
    outs.append(np.asarray(generate(params, *_inputs(c2, 1), video, given)))
  for out in outs:  # the output shows the given frames themselves, not their noised copies
    np.testing.assert_array_equal(out[0, :2], np.asarray(video)[0, :2])
  assert np.abs(outs[0][0, 2:] - outs[1][0, 2:]).max() > 0  # the model saw noised context


def test_sdedit_near_zero_strength_returns_input(model_and_mesh):
  c, graphdef, params, _ = model_and_mesh
  video = jax.random.uniform(jax.random.PRNGKey(5), (2, 6, 16, 16, 3), minval=-1, maxval=1)
  weak = sampling.make_generate(graphdef, c, num_steps=2, guidance_scale=2.0, edit_strength=1e-4)
  out = np.asarray(weak(params, *_inputs(c), video))
  np.testing.assert_allclose(out, np.asarray(video), atol=2e-3)
  strong = sampling.make_generate(graphdef, c, num_steps=2, guidance_scale=2.0, edit_strength=0.9)
  assert np.abs(np.asarray(strong(params, *_inputs(c), video)) - np.asarray(video)).mean() > 0.05
  with pytest.raises(ValueError, match='edit_strength'):
    sampling.make_generate(graphdef, c, num_steps=2, guidance_scale=2.0, edit_strength=1.5)


def test_unconditioned_model_rejects_given_frames():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config()
  graphdef, params = nnx.split(factory.build(c, nnx.Rngs(0)))
  generate = sampling.make_generate(graphdef, c, num_steps=1, guidance_scale=1.0)
  video = jnp.zeros((2, 4, 16, 16, 3))
  with pytest.raises(ValueError, match='trained without'):
    generate(params, *_inputs(c), video, jnp.ones((2, 4)))


@pytest.mark.parametrize('direction', ['forward', 'backward'])
def test_sliding_windows(model_and_mesh, direction):
  c, graphdef, params, mesh = model_and_mesh
  generate = sampling.make_generate(graphdef, c, num_steps=1, guidance_scale=1.0)
  kw = dict(config=c, mesh=mesh, seed=0, batch_size=2, num_frames=13, overlap=2,
            direction=direction)
  with jax.set_mesh(mesh):
    windows = sampling.long_windows(generate, params, ['a red circle'], **kw)
    long = sampling.generate_long(generate, params, ['a red circle'], **kw)
  assert len(windows) == 3 and all(w.shape == (1, 6, 16, 16, 3) for w in windows)  # 6+4+4 >= 13
  for prev, nxt in zip(windows, windows[1:]):
    if direction == 'forward':
      np.testing.assert_array_equal(nxt[:, :2], prev[:, -2:])
    else:
      np.testing.assert_array_equal(nxt[:, -2:], prev[:, :2])
  assert long.shape == (1, 13, 16, 16, 3) and long.dtype == np.uint8
  joined = sampling.join_windows(windows, 2, 13, direction)
  end = joined[:, :6] if direction == 'forward' else joined[:, -6:]
  np.testing.assert_array_equal(end, windows[0])
  with pytest.raises(ValueError, match='overlap'):
    sampling.long_windows(generate, params, ['x'], **{**kw, 'overlap': 3})


@pytest.mark.parametrize('change, message', [
    (dict(mix=(('none', 0.5), ('first', 0.6))), 'sum to 1.1'),
    (dict(mix=(('none', 0.5), ('middle', 0.5))), "unknown pattern 'middle'"),
    (dict(mix=(('first_k', 1.0),), max_frames=3), 'max_frames=3'),
    (dict(mix=(('first_last', 1.0),), max_frames=2), "pattern 'first_last'"),
    (dict(max_frames=0), 'max_frames=0'),
    (dict(context_noise=1.0), 'context_noise=1.0'),
])
def test_config_validation(change, message):
  c = cond_config()
  for k, v in change.items():
    c.condition[k] = v
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    validation.validate(c, 1)


def test_default_config_is_unconditioned():
  c = schema.base_config()
  assert not geometry.conditioning_enabled(c)
  validation.validate(c, 1)


def test_cli_inputs(tmp_path):
  c = cond_config()
  clip = np.zeros((3, 20, 24, 3), np.uint8)
  clip[:, :, :, 1] = 255  # green
  path = str(tmp_path / 'clip.mp4')
  video_io.write_mp4(path, clip)
  video, given_pix, given = frame_inputs.cli_inputs(c, image=path)
  assert video.shape == (6, 16, 16, 3) and given.tolist() == [1, 1, 0, 0, 0, 0]
  assert video[0, 8, 8, 1] > 0.9 and video[2].max() == 0  # resized, first temporal patch only
  _, _, given = frame_inputs.cli_inputs(c, video=path, extend='backward', overlap=2)
  assert given.tolist() == [0, 0, 0, 0, 1, 1]
  _, _, given = frame_inputs.cli_inputs(c, image=path, end_image=path)
  assert given.tolist() == [1, 1, 0, 0, 1, 1]
  with pytest.raises(ValueError, match='shorter than the overlap'):
    frame_inputs.cli_inputs(c, video=path, extend='forward', overlap=4)
  bad = tmp_path / 'bad.png'
  bad.write_text('not an image')
  with pytest.raises(ValueError, match='Cannot read'):
    frame_inputs.cli_inputs(c, image=str(bad))
  with pytest.raises(ValueError, match='--extend needs --video'):
    frame_inputs.cli_inputs(c, extend='forward')
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='trained without conditioning'):
    frame_inputs.cli_inputs(tiny_config(), image=path)
  # SDEdit needs no conditioning training, but a clip of the full length.
  with pytest.raises(ValueError, match='has 3 frames'):
    frame_inputs.cli_inputs(tiny_config(), video=path, edit_strength=0.5)


def test_continuity_detects_a_jump_at_the_boundary():
  from data_pipelines import shapes  # pylint: disable=g-import-not-at-top
  clip = shapes.render_clip('red', 'square', 'right', num_frames=12, height=32, width=32,
                            rng=np.random.default_rng(0))
  jump_px = 2 * conditioned_eval.max_data_step(clip[None])
  assert 1 <= jump_px <= 4  # 10-16 px over 11 steps, snapped to whole pixels
  smooth = conditioned_eval.continuity(clip[None], [4], jump_px)
  assert smooth['jump_rate'] == 0 and smooth['num_boundaries'] == 1
  jumped = clip.copy()
  jumped[4:] = np.roll(clip[4:], -8, axis=2)  # the object snaps 8 px back at frame 4
  r = conditioned_eval.continuity(jumped[None], [4], jump_px)
  assert r['jump_rate'] == 1
  assert r['step_px']['boundary']['mean'] > 3 * r['step_px']['inside']['mean']
  assert r['pixel_change']['boundary']['mean'] > r['pixel_change']['inside']['mean']
  gone = clip.copy()
  gone[4:] = 0  # a vanished object counts as a jump
  assert conditioned_eval.continuity(gone[None], [4], jump_px)['jump_rate'] == 1


def test_exits_as_prompted():
  from data_pipelines import shapes  # pylint: disable=g-import-not-at-top
  clip = shapes.render_clip('red', 'square', 'left', num_frames=12, height=32, width=32,
                            rng=np.random.default_rng(0))
  assert not conditioned_eval.exits_as_prompted(clip, 'left')  # stays whole in frame
  # Slide the last frame's object out through the left edge, 3 px a frame.
  out = [np.roll(clip[-1], -3 * k, axis=1) * (np.arange(32) < 32 - 3 * k)[None, :, None]
         for k in range(1, 12)]
  leaving = np.concatenate([clip, np.stack(out)]).astype(np.uint8)
  assert not shapes.track(leaving)['present'][-1]
  assert conditioned_eval.exits_as_prompted(leaving, 'left')
  assert not conditioned_eval.exits_as_prompted(leaving, 'right')  # left by the wrong edge
  vanished = clip.copy()
  vanished[6:] = 0  # gone mid-frame
  assert not conditioned_eval.exits_as_prompted(vanished, 'left')


def test_window_spans():
  c = cond_config()
  c.data.num_frames = 12
  assert conditioned_eval.window_spans(c, 3, 4) == [(0, 12), (8, 20), (16, 28)]


def test_conditioned_protocols_run_and_judge(model_and_mesh, tmp_path):
  c, graphdef, params, mesh = model_and_mesh
  frozen = frozen_lib.Frozen(c)
  generate = sampling.make_generate(graphdef, c, frozen=frozen, num_steps=2, guidance_scale=2.0)
  with jax.set_mesh(mesh):
    out = conditioned_eval.evaluate(generate, params, c, mesh, str(tmp_path), seed=0,
                                    frozen=frozen)
  n_seen = len(conditioning_prompts('train', c))
  i2v, ext, long = (out[k]['seen'] for k in ('image_to_video', 'extension', 'long_video'))
  assert i2v['num_videos'] == ext['num_videos'] == long['num_videos'] == n_seen
  assert set(i2v['rates']) == {'color', 'shape', 'direction', 'stable', 'size', 'all',
                               'color_shape_direction'}
  assert ext['overlap'] == 4 and ext['continuity']['num_boundaries'] == n_seen
  # 4 x 6 frames by windows of 6 overlapping by 4: 1 + ceil(18 / 2) = 10 windows, 9 boundaries each.
  assert long['num_frames'] == 24 and long['num_windows'] == 10
  assert long['continuity']['num_boundaries'] == 9 * n_seen
  assert len(long['rates']['kept_per_window']) == 10
  for r in (i2v, ext, long):
    assert all(0 <= v <= 1 for v in jax.tree.leaves(r['rates']))
  assert sorted(p.name for p in (tmp_path / 'extension' / 'seen').glob('*.mp4'))[:1]


def conditioning_prompts(split, c):
  return adherence.adherence_prompts(split, c.eval.samples_per_prompt)

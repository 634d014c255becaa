"""Video stays uint8 on the host (a quarter of float32's memory and host-to-device bytes); the train
step maps it to [-1, 1] on device, to what the host conversion used to give."""

import jax
import numpy as np

from data_pipelines import pipeline
from sora_jax.config import geometry
from sora_jax.parallel import sharding
from sora_jax.training import state as state_lib
from sora_jax.training import update


def test_pipelines_yield_uint8_video(config):
  assert next(pipeline.train_iterator(config))['video'].dtype == np.uint8
  config.data.packing, config.data.packing_length = True, 64
  packed = next(pipeline.train_iterator(config))
  assert packed['patches'].dtype == np.uint8
  # Evaluation (numpy-side consumers) still gets floats in [-1, 1].
  video = pipeline.eval_batches(config, 'heldout', 2, 2)[0]['video']
  assert video.dtype == np.float32 and -1 <= video.min() and video.max() <= 1


def test_on_device_normalisation_matches_the_old_host_conversion():
  x = np.arange(256, dtype=np.uint8).reshape(1, 4, 8, 8, 1).repeat(3, -1)
  old = x.astype(np.float32) / 127.5 - 1.0
  got = np.asarray(update.normalize_pixels(x))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, old, rtol=0, atol=6e-8)
  assert got.min() == -1.0 and got.max() == 1.0  # exact ends, never outside [-1, 1]
  floats = np.linspace(-1, 1, 8, dtype=np.float32)
  assert update.to_model_range(floats) is floats  # latents and float pixels pass


def _losses(config, *batches):
  """The train step's loss on each batch, from one initial state."""
  mesh = sharding.make_mesh(geometry.resolve_mesh_shape(config, 1), jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, _ = state_lib.init(config, mesh)
  step = jax.jit(update.make_train_step(graphdef, config, tx, schedule))
  return [float(step(state, b)[1]['loss']) for b in batches]


def test_train_step_on_uint8_equals_the_float_path(config):
  batch = next(pipeline.train_iterator(config))
  host_float = dict(batch, video=batch['video'].astype(np.float32) / 127.5 - 1.0)
  got, want = _losses(config, batch, host_float)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_packed_train_step_on_uint8_equals_the_float_path(config):
  config.data.packing, config.data.packing_length = True, 64
  batch = next(pipeline.train_iterator(config))
  real = (batch['segment_ids'] > 0)[..., None]
  # What the packer used to give: floats in [-1, 1], 0 at padding.
  host_float = dict(batch, patches=np.where(real, batch['patches'] / np.float32(127.5) - 1, 0)
                    .astype(np.float32))
  got, want = _losses(config, batch, host_float)
  np.testing.assert_allclose(got, want, rtol=1e-6)

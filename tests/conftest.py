import atexit
import os
import shutil
import tempfile

# 8 fake CPU devices for the sharding tests; must be set before JAX initialises its backend. The
# tests' programs are tiny and compile-bound: LLVM's optimisation passes (level 0 skips them) take
# longer than running the unoptimised code (a two-bucket sharded training run: 66 s -> 37 s).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8'
                      ' --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# As the programs do (cli.run): threads enough (NPROC 32) that a device's concurrent collectives
# cannot take them all, and a rendezvous timeout that tolerates 8 devices on 2 busy cores (a train
# step aborted at XLA:CPU's default 40 s; see topologies.enough_cpu_threads).
from sora_jax.parallel import topologies  # noqa: E402

topologies.enough_cpu_threads()
# Many tests build the same tiny programs afresh (a train run per test, CLI subprocesses); one
# persistent compilation cache for the session (inherited by the subprocesses) compiles each once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='sora_jax_test_jit_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

# Tests build models directly, outside any mesh: parameters are placed later from their logical-axis
# metadata, as training/factory.py and the importers do for the programs.
nnx.use_eager_sharding(False)

from sora_jax.config import schema


def tiny_config():
  """A model small enough that a CPU step takes milliseconds."""
  c = schema.base_config()
  c.batch_size = 8
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.data.num_frames, c.data.height, c.data.width = 4, 16, 16
  c.model.patch_size = (2, 4, 4)
  c.model.width, c.model.depth, c.model.num_heads = 48, 2, 4
  c.text.width, c.text.depth, c.text.num_heads, c.text.max_length = 32, 1, 2, 40
  c.optim.warmup_steps = 2
  c.sample.num_steps = 3
  c.num_train_samples = 2
  c.eval.num_videos, c.eval.batch_size, c.eval.num_timesteps = 8, 8, 2
  return c


def bucketed_config(buckets, patch_size, **data):
  """`tiny_config` over user videos in size buckets [(T, H, W), ...]; `data` sets config.data keys."""
  c = tiny_config()
  c.model.patch_size = patch_size
  c.data.buckets = tuple(buckets)
  c.data.fps = 8
  c.data.probe_threads = 2
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture
def config():
  return tiny_config()


def _listing(folder):
  return sorted((os.path.relpath(os.path.join(d, f), folder), os.path.getsize(os.path.join(d, f)))
                for d, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """(config, workdir) of one `tiny_config` training run (6 steps; checkpoints 2, 4, 6; samples at
  step 6), trained once per session for every test that only reads a trained workdir. Tests must not
  write into it (copy it first): its file listing is checked unchanged at the end."""
  from sora_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('tiny_run'))
  train.train(tiny_config(), workdir)
  before = _listing(workdir)
  yield tiny_config(), workdir
  assert _listing(workdir) == before, 'a test wrote into the shared tiny_run workdir'

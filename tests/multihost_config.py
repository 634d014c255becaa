r"""A model small enough that a CPU step takes milliseconds, trained on a manifest of clips, for the
multi-process tests (tests/test_multihost.py):

  launch/local.sh --num_processes=2 --devices_per_process=2 -- python -m sora_jax.train \
    --config=tests/multihost_config.py --config.data.manifest=clips/manifest.jsonl --workdir=runs/mh
"""
from sora_jax.config import schema


def get_config():
  c = schema.base_config()
  c.batch_size = 8  # 2 rows per device on 4 devices
  c.total_steps = 6
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 10
  c.num_train_samples = 1
  c.sample.num_steps = 1
  c.data.num_frames, c.data.height, c.data.width, c.data.fps = 4, 16, 16, 8
  c.data.probe_threads = 1
  c.data.read_threads = 1
  c.model.patch_size = (2, 4, 4)
  c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
  c.text.width, c.text.depth, c.text.num_heads, c.text.max_length = 32, 1, 2, 24
  c.text.word_buckets = 64
  c.optim.warmup_steps = 2
  return c

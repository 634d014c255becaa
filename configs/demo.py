r"""Demo: captioned shapes, 12 frames of 32x32 pixels, on a 2-core CPU in well under 15 minutes.

  python -m sora_jax.train --config=configs/demo.py --workdir=runs/demo
  python -m sora_jax.evaluate --workdir=runs/demo --output=runs/demo/eval.json
"""

from sora_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.batch_size = 16
  config.total_steps = 1500
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.data.num_frames = 12
  config.data.height = 32
  config.data.width = 32
  config.model.patch_size = (2, 4, 4)
  config.model.width = 192
  config.model.depth = 4
  config.model.num_heads = 4
  config.text.width = 128
  config.text.depth = 2
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 100
  return config

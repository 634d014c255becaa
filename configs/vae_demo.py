r"""Demo autoencoder: a small causal video VAE (the Wan-VAE architecture) on the captioned shapes.

  python -m sora_jax.train --config=configs/vae_demo.py --workdir=runs/vae_demo
  python -m sora_jax.evaluate --workdir=runs/vae_demo --output=runs/vae_demo/eval.json   # PSNR
  python -m sora_jax.train --config=configs/demo.py:runs/vae_demo --workdir=runs/demo_latent

13 frames of 32x32 -> 4 latent frames of 8x8x8 (4x temporal, 4x spatial: the first frame is encoded
alone, so an image is a 1-frame video in the same latent space). Wan's own VAE compresses 8x
spatially with 16 channels; at 32x32 pixels that leaves 4x4 latents, too coarse for the demo's shapes.

Measured (2026-11-27, 2 CPU cores shared with other jobs): 500 steps in 36 min wall, 1.1 GB peak RSS;
reconstruction PSNR 15.1 dB on held-out clips (64; 15.1 seen), L1 0.10 in [-1, 1]. That is an
undertrained VAE: colour and motion survive, shapes come back as blobs (triangles judged as circles).
3D convolutions are slow on XLA:CPU; train it longer on an accelerator.
"""
from sora_jax.config import schema


def get_config():
  config = schema.base_config()
  config.model.family = 'vae'
  config.batch_size = 8
  config.total_steps = 500
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.num_train_samples = 4
  config.data.num_frames = 13
  config.data.height = 32
  config.data.width = 32
  config.vae.base_dim = 8
  config.vae.z_dim = 8
  config.vae.dim_mult = (1, 2, 2)
  config.vae.num_res_blocks = 1
  config.vae.temperal_downsample = (True, True)
  config.vae.l1_weight = 1.0
  config.vae.l2_weight = 1.0
  config.vae.kl_weight = 1e-6
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.0
  config.eval.num_videos = 64
  config.eval.batch_size = 16
  return config

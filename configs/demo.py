r"""Demo: captioned shapes, 12 frames of 32x32 pixels, trained on a 2-core CPU in under 15 minutes.

  python -m sora_jax.train --config=configs/demo.py --workdir=runs/demo
  python -m sora_jax.evaluate --workdir=runs/demo --output=runs/demo/eval.json

Pixel space; 2x8x8 spacetime patches give 96 tokens per clip, which is what a 2-core CPU affords.
Measured on 2 CPU cores (2026-11-27): training 13.9 min wall, 1.6 GB peak RSS; evaluate (3 videos per
prompt: 204 seen / 48 held-out, judged from the mp4s): seen colour 1.00, shape 0.79, direction 0.88,
stable 0.97; held-out colour 1.00, shape 0.88, direction 0.94, stable 0.96 (constant CFG 4). With the
linear CFG schedule (set here until 2026-12-08): seen 1.00 / 0.89 / 0.85 / 0.97, held-out 1.00 / 0.83 / 0.90 / 0.96,
and 0.15% of pixels lit away from the object instead of 1.6% (the speckles).
Re-measured 2026-12-07 (K and V projections at the fused kernel's init scale; the judge now also checks
the object's size): training 10 min; seen colour 1.00, shape 0.81, direction 0.95, stable 0.97, size
0.74; held-out 1.00 / 0.77 / 0.92 / 0.94 / 0.92 (docs/results.md).
Re-measured 2026-12-08 as set here (4000 steps, about 12 min alone; per-frame flow times for half the
clips; 'hat' guidance; 50 sampling steps): seen colour 1.00, shape 0.90, direction 0.95, stable 0.99,
size 0.98, all 0.85, stable and sized 0.975, no black video; held-out 1.00 / 0.81 / 0.94 / 0.96 /
0.96, all 0.77 (docs/results.md).
"""
from sora_jax.config import schema


def get_config(autoencoder: str = ''):
  """`configs/demo.py:runs/vae_demo` diffuses in the latent space of that autoencoder run instead."""
  config = schema.base_config()
  config.batch_size = 16
  # 4000 steps: about 12 minutes alone on 2 cores (5.7 steps/s); seen shape 0.74 -> 0.875 vs 3000.
  config.total_steps = 4000
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.data.num_frames = 12
  config.data.height = 32
  config.data.width = 32
  config.model.patch_size = (2, 8, 8)
  config.model.width = 128
  config.model.depth = 4
  config.model.num_heads = 4
  config.text.width = 128
  config.text.depth = 2
  config.diffusion.prediction = 'x0'  # 384-dim pixel patches > width: predict the clean clip
  config.diffusion.shift = 2.0
  config.diffusion.shift_base_tokens = 96
  # Half the clips get a flow time per frame: with some frames clean, where the object goes next
  # depends on the caption's direction word, which otherwise barely matters for denoising (0.32 ->
  # 0.82 judged). The other half train what the sampler does (one time for every frame): at 80%
  # per-frame, 7 of 204 samples came out black and squares grew (stable and sized 0.87 -> 0.975).
  config.diffusion.frame_noise_prob = 0.5
  # x0 prediction + velocity loss weights the x0 error by 1/t^2: capped at t = 0.3, the few near-clean
  # examples stop dominating the gradient, and shape/direction binding improves (shape 0.68 -> 0.79).
  config.diffusion.loss_t_floor = 0.3
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  # CFG 4 at every step speckles the background (1.6% of pixels lit away from the object; 0.15% when the
  # scale falls to 1 at t = 0): guide the layout, not the detail. Guidance at t near 1 swells the
  # blurred first predictions into oversized squares (of the data's size: 0.31 linear, 0.75 'hat'),
  # so the scale is 4 at t = 0.5 and 1 at both ends (docs/results.md).
  config.sample.guidance_schedule = 'hat'
  config.sample.num_steps = 50  # than 30: objects of the data's size 0.89 -> 0.93 (seen prompts x 2)
  config.eval.samples_per_prompt = 3  # 204 seen + 48 held-out judged videos: +-3% rather than +-6%
  if autoencoder:
    # configs/vae_demo.py: 13 frames of 32x32 -> 4 x 8 x 8 latents of 8 channels; 1x2x2 patches give
    # 64 tokens of 32 values, so the velocity is predicted directly.
    config.autoencoder = autoencoder
    config.data.num_frames = 13
    config.model.patch_size = (1, 2, 2)
    config.diffusion.prediction = 'velocity'
    config.diffusion.shift_base_tokens = 64
    config.sample.guidance_schedule = 'constant'  # the latent demo's figures (README) were measured so
    config.sample.num_steps, config.total_steps = 30, 3000  # likewise
    config.diffusion.frame_noise_prob = 0.8
  return config

r"""The demo (configs/demo.py) trained to also condition on given frames: image-to-video, forward /
backward extension and sliding-window long videos from one model
(sora_jax/diffusion/given_frames.py).

  python -m sora_jax.train --config=configs/demo_conditioned.py --workdir=runs/demo_conditioned
  python -m sora_jax.sample --workdir=runs/demo_conditioned --prompt="a red circle moving left" \
      --image=first.png --output_dir=out

With 2x8x8 patches a given "frame" is a temporal patch of 2 frames; 12 frames = 6 temporal patches,
of which first_k / last_k give 1 or 2; an image fills the first patch (both frames).
Measured on 2 CPU cores (2026-11-27; `python -m sora_jax.evaluate --workdir=runs/demo_conditioned
--guidance_scale=2 ...`, 3 videos per prompt): training 15.6 min (other jobs running); seen pairs:
image-to-video colour+shape+direction 0.89 (held-out 0.85), forward extension same object without a
jump 0.99 (0.92), text-to-video colour/shape/direction/stable 0.95/0.85/0.87/0.88; 4x-length videos
keep colour and shape in every window 0.60 from an image, 0.51 from text (objects leave the frame).
Long-video recipes (README, Evaluation): --config.total_steps=9000 with --config.data.bounce=0.3:
every window 0.95 from an image, 0.82 from text, text-to-video direction 0.61; with
--config.data.stop=0.3: 0.84 / 0.77, direction 0.84, image-to-video 0.99, extension 1.00; with
bounce=0.15 and stop=0.15: 0.93 / 0.78, direction 0.61; with stop=0.3 and rest=0.15 (best long
videos): 0.98 / 0.87, direction 0.74, image-to-video 1.00, extension 1.00 (resumed to 13500 steps:
1.00 / 0.89; from text with --sampler=heun 0.92). Bouncing at
3000 steps: 0.58 from an image, direction 0.29 (model width 192: 0.60, 0.40).
The figures above are from the earlier mix ('none' 0.3, per-frame times for 80% of clips). With the
mix set here (2026-12-08, seed 0): text-to-video colour/shape/direction/stable 1.00/0.80/0.89/0.97
(held-out 1.00/0.92/0.83/0.98), no black sample in 252 (seed 1: 2 in 252, direction 0.58);
image-to-video 0.82 (0.77), extension same object 0.97 (0.98); 4x videos keep colour and shape in
every window 0.66 from an image (held-out 0.69), 0.62 from text (0.625).
"""

from sora_jax.config import schema

demo = schema.config_file(__file__, 'demo.py')


def get_config(autoencoder: str = ''):
  config = demo.get_config(autoencoder)
  # The figures above (demo.py trains 4000 steps and samples 50 since 2026-12-08).
  config.total_steps, config.sample.num_steps = 3000, 30
  # Text-to-video stays the largest share; 'first' is image-to-video, first_k / last_k extension
  # (and every sliding window after the first), first_last connects two clips.
  # Text-to-video samples start with nothing given and one flow time for every frame; with 'none' at
  # 0.3 and per-frame times for 80% of clips, only 6% of clips trained that (the unconditioned demo:
  # 20%): up to 13% of text-to-video samples came out black (0, 20 and 26 of 204 in three runs) and
  # objects often stood still (direction 0.35-0.82).
  # 'none' 0.4 with per-frame times for half the clips makes it 20%: 0 and 1 black of 204 in two seeds
  # (docs/results.md, 2026-12-08).
  config.condition.mix = (('none', 0.4), ('first', 0.25), ('first_k', 0.15), ('last_k', 0.1),
                          ('first_last', 0.1))
  config.diffusion.frame_noise_prob = 0.5
  config.condition.max_frames = 2
  # Given frames carry colour and shape; strong text guidance distorts them (image-to-video judged
  # colour+shape+direction at CFG 2 / 3 / 4 / 6: 0.90 / 0.86 / 0.81 / 0.70 on seen pairs).
  config.sample.guidance_scale = 2.0
  # At CFG 2 speckles are already rare (0.17% of pixels away from the object); figures above are constant.
  config.sample.guidance_schedule = 'constant'
  return config

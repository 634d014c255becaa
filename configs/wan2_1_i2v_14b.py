r"""Wan 2.1 image-to-video 14B (480P): configs/wan2_1_t2v_14b.py conditioned on each clip's first frame.

  python -m sora_jax.train --config=configs/wan2_1_i2v_14b.py:/models/Wan2.1-I2V-14B-480P-Diffusers \
      --config.data.manifest=videos.csv --workdir=runs/wan_i2v
  python -m sora_jax.sample --workdir=runs/wan_i2v --image=first.png --prompt="..." --output_dir=out
  python -m sora_jax.compile --config=configs/wan2_1_i2v_14b.py --topology=v5p-8

The argument is a local diffusers `WanImageToVideoPipeline` folder (transformer/, vae/, text_encoder/,
tokenizer/, image_encoder/, image_processor/; nothing is downloaded). As WanImageToVideoPipeline
conditions it: the transformer's input is 36 channels, the noisy latents (16), a 4-channel frame
mask (ones on the first latent frame) and the VAE latents of [first frame, zero frames] (16); the
first frame's CLIP ViT-H/14 tokens (hidden_states[-2], 257 x 1280) join the text in cross-attention.
Both come from frozen encoders before the train step (sora_jax/inference/frozen.py); the loss is on
the 16 noisy-latent channels, every frame (sora_jax/training/objectives/wan_i2v.py). The 720P model:
the 720P folder and --config.data.height=720 --config.data.width=1280 (shift 5.0 as released).
Without the argument the config carries the architecture (sora_jax/interop/architectures: the
released config.json files, no weights), enough for `sora_jax.compile`.
"""

import os

from sora_jax.config import schema

ARCHITECTURE = os.path.join(os.path.dirname(schema.__file__), '..', 'interop', 'architectures',
                            'wan2_1_i2v')


def get_config(path: str = ''):
  config = schema.config_file(__file__, 'wan2_1_t2v_14b.py').get_config(path)
  config.image_encoder = path or os.path.normpath(ARCHITECTURE)
  config.model.wan.image_dim = 1280  # CLIP ViT-H/14's width: Wan 2.1 I2V's image_dim
  config.diffusion.shift = 3.0  # Wan's recommended sample_shift at 480P (720P: 5.0)
  return config

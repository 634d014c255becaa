r"""Wan 2.2 TI2V-5B: one 5B transformer for text-to-video and image-to-video, in the Wan 2.2 VAE's latents.

  python -m sora_jax.train --config=configs/wan2_2_ti2v_5b.py:/models/Wan2.2-TI2V-5B-Diffusers \
      --config.data.manifest=videos.csv --workdir=runs/ti2v
  python -m sora_jax.sample --workdir=runs/ti2v --prompt="..." --output_dir=out               # T2V
  python -m sora_jax.sample --workdir=runs/ti2v --image=first.png --prompt="..." --output_dir=out
  python -m sora_jax.compile --config=configs/wan2_2_ti2v_5b.py --topology=v5p-8

The argument is a local diffusers WanPipeline folder of Wan2.2-TI2V-5B-Diffusers (model_index.json
`expand_timesteps: true`, transformer/, vae/ = the Wan 2.2 VAE: 48 channels, x16 spatial, x4
temporal; text_encoder/ umT5-XXL; nothing downloaded); without it the config carries the architecture
alone (sora_jax/interop/architectures/wan2_2_ti2v: the released config.json files), enough for
`sora_jax.compile`. Transformer: Wan 2.1's architecture at 30 layers, 24 heads x 128 (width 3072),
FFN 14336, 48 channels in and out.

Image-to-video is sora_jax's given-frames conditioning (diffusion/given_frames.py), exactly what
diffusers' TI2V pipeline does: the first latent frame is the image's (normalised) VAE latents, reset
at every step, with timestep 0 on its tokens; no mask channel, no CLIP (model.wan.expand_timesteps).
Training draws per clip from config.condition.mix: half the clips plain text-to-video, half with the
first frame given (clean, t = 0, left out of the loss). Upstream released no training code;
DiffSynth-Studio's TI2V-5B fine-tuning trains one or the other (image-to-video when the dataset has
`input_image`); the even mix keeps both abilities of the released model. Context noise stays 0:
the model tells a given frame from a generated one only by its timestep of 0.

Released settings (Wan 2.2's ti2v-5B config, diffusers' example): 704 x 1280 (or 1280 x 704), 121
frames at 24 fps, shift 5.0, guidance 5.0, 50 steps; this config trains and samples at that size:
31 x 44 x 80 latents, 27,280 tokens with 1 x 2 x 2 patches (fewer than Wan 2.1's 480p x 81 frames,
32,760), so shift_base_tokens puts shift 5.0 there. For 480p (--config.data.height=480
--config.data.width=832 --config.data.num_frames=81: 21 x 30 x 52 latents, 8,190 tokens) the shift
follows sqrt(tokens / base) (2.7); set --config.diffusion.shift_base_tokens=8190 to keep 5.0.
Parallelism as configs/wan2_1_t2v_1_3b.py (24 heads divide mesh.context 4).
"""

import os

from sora_jax.config import schema

ARCHITECTURES = os.path.join(os.path.dirname(schema.__file__), '..', 'interop', 'architectures')


def get_config(path: str = ''):
  config = schema.config_file(__file__, 'wan2_1_t2v_1_3b.py').get_config(path)
  if not path:
    config.autoencoder = os.path.normpath(os.path.join(ARCHITECTURES, 'wan2_2_ti2v', 'vae'))
    config.text.path = os.path.normpath(os.path.join(ARCHITECTURES, 'wan2_1_t2v'))
  w = config.model.wan
  w.num_attention_heads, w.attention_head_dim, w.ffn_dim, w.num_layers = 24, 128, 14336, 30
  w.expand_timesteps = True
  config.condition.mix = (('none', 0.5), ('first', 0.5))
  config.condition.max_frames = 1
  config.data.num_frames, config.data.height, config.data.width, config.data.fps = 121, 704, 1280, 24
  config.diffusion.shift = 5.0
  config.diffusion.shift_base_tokens = 27280
  config.sample.num_steps = 50
  config.sample.guidance_scale = 5.0
  return config

r"""Wan 2.2 A14B (text-to-video or image-to-video): two 14B experts switched by timestep; a run trains one.

  python -m sora_jax.train --config=configs/wan2_2_a14b.py:/models/Wan2.2-T2V-A14B-Diffusers \
      --config.model.wan.expert=low_noise --config.data.manifest=videos.csv --workdir=runs/a14b_low
  python -m sora_jax.sample --workdir=runs/a14b_low --prompt="..." --output_dir=out
  python -m sora_jax.train --config=configs/wan2_2_a14b.py:/models/Wan2.2-I2V-A14B-Diffusers \
      --config.model.wan.expert=high_noise --config.data.manifest=videos.csv --workdir=runs/i2v_high
  python -m sora_jax.sample --workdir=runs/i2v_high --image=first.png --prompt="..." --output_dir=out
  python -m sora_jax.compile --config=configs/wan2_2_a14b.py --topology=v5p-8       # T2V
  python -m sora_jax.compile --config=configs/wan2_2_a14b.py:i2v --topology=v5p-8   # I2V

The argument is a local diffusers WanPipeline / WanImageToVideoPipeline folder of Wan 2.2 A14B
(transformer/ the high-noise expert, transformer_2/ the low-noise one, model_index.json's
boundary_ratio, vae/ = Wan 2.1's VAE, text_encoder/ umT5-XXL; nothing downloaded), the task read from
it; or 't2v' / 'i2v' for the architecture alone (the released values below; enough for compile).
Each expert is Wan 2.1 T2V-14B's architecture; I2V's take the 36-channel input (noisy latents, frame
mask, first-frame latents) without CLIP image tokens.

One expert per run (config.model.wan.expert; default high_noise): both experts with their float32
weights, EMA and Adam moments would double the 14 bytes per parameter of configs/wan2_1_t2v_14b.py,
and upstream fine-tunes them separately. The run samples training times only on its expert's side
of the boundary (t >= boundary_ratio high, t < boundary_ratio low; the shifted logit-normal
restricted to it) and starts from that expert's folder. Sampling switches to the other expert, from
the folder, at the boundary as diffusers does, with guidance_scale_2 on the low-noise steps.
Released sampling settings (Wan 2.2's configs): T2V shift 12, guidance 4.0 / 3.0 (high / low),
boundary 0.875; I2V shift 5, guidance 3.5 / 3.5, boundary 0.9; 40 steps. The training shift is the
sampling one, as in the Wan 2.1 configs.
"""

import json
import os

from sora_jax.config import schema

RELEASED = {  # task: (boundary_ratio, shift, guidance_scale (high), guidance_scale_2 (low))
    't2v': (0.875, 12.0, 4.0, 3.0),
    'i2v': (0.9, 5.0, 3.5, 3.5),
}


def task_of(path: str) -> str:
  """'i2v' for a WanImageToVideoPipeline folder, else 't2v'."""
  with open(os.path.join(path, 'model_index.json')) as f:
    return 'i2v' if json.load(f).get('_class_name') == 'WanImageToVideoPipeline' else 't2v'


def get_config(arg: str = ''):
  task, path = (arg, '') if arg in ('', 't2v', 'i2v') else (task_of(arg), arg)
  task = task or 't2v'
  config = schema.config_file(__file__, 'wan2_1_t2v_14b.py').get_config(path)
  ratio, shift, scale, scale_2 = RELEASED[task]
  if path:
    with open(os.path.join(path, 'model_index.json')) as f:
      ratio = float(json.load(f).get('boundary_ratio') or 0.0)  # validation names a folder without
  config.model.wan.boundary_ratio = ratio
  config.model.wan.expert = 'high_noise'
  config.model.wan.image_condition = task == 'i2v'
  config.diffusion.shift = shift
  config.sample.num_steps = 40
  config.sample.guidance_scale, config.sample.guidance_scale_2 = scale, scale_2
  return config

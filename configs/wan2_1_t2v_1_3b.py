r"""Wan 2.1 text-to-video 1.3B: the released architecture, fine-tuned from its weights in latent space.

  python -m sora_jax.train --config=configs/wan2_1_t2v_1_3b.py:/models/Wan2.1-T2V-1.3B-Diffusers \
      --config.data.manifest=videos.csv --workdir=runs/wan13b
  python -m sora_jax.compile --config=configs/wan2_1_t2v_1_3b.py --topology=v5p-8

The argument is a local diffusers `WanPipeline` folder (transformer/, vae/, text_encoder/, tokenizer/;
nothing is downloaded): its transformer weights initialise the model (`init_from`), its causal VAE is
the frozen autoencoder (81 frames of 480x832 -> 21x60x104 latents of 16 channels, 32760 tokens with
1x2x2 patches) and its umT5-XXL the frozen text encoder (512 tokens of width 4096). Without the
argument the config carries the architecture alone (sora_jax/interop/architectures/wan2_1_t2v: the
released config.json files, no weights): enough for `sora_jax.compile`, and training from it fails at
weight loading, asking for the folder.

Parallelism, for TPU slices and GPU nodes: each example's tokens are split over `mesh.context` chips
(Ulysses all-to-all attention, splash/cuDNN flash kernels); the remaining chips form the FSDP axis, one
example per FSDP group (global batch = chips / context; override --config.batch_size to match the
slice); parameters, EMA and Adam moments are sharded over all chips (fsdp x context). bf16 compute,
float32 master weights, full remat, scanned layers.
"""

import os

from sora_jax.config import schema

ARCHITECTURE = os.path.join(os.path.dirname(schema.__file__), '..', 'interop', 'architectures',
                            'wan2_1_t2v')


def get_config(path: str = ''):
  config = schema.base_config()
  folder = path or os.path.normpath(ARCHITECTURE)
  if path:
    config.init_from = path
  config.autoencoder = (os.path.join(folder, 'vae') if os.path.isdir(os.path.join(folder, 'vae'))
                        else folder)
  config.text.path = folder
  config.text.encoder = 'umt5'
  config.text.max_length = 512  # Wan pads umT5 embeddings to 512 tokens
  config.batch_size = 1  # one example per FSDP group: chips / mesh.context
  config.total_steps = 2000
  config.log_every_steps = 10
  config.checkpoint_every_steps = 250
  config.mesh.data, config.mesh.fsdp, config.mesh.context = 1, -1, 4
  config.data.num_frames = 81
  config.data.height = 480
  config.data.width = 832
  config.data.fps = 16
  config.model.family = 'wan'
  config.model.patch_size = (1, 2, 2)
  # model.wan defaults are the 1.3B model: 30 layers, 12 heads x 128, FFN 8960.
  config.model.dtype = 'bfloat16'
  config.model.remat = 'full'
  config.model.attention = 'auto'  # splash on TPU, cuDNN flash on GPU
  config.model.context_parallel = 'all_to_all'  # heads (12) divisible by mesh.context (4)
  config.diffusion.prediction = 'velocity'
  # Wan samples with shift 5 at 480p (flow_shift in its scheduler config).
  config.diffusion.shift = 5.0
  config.diffusion.shift_base_tokens = 32760
  config.optim.learning_rate = 1e-5
  config.optim.warmup_steps = 100
  config.optim.weight_decay = 0.0
  config.optim.ema_decay = 0.999
  config.sample.num_steps = 50
  config.sample.guidance_scale = 5.0
  config.eval.batch_size = 8
  return config

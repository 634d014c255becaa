r"""Wan 2.1 text-to-video 1.3B, LoRA fine-tuning: rank-32 adapters on the attention and FFN layers
of every block, the base frozen in bfloat16.

  python -m sora_jax.train \
      --config=configs/wan2_1_t2v_1_3b_lora.py:/models/Wan2.1-T2V-1.3B-Diffusers \
      --config.data.manifest=videos.csv --workdir=runs/wan13b_lora
  python -m sora_jax.export --workdir=runs/wan13b_lora --output=wan13b_lora.safetensors \
      --format=lora

configs/wan2_1_t2v_1_3b.py with config.lora set: the argument is the same local diffusers
`WanPipeline` folder, whose transformer becomes the frozen base (`init_from`) and whose VAE and umT5
stay the frozen encoders. Only the adapters (43.7M parameters at rank 32, 3% of the 1.42B base),
their Adam moments and EMA train and are checkpointed; the bf16 base halves the frozen weights'
memory. `--config.lora.init_from=FILE` starts the adapters from a LoRA file (ComfyUI, diffusers or
musubi layout, same rank). Samples of the prompts below are written to samples/step_N/ every 250
steps, to watch the adapters take hold.
"""

from sora_jax.config import schema


def get_config(path: str = ''):
  config = schema.config_file(__file__, 'wan2_1_t2v_1_3b.py').get_config(path)
  config.lora.rank = 32
  config.lora.alpha = 32.0  # scale alpha / rank = 1, the common choice for released Wan LoRAs
  config.lora.base_dtype = 'bfloat16'
  # Adapters start at zero update and have few parameters: 10x the full fine-tuning rate.
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 50
  config.sample_every_steps = 250
  config.num_train_samples = 2
  config.sample.num_steps = 30
  config.sample.prompts = (
      'A cat walks on the grass, realistic style.',
      'A red sports car drives along a coastal road at sunset, aerial view.',
  )
  return config

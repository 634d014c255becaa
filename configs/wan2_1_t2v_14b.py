r"""Wan 2.1 text-to-video 14B: configs/wan2_1_t2v_1_3b.py with the 14B architecture.

  python -m sora_jax.compile --config=configs/wan2_1_t2v_14b.py --topology=v5p-8 \
      --config.data.height=720 --config.data.width=1280
  python -m sora_jax.train --config=configs/wan2_1_t2v_14b.py:/models/Wan2.1-T2V-14B-Diffusers \
      --config.data.manifest=videos.csv --workdir=runs/wan14b

The same VAE and umT5-XXL as the 1.3B model; the transformer: 40 layers, 40 heads x 128 (width
5120), FFN 13824. 720p x 81 frames is 21x90x160 latents: 75,600 tokens per example.
"""

from sora_jax.config import schema


def get_config(path: str = ''):
  config = schema.config_file(__file__, 'wan2_1_t2v_1_3b.py').get_config(path)
  w = config.model.wan
  w.num_attention_heads, w.attention_head_dim, w.ffn_dim, w.num_layers = 40, 128, 13824, 40
  # Float32 weights, EMA and second moment, bfloat16 first moment: 14 bytes per parameter, so the
  # 14B state takes 50 GB of each v5p chip on v5p-8 (float32 moments: 57 GB, and 720p no longer fits).
  config.optim.mu_dtype = 'bfloat16'
  return config

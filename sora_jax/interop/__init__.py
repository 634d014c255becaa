"""Importers of open weights (diffusers / Hugging Face folders, read with safetensors, no torch)."""

from sora_jax.interop.clip_vision import load_clip_vision_encoder
from sora_jax.interop.umt5 import load_umt5_encoder
from sora_jax.interop.wan_transformer import load_wan_transformer
from sora_jax.interop.wan_vae import load_wan_vae

"""Wan 2.2 A14B's two experts split flow time at the pipeline's boundary_ratio, as diffusers'
WanPipeline / WanImageToVideoPipeline do: the high-noise expert (transformer/) runs the steps whose
timestep t * 1000 (num_train_timesteps) is >= boundary_ratio * 1000, the low-noise expert
(transformer_2/) the others. A run trains one expert on its side of the boundary (`time_range`)."""

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
EXPERTS = ('high_noise', 'low_noise')


def is_high_noise(t, boundary_ratio: float):
  """Flow time t (array or float) -> whether diffusers runs the high-noise expert there: its test
  `timestep >= boundary_ratio * num_train_timesteps` on the 0..1000 timestep, written the same way."""
  return t * NUM_TRAIN_TIMESTEPS >= boundary_ratio * NUM_TRAIN_TIMESTEPS


def time_range(expert: str, boundary_ratio: float) -> tuple[float, float]:
  """The flow times [lo, hi) an expert is trained on: [boundary, 1] high, [0, boundary) low."""
  if expert not in EXPERTS:
    raise ValueError(f'expert={expert!r}: expected one of {EXPERTS}')
  return (boundary_ratio, 1.0) if expert == 'high_noise' else (0.0, boundary_ratio)


def partner(expert: str) -> str:
  """The other expert of the pair."""
  return EXPERTS[1 - EXPERTS.index(expert)]


def step_experts(timesteps, boundary_ratio: float) -> list[str]:
  """The expert each step of a sampling schedule (times [N + 1], from 1 to 0) runs."""
  t = np.asarray(timesteps, np.float32)[:-1]
  return ['high_noise' if h else 'low_noise' for h in is_high_noise(t, np.float32(boundary_ratio))]

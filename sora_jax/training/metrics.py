"""metrics.jsonl + TensorBoard scalars and sample videos (process 0 only), and the console progress
line."""

import fractions
import io
import json
import math
import os
import time

import av
import jax
import numpy as np
from absl import logging


class Writer:

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not self.active:
      return
    # Lines logged after the checkpoint we resume from are logged again; drop the stale copies.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    from tensorboardX import \
        SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def write_videos(self, step: int, videos, captions, fps: float):
    """Sample videos (uint8 [N, T, H, W, 3]) as TensorBoard videos, tag samples/<i> per prompt
    index, and their captions as text (samples/prompts), in the event file of the loss curve.

    A TensorBoard video is an image summary holding an animated GIF. tensorboardX's add_video makes
    the GIF with moviepy (plus imageio, its bundled FFmpeg and Pillow), which we do not install;
    without it, it logs an error and writes an empty image. PyAV's FFmpeg writes the same GIF."""
    if not self.active:
      return
    from tensorboardX.proto.summary_pb2 import \
        Summary  # pylint: disable=g-import-not-at-top
    values = []
    for i, video in enumerate(np.asarray(videos)):
      gif, height, width = encode_gif(video, fps)
      values.append(Summary.Value(tag=f'samples/{i}', image=Summary.Image(
          height=height, width=width, colorspace=3, encoded_image_string=gif)))
    self.tb.file_writer.add_summary(Summary(value=values), step)
    self.tb.add_text('samples/prompts', '\n\n'.join(f'{i}: {c}' for i, c in enumerate(captions)),
                     step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.tb.close()


# TensorBoard's sample videos are previews (the full-size mp4s are in samples/): beyond this, the
# GIF and the time to encode it grow with the frame's area (a 480x832 Wan clip of 81 frames at full
# size: ~12 MB and ~30 s a video).
GIF_MAX_SIDE = 256


def encode_gif(frames, fps: float, max_side: int = GIF_MAX_SIDE) -> tuple[bytes, int, int]:
  """uint8 [T, H, W, 3] -> (a looping animated GIF at `fps`, its height, its width): scaled down to
  at most `max_side` pixels on the long side, with one 256-colour palette fitted to the whole clip
  (FFmpeg's palettegen / paletteuse; GIF's fixed 3-3-2 palette would band smooth shading)."""
  frames = np.asarray(frames)
  height, width = frames.shape[1:3]
  scale = min(1.0, max_side / max(height, width))
  out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
  time_base = 1 / fractions.Fraction(fps).limit_denominator(1001)
  graph = av.filter.Graph()
  chain = [graph.add_buffer(width=width, height=height, format='rgb24', time_base=time_base)]
  if scale < 1:
    chain.append(graph.add('scale', f'{out_w}:{out_h}:flags=area'))
  split, palette = graph.add('split'), graph.add('palettegen', 'stats_mode=full')
  use, sink = graph.add('paletteuse'), graph.add('buffersink')
  for a, b in zip(chain, chain[1:] + [split]):
    a.link_to(b)
  split.link_to(palette, 0, 0)
  split.link_to(use, 1, 0)
  palette.link_to(use, 0, 1)
  use.link_to(sink)
  graph.configure()
  for i, f in enumerate(frames):
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format='rgb24')
    frame.pts, frame.time_base = i, time_base
    graph.push(frame)
  graph.push(None)  # the palette exists only once every frame is in
  out = io.BytesIO()
  with av.open(out, 'w', format='gif') as container:
    stream = container.add_stream('gif', rate=1 / time_base)
    stream.width, stream.height, stream.pix_fmt = out_w, out_h, 'pal8'
    while True:
      try:
        frame = graph.pull()
      except (av.error.EOFError, av.error.BlockingIOError):  # pytype: disable=module-attr
        break
      container.mux(stream.encode(frame))
    container.mux(stream.encode())
  return out.getvalue(), out_h, out_w


class NonFinite:
  """Counts the train steps that had a non-finite loss or gradient norm (update.py leaves the state
  unchanged on them) from each step's device flag, read only where the loop reads the device anyway
  (log and checkpoint steps): no host sync per step."""

  def __init__(self, limit: int, step: int):
    self.limit, self.step = limit, step  # `step`: the step before the first flag
    self.flags, self.in_a_row, self.first = [], 0, None

  def add(self, flag):
    self.flags.append(flag)

  def limit_reached(self) -> bool:
    """Reads the flags since the last call and warns of non-finite steps among them; whether
    `limit` steps in a row were non-finite."""
    flags, self.flags = [int(f) for f in jax.device_get(self.flags)], []
    last, reached = self.step + len(flags), False
    for flag in flags:
      self.step += 1
      self.in_a_row = self.in_a_row + 1 if flag else 0
      self.first = self.step if self.in_a_row == 1 else self.first
      if self.in_a_row >= self.limit:
        reached = True
        break
    if any(flags):
      logging.warning('%d of the %d steps up to step %d had a non-finite loss or gradient norm and'
                      ' changed no weights (%d in a row; config.optim.max_nonfinite_steps=%d in a'
                      ' row stop the run).', sum(flags), len(flags), last, self.in_a_row,
                      self.limit)
    return reached

  def error(self, step: int, last_checkpoint: str) -> FloatingPointError:
    return FloatingPointError(
        f'Steps {self.first}-{self.step} all had a non-finite loss or gradient norm'
        f' (config.optim.max_nonfinite_steps={self.limit} in a row): stopped at step {step} without'
        f' saving. The last good checkpoint: {last_checkpoint}. Lower config.optim.learning_rate'
        ' or check the data, then run the same command again.')


class Progress:
  """Steps/s over the last logging window and ETA for the rest of the run."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.perf_counter()

  def update(self, step: int, loss: float) -> float:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info('step %d/%d  loss %.4f  %.2f steps/s  ETA %dm%02ds', step, self.total, loss, rate,
                 eta // 60, eta % 60)
    return rate


# Dense bf16 peak FLOP/s per chip, by jax `device_kind` prefix (vendor datasheets).
PEAK_TFLOPS = (
    ('TPU v6', 918.0), ('TPU v5p', 459.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
    ('TPU v4', 275.0), ('NVIDIA H200', 989.0), ('NVIDIA H100', 989.0), ('NVIDIA A100', 312.0),
    ('NVIDIA B200', 2250.0), ('NVIDIA L4', 121.0),
)


def peak_tflops(device=None, override: float = 0.0) -> float | None:
  """Peak TFLOP/s of one device: `override` if set, else from PEAK_TFLOPS; None when unknown (CPU)."""
  if override:
    return float(override)
  kind = (device or jax.devices()[0]).device_kind
  return next((v for k, v in PEAK_TFLOPS if kind.startswith(k)), None)


def transformer_step_flops(num_params: int, tokens_per_sequence: int, sequences: int, *,
                           depth: int, width: int, frozen_params: int = 0) -> float:
  """Model FLOPs of one training step (forward + backward) of a transformer, the PaLM/MaxText way:
  6 * params * tokens for the matmuls plus 12 * depth * width * seq^2 per sequence for attention
  (QK^T and AV, forward and backward). Text/cross-attention and remat recomputation are not counted,
  so MFU is the useful work only. Frozen parameters (a LoRA run's base) cost 4 per token, not 6:
  the backward pass needs their input gradients but not their weight gradients."""
  tokens = tokens_per_sequence * sequences
  return ((6.0 * num_params + 4.0 * frozen_params) * tokens
          + 12.0 * depth * width * tokens_per_sequence ** 2 * sequences)


def model_flops(config, num_params: int, batch, frozen_params: int = 0) -> float:
  """Model FLOPs of one train step on `batch` (0 for the autoencoder: convolutions, not counted);
  `num_params` trained, `frozen_params` not (a LoRA run's base)."""
  m = config.model
  if m.family == 'vae':
    return 0.0
  if 'segment_ids' in batch:  # packed: [B, N] tokens per sequence
    sequences, tokens = batch['segment_ids'].shape
  else:
    sequences = batch['video'].shape[0]
    tokens = math.prod(n // p for n, p in zip(batch['video'].shape[1:4], m.patch_size))
  depth, width = ((m.wan.num_layers, m.wan.num_attention_heads * m.wan.attention_head_dim)
                  if m.family == 'wan' else (m.depth, m.width))
  return transformer_step_flops(num_params, tokens, sequences, depth=depth, width=width,
                                frozen_params=frozen_params)

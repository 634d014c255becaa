"""Training samples in TensorBoard: one video (an animated GIF image summary) per prompt index at each
sample step, in the event file of the loss curve (training/metrics.py Writer.write_videos)."""

import io
import json
import os
import struct

import av
import numpy as np
from tensorboardX.proto import event_pb2

from sora_jax.common import video_io
from sora_jax.training import metrics


def read_events(folder):
  """Every Event of the TFRecord event files in `folder` (no TensorBoard install needed): records are
  length (uint64), its CRC, the Event proto, its CRC."""
  events = []
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
      pos += 12 + n + 4
  return events


def summaries(folder):
  """{(tag, step): Summary.Value} of the image and text summaries; and the scalars' steps."""
  values, scalar_steps = {}, set()
  for event in read_events(folder):
    for value in event.summary.value:
      if value.HasField('image') or value.HasField('tensor'):
        values[value.tag, event.step] = value
      else:
        scalar_steps.add(event.step)
  return values, scalar_steps


def decode_gif(data: bytes):
  """(frames uint8 [T, H, W, 3], frame durations in seconds)."""
  with av.open(io.BytesIO(data)) as container:
    frames = list(container.decode(video=0))
    return (np.stack([f.to_ndarray(format='rgb24') for f in frames]),
            [float(f.duration * f.time_base) for f in frames])


def check_rate(durations, fps):
  """GIF frame delays are whole 1/100 s: each within a tick of 1/fps, and no drift over the clip."""
  np.testing.assert_allclose(durations, 1 / fps, atol=0.0101)
  assert abs(sum(durations) - len(durations) / fps) <= 0.0101


def test_training_samples_are_tensorboard_videos_beside_the_loss(tiny_run):
  config, workdir = tiny_run  # 6 steps, 2 samples of 4 x 16 x 16 at the end, 8 fps
  values, scalar_steps = summaries(os.path.join(workdir, 'tensorboard'))
  assert scalar_steps == set(range(1, 7))  # the loss curve, in the same event file
  videos = {tag: v for (tag, step), v in values.items() if tag.startswith('samples/') and
            v.HasField('image')}
  assert sorted(videos) == ['samples/0', 'samples/1']
  assert {step for (tag, step) in values if tag in videos} == {6}
  with open(os.path.join(workdir, 'samples', 'step_6', 'samples.json')) as f:
    samples = json.load(f)['samples']
  for i in range(config.num_train_samples):
    image = values[f'samples/{i}', 6].image
    assert (image.height, image.width, image.colorspace) == (16, 16, 3)
    frames, durations = decode_gif(image.encoded_image_string)
    assert frames.shape == (4, 16, 16, 3)  # T, H, W, C: every frame of the sample
    check_rate(durations, config.data.fps)
    assert video_io.read_video(samples[i]['path']).shape == frames.shape  # the mp4's clip
  prompts = values['samples/prompts/text_summary', 6].tensor.string_val[0].decode()
  assert prompts.startswith('0: ') and '\n\n1: ' in prompts


def test_writer_videos_per_step_scaled_to_a_preview(tmp_path):
  writer = metrics.Writer(str(tmp_path))
  rng = np.random.default_rng(0)
  small = rng.integers(0, 256, (3, 5, 12, 20, 3), dtype=np.uint8)
  wide = np.zeros((1, 2, 64, 512, 3), np.uint8)
  wide[..., 0] = 200
  writer.write(3, {'loss': 1.0})
  writer.write_videos(3, small, ['a', 'b', 'c'], fps=16)
  writer.write_videos(5, wide, ['wide'], fps=8)
  writer.close()
  values, _ = summaries(str(tmp_path / 'tensorboard'))
  assert {k for k in values if not k[0].startswith('samples/prompts')} == {
      ('samples/0', 3), ('samples/1', 3), ('samples/2', 3), ('samples/0', 5)}
  frames, durations = decode_gif(values['samples/2', 3].image.encoded_image_string)
  assert frames.shape == (5, 12, 20, 3)
  check_rate(durations, 16)
  assert np.abs(frames.astype(int) - small[2]).mean() < 40  # noise through a 256-colour palette
  image = values['samples/0', 5].image  # long side capped: a preview, the mp4s keep the full size
  assert (image.height, image.width) == (32, metrics.GIF_MAX_SIDE)
  frames, _ = decode_gif(image.encoded_image_string)
  assert frames.shape == (2, 32, 256, 3) and np.abs(frames[..., 0].astype(int) - 200).max() <= 2

r"""A folder of captioned example videos and images, to try the data tools before using your own.

  python -m data_pipelines.example_videos --output_dir=videos [--num_videos=48]

Writes H.264 mp4 clips of the built-in shapes (6 s at 24 fps; square, landscape and portrait),
a few PNG images (1-frame examples), `manifest.csv` listing them all with their captions, and
`first.png` and `clip.mp4` (an image and a clip to condition on: `sample --image`, `--video`).
"""

import csv
import os

import av
import numpy as np
from absl import app, flags

from data_pipelines import shapes
from sora_jax.common import video_io

SIZES = ((64, 64), (64, 96), (96, 64))  # (height, width)
FPS, SECONDS = 24, 6  # long enough for 81 frames at 16 fps (Wan 2.1's clip)


def write_examples(output_dir: str, num_videos: int = 48, num_images: int = 4,
                   seed: int = 0) -> str:
  """Writes the examples; returns the manifest's path."""
  os.makedirs(output_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  pairs = shapes.pairs('train')
  rows = []
  for i in range(num_videos + num_images):
    colour, shape = pairs[i % len(pairs)]
    direction = shapes.DIRECTIONS[i // len(pairs) % len(shapes.DIRECTIONS)]
    height, width = SIZES[i % len(SIZES)]
    clip = shapes.render_clip(colour, shape, direction, num_frames=FPS * SECONDS, height=height,
                              width=width, rng=rng)
    if i < num_videos:
      name = f'video_{i:03d}.mp4'
      video_io.write_mp4(os.path.join(output_dir, name), clip, fps=FPS)
      rows.append({'path': name, 'caption': shapes.caption(colour, shape, direction)})
    else:  # a still: its caption names no motion
      name = f'image_{i - num_videos:03d}.png'
      write_png(os.path.join(output_dir, name), clip[0])
      rows.append({'path': name, 'caption': f'a {colour} {shape}'})
  write_png(os.path.join(output_dir, 'first.png'), shapes.render_clip(
      'red', 'circle', 'left', num_frames=2, height=64, width=64, rng=rng)[0])
  video_io.write_mp4(os.path.join(output_dir, 'clip.mp4'), shapes.render_clip(
      'red', 'circle', 'left', num_frames=FPS * SECONDS, height=64, width=64, rng=rng), fps=FPS)
  manifest = os.path.join(output_dir, 'manifest.csv')
  with open(manifest, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=['path', 'caption'])
    writer.writeheader()
    writer.writerows(rows)
  return manifest


def write_png(path: str, image: np.ndarray):
  with av.open(path, 'w', format='image2') as container:
    stream = container.add_stream('png')
    stream.height, stream.width = image.shape[:2]
    stream.pix_fmt = 'rgb24'
    container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image),
                                                           format='rgb24')))
    container.mux(stream.encode(None))


def main(argv):
  del argv
  f = flags.FLAGS
  manifest = write_examples(f.output_dir, f.num_videos)
  print(f'Wrote {manifest}')


if __name__ == '__main__':
  flags.DEFINE_string('output_dir', 'videos', 'Folder for the examples and manifest.csv.')
  flags.DEFINE_integer('num_videos', 48, 'Video examples (plus 4 images).')
  app.run(main)

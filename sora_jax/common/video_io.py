"""Video files through PyAV: H.264 mp4 (yuv420p, playable everywhere) out with a samples.json, uint8
frames in; images and videos as conditioning inputs."""

import json
import os

import av
import numpy as np


def write_mp4(path, frames: np.ndarray, fps: int = 8, crf: int = 12):
  """frames: uint8 [T, H, W, 3]. Low CRF because tiny clips lose their colours to chroma subsampling
  at default quality."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f'write_mp4 wants uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}.')
  if frames.shape[1] % 2 or frames.shape[2] % 2:
    raise ValueError(f'H.264 yuv420p needs even height and width, got {frames.shape[1:3]}.')
  with av.open(str(path), mode='w') as container:
    stream = container.add_stream('libx264', rate=int(fps))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = 'yuv420p'
    stream.options = {'crf': str(crf)}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def read_video(path) -> np.ndarray:
  """All frames of a video file as uint8 [T, H, W, 3]."""
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])


def to_uint8(video) -> np.ndarray:
  """Model space [-1, 1] -> uint8 pixels."""
  return np.asarray(np.clip((np.asarray(video, np.float32) + 1.0) * 127.5 + 0.5, 0, 255), np.uint8)


def read_frames(path, height: int, width: int) -> np.ndarray:
  """Frames of a video or an image file (anything PyAV reads: mp4, png, jpg, ...) resized to
  height x width, as float32 [T, H, W, 3] in [-1, 1]."""
  try:
    with av.open(str(path)) as container:
      frames = [f.reformat(width=width, height=height, format='rgb24').to_ndarray()
                for f in container.decode(video=0)]
  except (OSError, av.error.FFmpegError, ValueError) as e:  # pytype: disable=module-attr
    raise ValueError(f'Cannot read {path!r} as an image or video: {e}') from None
  if not frames:
    raise ValueError(f'{path!r} holds no video frames.')
  return np.stack(frames).astype(np.float32) / 127.5 - 1.0


def write_videos(videos, prompts, output_dir: str, fps: int) -> list[dict]:
  """One mp4 per prompt plus samples.json; returns the manifest entries."""
  os.makedirs(output_dir, exist_ok=True)
  samples = []
  for i, (video, prompt) in enumerate(zip(videos, prompts)):
    slug = ''.join(ch if ch.isalnum() else '_' for ch in prompt)[:60].strip('_') or 'unconditional'
    path = os.path.join(output_dir, f'{i:03d}_{slug}.mp4')
    write_mp4(path, video, fps=fps)
    samples.append({'prompt': prompt, 'path': os.path.abspath(path)})
  with open(os.path.join(output_dir, 'samples.json'), 'w') as f:
    json.dump({'samples': samples}, f, indent=2)
  return samples

r"""Long videos by sliding windows on CPU: wall time and peak memory against length, as a user runs it.

  python benchmarks/long_video.py --workdir=runs/demo_conditioned --frames=48,120,480 \
      --output_dir=runs/long_video_bench [--sample_flags=guidance_scale=2]

For each length, runs `python -m sora_jax.sample --num_frames=N` in a fresh process (so the peak
resident memory is that run's alone) for the given prompts, and reports wall time, peak RSS and the
number of windows; then judges the written mp4s: colour and shape kept in every window
(conditioned_eval's long-video protocol) and the object's centroid step / pixel change at window
boundaries against inside windows. At the demo's 8 fps, 480 frames are 60 s.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from data_pipelines import shapes
from sora_jax.common import video_io
from sora_jax.config import geometry, schema
from sora_jax.evaluation import conditioned as conditioned_eval
from sora_jax.inference import sampling

flags.DEFINE_string('workdir', None, 'A run trained with conditioning (configs/demo_conditioned.py).')
flags.DEFINE_string('output_dir', None, 'Where the videos and results.json go.')
flags.DEFINE_list('frames', ['48', '120', '480'], 'Output lengths in frames.')
flags.DEFINE_list('prompts', ['a red circle moving left', 'a green square moving up',
                              'a blue triangle moving right', 'a yellow circle moving down'],
                  'Prompts (one video each per length).')
flags.DEFINE_integer('overlap', None, 'Overlap in model frames (default: the sample CLI default).')
flags.DEFINE_list('sample_flags', [], 'More sample CLI flags, e.g. guidance_scale=2,num_steps=16.')


def run_sample(workdir, prompts, num_frames, out_dir, overlap, extra=()):
  cmd = [sys.executable, '-m', 'sora_jax.sample', f'--workdir={workdir}', f'--output_dir={out_dir}',
         f'--num_frames={num_frames}', *[f'--prompt={p}' for p in prompts],
         *[f'--{x}' for x in extra]]
  if overlap:
    cmd.append(f'--overlap={overlap}')
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{proc.stderr.read()[-3000:]}')
  return wall, usage.ru_maxrss / 1024  # KiB -> MiB


def main(argv):
  del argv
  f = flags.FLAGS
  config = schema.load_config(f.workdir)
  t_model = geometry.model_clip_shape(config)[0]
  overlap = geometry.resolve_overlap(config, f.overlap)
  jump_px = conditioned_eval.jump_threshold(config)
  rows = []
  for n in [int(x) for x in f.frames]:
    out_dir = os.path.join(f.output_dir, f'frames_{n}')
    wall, rss = run_sample(f.workdir, f.prompts, n, out_dir, f.overlap, f.sample_flags)
    with open(os.path.join(out_dir, 'samples.json')) as fh:
      samples = json.load(fh)['samples']
    videos = np.stack([video_io.read_video(s['path']) for s in samples])
    windows = sampling.window_count(n, t_model, overlap)
    spans = [(a, min(b, n)) for a, b in conditioned_eval.window_spans(config, windows, overlap)]
    kept = []
    for s, v in zip(samples, videos):
      colour, shape, _ = shapes.parse_caption(s['prompt'])
      judged = [shapes.judge_clip(v[a:b]) for a, b in spans]
      kept.append([j['color'] == colour and j['shape'] == shape for j in judged])
    kept = np.asarray(kept)
    cont = conditioned_eval.continuity(
        videos, conditioned_eval.window_boundaries(config, spans, overlap), jump_px)
    rows.append({'frames': n, 'seconds': n / config.data.fps, 'windows': windows,
                 'videos': len(samples), 'wall_s': wall, 'peak_rss_mib': rss,
                 'kept_every_window': float(kept.all(1).mean()),
                 'kept_windows': float(kept.mean()), 'continuity': cont})
  os.makedirs(f.output_dir, exist_ok=True)
  with open(os.path.join(f.output_dir, 'results.json'), 'w') as fh:
    json.dump({'workdir': os.path.abspath(f.workdir), 'overlap': overlap, 'rows': rows}, fh,
              indent=2)
  print(f'{"frames":>6} {"seconds":>7} {"windows":>7} {"wall s":>7} {"peak RSS MiB":>12}'
        f' {"kept all":>8} {"kept win":>8} {"step@bound":>10} {"step in":>7} {"chg@bound":>9}'
        f' {"chg in":>6}')
  fmt = lambda v, w: f'{v:>{w}.2f}' if v is not None else f'{"-":>{w}}'
  for r in rows:
    c = r['continuity']
    print(f'{r["frames"]:>6} {r["seconds"]:>7.1f} {r["windows"]:>7} {r["wall_s"]:>7.1f}'
          f' {r["peak_rss_mib"]:>12.0f} {r["kept_every_window"]:>8.2f} {r["kept_windows"]:>8.2f}'
          f' {fmt(c["step_px"]["boundary"]["mean"], 10)} {fmt(c["step_px"]["inside"]["mean"], 7)}'
          f' {fmt(c["pixel_change"]["boundary"]["mean"], 9)}'
          f' {fmt(c["pixel_change"]["inside"]["mean"], 6)}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'output_dir'])
  app.run(main)

r"""Does the Grain input pipeline keep up? Raw decoding vs. pipeline throughput, data vs. step time.

  python benchmarks/data_pipeline.py [--num_videos=48] [--num_batches=32] [--worker_counts=0,1,2] \
      [--data_dir=DIR] [--steps=10] [--config=configs/demo.py]

Fixture: --num_videos real H.264 mp4 files (yuv420p; 320x240, 240x320 and 426x240; 24 and 30 fps;
4-6 s of coloured rectangles moving over a scrolling texture; a keyframe every 2 s) and their
manifest.jsonl, written to --data_dir (reused when it already holds them) or a temporary folder.

Table 1, one row per --worker_counts entry w (config.data.worker_count): the manifest pipeline
(`pipeline.train_iterator`, buckets (12,32,32), (12,32,48), (12,48,32), 16 clips per batch, random
start and crop) against the same clips decoded by calling `video_decode.decode_clip` directly, in a
loop in this process (w=0) or in a multiprocessing.Pool of w processes ("raw"), and in a pool of
grain.ReadOptions().num_threads threads ("raw thr": the pipeline itself loads that many batches at
once in each of its processes). The benchmark replays the pipeline's batch plan and per-example
draws (clip start, crop) and afterwards checks that every timed pipeline batch equals its raw clips
("same clips": yes).
  raw / raw thr / pipe clips/s: clips in the timed batches / wall-clock seconds.
  ratio: pipe / raw (target >= 0.80: the pipeline delivers at least 80% of plain decoding).
  index s: `train_iterator()` start-up (probing every manifest file); warm-up s: the first wave of
  batches (worker start-up and the pipeline's first concurrent batches, see `windows`). Both are
  excluded from the rates, as are the raw pools' start-up and one warm-up batch; the timed clips are
  the same in all three.

Table 2, "does the trainer wait?": seconds per batch at which the pipeline delivers when pulled as
fast as it can (w=0: by threads of the trainer's own process; w>0: by worker processes), against the
train step time of --config (configs/demo.py as is, jitted as in benchmarks/train_step.py), for the
built-in shapes data (the demo's own input) and for the fixture manifest at the demo's clip shape
(12, 32, 32) and batch size. data/step well below 1: the trainer does not wait for data. Both are
measured alone; when the data loading and the step share the same cores, both are slower.
"""

import concurrent.futures
import copy
import json
import multiprocessing
import os
import sys
import tempfile
import time

import av
import grain
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

from data_pipelines import bucketed, pipeline, video_decode
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import validation

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Base training config.')
flags.DEFINE_integer('num_videos', 48, 'Fixture videos.')
flags.DEFINE_integer('num_batches', 32, 'Timed batches per measurement (after the warm-up), rounded'
                     ' up to whole waves of the pipeline (see `windows`).')
flags.DEFINE_list('worker_counts', ['0', '1', '2'], 'config.data.worker_count values, a row each.')
flags.DEFINE_string('data_dir', '', 'Fixture folder (default: a temporary one, deleted after).')
flags.DEFINE_integer('steps', 10, 'Timed train steps (after one warm-up step).')

BUCKETS = ((12, 32, 32), (12, 32, 48), (12, 48, 32))
CLIPS_PER_BATCH = 16
SIZES = ((320, 240), (240, 320), (426, 240))  # (width, height)
RATES = (24, 30)
COLOURS = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (40, 70, 230),
           'yellow': (240, 220, 40), 'white': (245, 245, 245), 'purple': (150, 50, 200)}


# -------------------------------------------------------------------------------------- fixture --


def write_video(path: str, index: int) -> str:
  """One mp4 (size, rate and length from `index`); returns its caption."""
  rng = np.random.default_rng(index)
  width, height = SIZES[index % len(SIZES)]
  fps = RATES[index // len(SIZES) % len(RATES)]
  num_frames = int(round(rng.uniform(4.0, 6.0) * fps))
  # Blocky random texture, twice as wide, scrolled 2 px a frame: motion the encoder must predict.
  blocks = rng.integers(30, 130, (height // 8 + 1, width // 4 + 1, 3), dtype=np.uint8)
  texture = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:height, :2 * width]
  names = list(COLOURS)
  count = int(rng.integers(3, 7))
  colours = [names[c] for c in rng.integers(len(names), size=count)]
  sizes = rng.integers([height // 8, width // 8], [height // 3, width // 3], size=(count, 2))
  pos = rng.uniform(0, 1, (count, 2)) * ([height, width] - sizes)
  vel = rng.uniform(-4, 4, (count, 2))
  with av.open(path, 'w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    stream.options = {'preset': 'fast'}
    stream.codec_context.gop_size = 2 * fps
    for k in range(num_frames):
      shift = 2 * k % width
      image = np.ascontiguousarray(texture[:, shift:shift + width])
      for (h, w), (y, x), name in zip(sizes, pos.astype(int), colours):
        image[y:y + h, x:x + w] = COLOURS[name]
      pos += vel
      bounce = (pos < 0) | (pos > [height, width] - sizes)
      vel[bounce] *= -1
      pos = np.clip(pos, 0, [height, width] - sizes)
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
  return f'{count} rectangles ({", ".join(colours)}) bouncing over a scrolling texture'


def make_fixture(folder: str, num_videos: int) -> tuple[str, float, bool]:
  """(manifest path, seconds spent writing, reused)."""
  manifest = os.path.join(folder, 'manifest.jsonl')
  names = [f'video_{i:03d}.mp4' for i in range(num_videos)]
  if os.path.isfile(manifest):
    with open(manifest) as f:
      listed = [json.loads(line)['path'] for line in f if line.strip()]
    if listed == names and all(os.path.isfile(os.path.join(folder, n)) for n in names):
      return manifest, 0.0, True
  os.makedirs(folder, exist_ok=True)
  start = time.perf_counter()
  rows = [{'path': n, 'caption': write_video(os.path.join(folder, n), i)}
          for i, n in enumerate(names)]
  with open(manifest, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in rows)
  return manifest, time.perf_counter() - start, False


# ------------------------------------------------------------------------------------------ raw --


def clip_specs(config, first: int, count: int) -> list[list[dict]]:
  """decode_clip arguments of every clip of global batches [first, first + count), drawn exactly as
  the pipeline draws them (bucketed.BatchPlan, LoadBatch's per-row rng, bucketed.decode_file)."""
  d = config.data
  table = buckets_lib.make(config, bucketed.batch_multiple(config, 1, 1))
  examples, _ = pipeline.user_examples(config, table, bucketed.SkipLog(1.0))
  plan = bucketed.BatchPlan([e.bucket for e in examples], table, config.seed)
  batches = []
  for i in range(first, first + count):
    p = plan[i]
    bucket = table[p['bucket']]
    specs = []
    for row in p['ids'][:bucket.batch_size]:
      example = examples[int(row)]
      rng = np.random.default_rng([config.seed, p['index'], int(row)])
      slack = max(0.0, example.end - example.start - bucket.frames / d.fps)
      start = example.start + rng.uniform(0.0, slack)
      crop = tuple(rng.uniform(0.0, 1.0, 2)) if d.random_crop else (0.5, 0.5)
      specs.append(dict(path=example.path, start=start, num_frames=bucket.frames, fps=d.fps,
                        size=(bucket.height, bucket.width), crop=crop))
    batches.append(specs)
  return batches


def decode(spec: dict) -> np.ndarray:
  return video_decode.decode_clip(**spec)


def _pid_after(seconds: float) -> int:
  time.sleep(seconds)
  return os.getpid()


def time_raw(warm: list[dict], timed: list[dict], processes: int, threads: int = 0):
  """(seconds, clips) decoding `timed` after `warm`: in a loop in this process (processes=0), in a
  pool of `threads` threads in this process, or in a pool of `processes` processes."""
  if threads:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      list(pool.map(decode, warm))
      start = time.perf_counter()
      clips = list(pool.map(decode, timed))
      return time.perf_counter() - start, clips
  if not processes:
    for spec in warm:
      decode(spec)
    start = time.perf_counter()
    clips = [decode(spec) for spec in timed]
    return time.perf_counter() - start, clips
  # spawn, not fork: this process has started JAX's threads.
  with multiprocessing.get_context('spawn').Pool(processes) as pool:
    while len(set(pool.map(_pid_after, [0.2] * processes, chunksize=1))) < processes:
      pass  # until every process has started and answered
    pool.map(decode, warm, chunksize=1)
    start = time.perf_counter()
    clips = pool.map(decode, timed, chunksize=1)
    return time.perf_counter() - start, clips


# ------------------------------------------------------------------------------------- pipeline --


def windows(workers: int, num_batches: int) -> tuple[int, int]:
  """(warm-up, timed) batches: whole waves of the pipeline's concurrent work.

  `to_iter_dataset()` (default grain.ReadOptions) loads num_threads batches at once in each process
  (the main one, or each worker), and up to prefetch_buffer_size ahead: they finish in waves.
  Timing from the first batch would count the rest of the first wave, decoded during the warm-up; so
  the warm-up is the first wave and the timed window whole waves after it.
  """
  wave = grain.ReadOptions().num_threads * max(1, workers)
  return wave, -(-num_batches // wave) * wave


def time_pipeline(config, warm: int, num_batches: int, keep: bool = False):
  """(index s, warm-up s, timed s, clips, timed batches if keep) of pipeline.train_iterator."""
  start = time.perf_counter()
  it = pipeline.train_iterator(config, data_parallel=1)
  index_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(warm):
    next(it)
  warm_s = time.perf_counter() - start
  start = time.perf_counter()
  batches = [next(it) for _ in range(num_batches)]
  seconds = time.perf_counter() - start
  it.close()
  clips = sum(b['video'].shape[0] for b in batches)
  return index_s, warm_s, seconds, clips, batches if keep else None


def manifest_config(base, manifest: str, workers: int, buckets, clips: int):
  """`base` reading `manifest`; its largest bucket gets `clips` clips a batch, smaller ones more."""
  config = copy.deepcopy(base)
  config.data.manifest = manifest
  config.data.buckets = buckets
  config.data.tokens_per_batch = clips * max(
      buckets_lib.tokens(b, config.model.patch_size) for b in buckets)
  config.data.worker_count = workers
  validation.validate(config, 1)
  return config


def fullest_bucket(config) -> int:
  """Examples in the config's fullest bucket (a small fixture cannot fill batches of 16)."""
  table = buckets_lib.make(config)
  examples, _ = pipeline.user_examples(config, table, bucketed.SkipLog(1.0))
  return int(np.bincount([e.bucket for e in examples], minlength=len(table)).max())


# ----------------------------------------------------------------------------------- train step --

# ----------------------------------------------------------------------------------------- main --


def run(base, folder: str, f):
  workers_list = [int(w) for w in f.worker_counts]
  manifest, write_s, reused = make_fixture(folder, f.num_videos)
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}. Fixture: {f.num_videos}'
        f' videos in {folder} ({"reused" if reused else f"written in {write_s:.1f} s"}).')

  per_batch = min(CLIPS_PER_BATCH,
                  fullest_bucket(manifest_config(base, manifest, 0, BUCKETS, CLIPS_PER_BATCH)))
  threads = grain.ReadOptions().num_threads
  print(f'\n1. Manifest pipeline vs. raw decode_clip: buckets {list(BUCKETS)}, {per_batch} clips'
        f' per batch (more in buckets of fewer tokens).')
  print(f'{"workers":>7s} {"batches":>7s} {"clips":>5s} {"raw procs":>9s} {"raw clips/s":>11s}'
        f' {"raw thr clips/s":>15s} {"pipe clips/s":>12s} {"ratio":>6s} {"index s":>7s}'
        f' {"warm-up s":>9s} {"same clips":>10s}')
  for w in workers_list:
    config = manifest_config(base, manifest, w, BUCKETS, per_batch)
    warm, k = windows(w, f.num_batches)
    specs = clip_specs(config, 0, warm + k)
    index_s, warm_s, pipe_s, clips, batches = time_pipeline(config, warm, k, keep=True)
    flat = [s for batch in specs[warm:] for s in batch]
    raw_s, raw = time_raw(specs[0], flat, w)
    thr_s, _ = time_raw(specs[0], flat, 0, threads=threads)
    # The timed pipeline batches must be exactly the timed raw clips, in order.
    same, offset = clips == len(flat), 0
    for batch, batch_specs in zip(batches, specs[warm:]):
      n = len(batch_specs)
      want = np.stack(raw[offset:offset + n]).astype(np.float32) / 127.5 - 1.0
      same &= want.shape == batch['video'].shape and np.array_equal(want, batch['video'])
      offset += n
    del batches, raw
    raw_rate, pipe_rate = len(flat) / raw_s, clips / pipe_s
    print(f'{w:7d} {k:7d} {clips:5d} {w or 1:9d} {raw_rate:11.1f} {len(flat) / thr_s:15.1f}'
          f' {pipe_rate:12.1f} {pipe_rate / raw_rate:6.2f} {index_s:7.2f} {warm_s:9.2f}'
          f' {"yes" if same else "NO":>10s}', flush=True)
  print(f'raw: decode_clip in a loop (workers 0) or a multiprocessing.Pool of `workers` processes;'
        f' raw thr: in {threads} threads of one process, as the pipeline loads batches in each of'
        f' its processes (grain.ReadOptions). ratio = pipe / raw.')

  compile_s, step_s, _ = common.time_train_step(base, f.steps)
  demo_shape = (base.data.num_frames, base.data.height, base.data.width)
  print(f'\n2. Does the trainer wait? --config train step: {step_s:.3f} s/step at batch'
        f' {base.batch_size}, clip {demo_shape} (compile {compile_s:.1f} s, {f.steps} steps).')
  print(f'{"data":34s} {"workers":>7s} {"batch":>5s} {"data s/batch":>12s} {"batches/s":>9s}'
        f' {"data/step":>9s}')
  # The manifest at the demo's clip shape and batch size (smaller when the fixture is): data time
  # per batch is scaled to the demo's batch size for data/step.
  demo_clips = min(base.batch_size, fullest_bucket(
      manifest_config(base, manifest, 0, (demo_shape,), base.batch_size)))
  rows = [('shapes (--config as is)', lambda w: _with_workers(base, w)),
          (f'manifest at {demo_shape}',
           lambda w: manifest_config(base, manifest, w, (demo_shape,), demo_clips))]
  for name, make in rows:
    for w in workers_list:
      warm, k = windows(w, f.num_batches)
      _, _, seconds, clips, _ = time_pipeline(make(w), warm, k)
      data_s = seconds / k
      per_demo_batch = data_s * base.batch_size / (clips / k)
      print(f'{name:34s} {w:7d} {clips // k:5d} {data_s:12.4f} {1 / data_s:9.1f}'
            f' {per_demo_batch / step_s:9.2f}', flush=True)
  print(f'\nLoad average at the end: {os.getloadavg()[0]:.2f}.')


def _with_workers(base, workers: int):
  config = copy.deepcopy(base)
  config.data.worker_count = workers
  return config


def main(argv):
  del argv
  f = flags.FLAGS
  if f.num_batches < 1 or f.num_videos < 1:
    raise app.UsageError('--num_batches and --num_videos must be >= 1.')
  if f.data_dir:
    run(f.config, f.data_dir, f)
  else:
    with tempfile.TemporaryDirectory(prefix='data_pipeline_bench_') as folder:
      run(f.config, folder, f)


if __name__ == '__main__':
  app.run(main)

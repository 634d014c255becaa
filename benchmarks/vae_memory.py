r"""Memory and time of the Wan causal VAE: chunked (scan, caches as carry) vs full-sequence.

  python benchmarks/vae_memory.py                      # 17 and 65 frames at 64x64, base_dim 32
  python benchmarks/vae_memory.py --frames=17,65,129 --size=64 --base_dim=32

Each (op, path, frames) runs in its own subprocess, so peak RSS is not shared between cases.
Columns:
  temp MB     XLA's compiled memory analysis of the jitted function: scratch buffers (activations,
              caches), excluding its arguments (video / latents, parameters) and outputs;
  io MB       arguments + outputs of that function (they grow with length on every path);
  peak MB     measured: process peak RSS during one run minus RSS just before it (Linux clear_refs);
  s           wall time of a second run (compiled, warm).
Parameters are filled from numpy (values change neither memory nor time): no per-shape RNG compiles.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sora_jax.models import vae  # noqa: E402


def build(base_dim, z_dim):
  with nnx.use_eager_sharding(False):  # no mesh here: parameters are placed when used
    abstract = nnx.eval_shape(lambda: vae.CausalVAE(
        base_dim=base_dim, z_dim=z_dim, dim_mult=(1, 2, 4, 4), num_res_blocks=2, rngs=nnx.Rngs(0),
        latents_mean=None, latents_std=None))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape = tuple(var.shape)
    if path[-1] == 'kernel':
      bound = 1 / math.sqrt(math.prod(shape[:-1]))
      value = rng.uniform(-bound, bound, shape).astype(np.float32)
    else:
      value = np.full(shape, 1.0 if path[-1] == 'gamma' else 0.0, np.float32)
    flat.append((path, var.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _rss_mb(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) / 1024
  return float('nan')


def worker(op, path, frames, size, base_dim, z_dim):
  model = build(base_dim, z_dim)
  chunked = path == 'chunked'
  if op == 'encode':
    x = np.random.default_rng(1).uniform(-1, 1, (1, frames, size, size, 3))
    x = jnp.asarray(x, jnp.float32)
    fn = jax.jit(lambda m, x: m.encode(x, chunked=chunked)[0])
  else:
    latent_frames = 1 + (frames - 1) // 4
    s = size // 8
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, latent_frames, s, s, z_dim)),
                    jnp.float32)
    fn = jax.jit(lambda m, z: m.decode(z, chunked=chunked))
  compiled = fn.lower(model, x).compile()
  mem = compiled.memory_analysis()
  rss_before = _rss_mb('VmRSS')
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets VmHWM to the current RSS
    peak = _rss_mb('VmHWM')
  except OSError:
    peak = None
  jax.block_until_ready(compiled(model, x))
  peak = _rss_mb('VmHWM') - rss_before if peak is not None else float('nan')
  start = time.perf_counter()
  jax.block_until_ready(compiled(model, x))
  seconds = time.perf_counter() - start
  mb = 1 / 2 ** 20
  print(json.dumps(dict(
      op=op, path=path, frames=frames, temp_mb=mem.temp_size_in_bytes * mb,
      io_mb=(mem.argument_size_in_bytes + mem.output_size_in_bytes) * mb, peak_mb=peak,
      seconds=seconds)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--frames', default='17,65')
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--base_dim', type=int, default=32)
  parser.add_argument('--z_dim', type=int, default=16)
  parser.add_argument('--ops', default='encode,decode')
  parser.add_argument('--worker', nargs=3, metavar=('OP', 'PATH', 'FRAMES'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    op, path, frames = args.worker
    worker(op, path, int(frames), args.size, args.base_dim, args.z_dim)
    return

  print(f'Wan VAE base_dim={args.base_dim} z_dim={args.z_dim} dim_mult=(1,2,4,4) '
        f'num_res_blocks=2, video {args.size}x{args.size}, batch 1, float32, '
        f'device: {jax.devices()[0].device_kind}')
  header = f'{"op":7} {"path":8} {"frames":>6} {"temp MB":>9} {"io MB":>8} {"peak MB":>9} {"s":>7}'
  print(header)
  print('-' * len(header))
  for op in args.ops.split(','):
    for path in ('chunked', 'full'):
      for frames in map(int, args.frames.split(',')):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), '--worker', op, path, str(frames),
             f'--size={args.size}', f'--base_dim={args.base_dim}', f'--z_dim={args.z_dim}'],
            capture_output=True, text=True)
        if out.returncode != 0:
          print(f'{op:7} {path:8} {frames:>6}  failed: {out.stderr.strip().splitlines()[-1]}')
          continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f'{op:7} {path:8} {frames:>6} {r["temp_mb"]:>9.1f} {r["io_mb"]:>8.1f} '
              f'{r["peak_mb"]:>9.1f} {r["seconds"]:>7.2f}', flush=True)


if __name__ == '__main__':
  main()

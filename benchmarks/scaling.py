r"""Scaling figures: attention memory/time vs sequence length, collective bytes vs theory, MFU.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py
  python benchmarks/scaling.py --sections=mfu --config=configs/demo.py   # on a GPU/TPU: MFU

Sections (--sections, comma-separated):
  attention    compiled peak temp memory and time of forward+backward self-attention for growing
               sequence lengths, per backend ('xla' materialises the L x L scores; 'chunked' and
               cuDNN/splash flash kernels do not) and remat policy of a DiT block.
  collectives  bytes moved by the collectives in the compiled train step (parsed from its HLO) under
               FSDP over all devices, against the theoretical FSDP volume: all-gather the parameters
               for the forward and again for the backward, reduce-scatter the gradients,
               each (n - 1) / n of the parameter bytes per device.
  remat        compiled peak temp memory of the whole train step for growing frame sizes (tokens), per
               remat policy (none / full / dots) and attention backend.
  mfu          model FLOPs / step time / device peak for the config's train step (peak from the
               device kind; unknown on CPU, where TFLOP/s per device is printed).
"""

import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

from data_pipelines import pipeline
from sora_jax.config import geometry
from sora_jax.parallel import attention
from sora_jax.training import metrics

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config (collectives, mfu).')
flags.DEFINE_list('sections', ['attention', 'remat', 'collectives', 'mfu'], 'What to measure.')
flags.DEFINE_list('frame_sizes', ['32', '64', '128'], 'Frame height = width (remat).')
flags.DEFINE_list('lengths', ['1024', '2048', '4096', '8192'], 'Sequence lengths (attention).')
flags.DEFINE_list('backends', ['xla', 'chunked'], 'Attention backends (attention).')
flags.DEFINE_integer('steps', 5, 'Timed steps (mfu) / calls (attention).')

_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1,
                'f64': 8, 's64': 8}
_COLLECTIVE = re.compile(
    r'=\s*(\(?[^=]*?\)?)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)'
    r'(?:-start)?\(')
_SHAPE = re.compile(r'(f32|bf16|f16|s32|u32|pred|s8|u8|f64|s64)\[([0-9,]*)\]')


def _bytes(shape_text: str) -> int:
  return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
             for d, dims in _SHAPE.findall(shape_text))


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Per-device bytes sent by each collective kind in an HLO module, from result shapes:
  all-gather / all-to-all / permute send (n-1)/n of their result, reduce-scatter (n-1) x its result
  shard, all-reduce 2 (n-1)/n of its operand (ring algorithms)."""
  n = num_devices
  out: dict[str, float] = {}
  for shape_text, kind in _COLLECTIVE.findall(hlo_text):
    b = _bytes(shape_text)
    factor = {'all-gather': (n - 1) / n, 'reduce-scatter': n - 1, 'all-reduce': 2 * (n - 1) / n,
              'all-to-all': (n - 1) / n, 'collective-permute': 1.0}[kind]
    out[kind] = out.get(kind, 0.0) + b * factor
  return out


def section_collectives(config):
  n = jax.device_count()
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, n, 1
  config.batch_size = max(config.batch_size // n, 1) * n
  step_fn, state, batch_sh, mesh = common.train_step(config)
  batch = jax.device_put(next(pipeline.train_iterator(config)), batch_sh)
  with jax.set_mesh(mesh):
    hlo = step_fn.lower(state, batch).compile().as_text()
  moved = collective_bytes(hlo, n)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state['params']))
  theory = 3 * param_bytes * (n - 1) / n
  print(f'\n== collectives: FSDP over {n} devices, {param_bytes / 1e6:.2f} MB of parameters ==')
  for kind, b in sorted(moved.items()):
    print(f'  {kind:20s} {b / 1e6:9.2f} MB per device')
  total = sum(moved.values())
  print(f'  {"total":20s} {total / 1e6:9.2f} MB;  theory (2 all-gathers + 1 reduce-scatter):'
        f' {theory / 1e6:.2f} MB;  ratio {total / theory:.2f}')


def _attention_fn(backend, length, heads=4, head_dim=64):

  def loss(q, k, v):
    return attention.attention(q, k, v, impl=backend).astype(jnp.float32).sum()

  shape = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))), shape


def section_attention(lengths, backends, calls):
  print('\n== self-attention forward + backward, batch 1, 4 heads x 64 (compiled temp memory) ==')
  print(f'{"backend":10s} {"length":>7s} {"temp MB":>9s} {"ms/call":>9s}')
  for backend in backends:
    for length in lengths:
      fn, shape = _attention_fn(backend, length)
      try:
        compiled = fn.lower(shape, shape, shape).compile()
      except Exception as e:  # pylint: disable=broad-except
        print(f'{backend:10s} {length:7d}  unavailable here: {str(e).splitlines()[0][:60]}')
        break
      temp = compiled.memory_analysis().temp_size_in_bytes / 1e6
      x = jnp.ones(shape.shape, shape.dtype)
      jax.block_until_ready(compiled(x, x, x))
      start = time.perf_counter()
      for _ in range(calls):
        out = compiled(x, x, x)
      jax.block_until_ready(out)
      ms = (time.perf_counter() - start) / calls * 1e3
      print(f'{backend:10s} {length:7d} {temp:9.1f} {ms:9.1f}', flush=True)


def section_remat(config, sizes):
  print('\n== train step, compiled temp memory per device (MB) by remat policy and attention ==')
  print(f'{"tokens":>7s} ' + ' '.join(f'{r + "/" + a:>14s}' for r in ('none', 'full', 'dots')
                                      for a in ('xla', 'chunked')))
  for size in sizes:
    row = []
    for remat in ('none', 'full', 'dots'):
      for attn in ('xla', 'chunked'):
        c = config.copy_and_resolve_references()
        c.data.height = c.data.width = size
        c.model.remat, c.model.attention = remat, attn
        step_fn, state, batch_sh, mesh = common.train_step(c)
        shapes = dict(video=(c.batch_size, c.data.num_frames, size, size, 3),
                      tokens=(c.batch_size, c.text.max_length), mask=(c.batch_size, c.text.max_length))
        dtypes = dict(video=jnp.float32, tokens=jnp.int32, mask=jnp.bool_)
        batch = {k: jax.ShapeDtypeStruct(v, dtypes[k], sharding=batch_sh) for k, v in shapes.items()}
        with jax.set_mesh(mesh):
          mem = step_fn.lower(state, batch).compile().memory_analysis()
        row.append(mem.temp_size_in_bytes / 1e6)
    tokens = math.prod(n // p for n, p in zip((config.data.num_frames, size, size),
                                              config.model.patch_size))
    print(f'{tokens:7d} ' + ' '.join(f'{m:14.1f}' for m in row), flush=True)


def section_mfu(config, steps):
  compile_s, step_s, params = common.time_train_step(config, steps)
  clip = geometry.model_clip_shape(config)
  batch = {'video': np.zeros((config.batch_size, *clip, 1), np.float32)}
  flops = metrics.model_flops(config, params, batch)
  tflops = flops / step_s / jax.device_count() / 1e12
  peak = metrics.peak_tflops(override=config.peak_tflops_per_device)
  print(f'\n== MFU: {jax.devices()[0].device_kind} x {jax.device_count()}, {params / 1e6:.1f}M params,'
        f' {config.batch_size} x {math.prod(n // p for n, p in zip(clip, config.model.patch_size))}'
        ' tokens ==')
  print(f'  step {step_s * 1e3:.1f} ms (compile {compile_s:.1f} s), {flops / 1e12:.3f} TFLOP/step,'
        f' {tflops:.3f} TFLOP/s per device' +
        (f', MFU {tflops / peak:.1%} of {peak:.0f}' if peak else ' (peak unknown: no MFU)'))


def main(argv):
  del argv
  f = flags.FLAGS
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  if 'attention' in f.sections:
    section_attention([int(x) for x in f.lengths], f.backends, f.steps)
  if 'remat' in f.sections:
    section_remat(f.config, [int(x) for x in f.frame_sizes])
  if 'collectives' in f.sections:
    section_collectives(f.config)
  if 'mfu' in f.sections:
    section_mfu(f.config, f.steps)


if __name__ == '__main__':
  app.run(main)

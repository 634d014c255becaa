"""What a compiled program costs on its target: per-chip memory, FLOPs, HBM bytes, collective bytes,
and a roofline estimate of its step time. Pure functions over `jax.stages.Compiled` objects and their
HLO text (sora_jax/compile.py reports them)."""

from __future__ import annotations

import collections
import re

import numpy as np

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}
# `%name = bf16[4,128]{...} all-gather(` or a tuple result `(bf16[..], f32[..]) all-reduce(`.
_OP = re.compile(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([0-9,]*)\]')


def memory(compiled) -> dict:
  """Per-chip bytes of a compiled program: arguments, outputs, temporaries, and the peak.

  `hbm_bytes_per_chip` is the compiler's simulated peak of live buffers (arguments included) where it
  gives one (XLA:TPU): the figure its own out-of-memory check compares with HBM. The sum of XLA's
  argument, output and temp sizes over-counts it, since `temp_size_in_bytes` adds up temporaries
  that are never live at once (Wan 14B at 720p on v5p-8: a 112.5 GiB sum, a 89.1 GiB peak; on a
  16 GiB v5e chip a 6-layer cut of it fails to compile at 18.2 GiB used, as its peak predicts and
  not its 24.9 GiB sum: docs/compile/README.md). Without a peak (CPU, GPU ahead-of-time) the sum is
  the bound. `temp_bytes`: the temporaries live at the peak (peak - arguments); XLA's own figure
  is kept as `xla_temp_bytes`."""
  m = compiled.memory_analysis()
  upper = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes + m.generated_code_size_in_bytes)
  peak = int(getattr(m, 'peak_memory_in_bytes', 0) or 0)
  total = peak if peak else upper
  temp = total - m.argument_size_in_bytes if peak else m.temp_size_in_bytes
  return dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
              temp_bytes=int(temp), xla_temp_bytes=int(m.temp_size_in_bytes),
              alias_bytes=int(m.alias_size_in_bytes), hbm_bytes_per_chip=int(total),
              memory_source='compiler peak' if peak else 'sum of arguments, outputs, temporaries')


def cost(compiled) -> dict:
  """XLA's cost analysis (per chip). A loop body (scanned layers, blockwise attention) counts once,
  not once per iteration."""
  c = compiled.cost_analysis()
  c = (c[0] if isinstance(c, (list, tuple)) else c) or {}  # None: no analysis (GPU AOT)
  return dict(flops=float(c.get('flops', 0.0)), bytes_accessed=float(c.get('bytes accessed', 0.0)))


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each kind of collective in an HLO module (per chip, each op once)."""
  out = collections.Counter()
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    out[m.group(2)] += sum(_DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(',') if x]))
                           for d, dims in _SHAPE.findall(m.group(1)))
  return {k: int(out.get(k, 0)) for k in COLLECTIVES}


def per_layer(f1: float, f2: float, layers: int) -> float:
  """A per-chip figure of an L-layer model from its 1- and 2-layer (unrolled) programs."""
  return f1 + (f2 - f1) * (layers - 1)


def roofline(*, flops: float, bytes_accessed: float, collective: float, model_flops: float,
             peak_flops: float, hbm_bandwidth: float, ici_bandwidth: float) -> dict:
  """Step time if compute, HBM traffic and collectives each ran at their peak and overlapped
  perfectly (the slowest bounds the step), and the MFU that implies: a ceiling, not a forecast."""
  times = dict(compute_s=flops / peak_flops, memory_s=bytes_accessed / hbm_bandwidth,
               collective_s=collective / ici_bandwidth)
  step = max(times.values())
  return dict(times, estimated_step_s=step, bound=max(times, key=times.get)[:-2],
              estimated_mfu=model_flops / (step * peak_flops) if step else 0.0)


_OOM = re.compile(r'Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm')
# Another wording of the same error (the compiler's early check, before buffer assignment).
_OOM_TEMP = re.compile(r'HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def out_of_memory(error: Exception) -> dict | None:
  """{'hbm_bytes_per_chip', 'hbm_capacity', 'largest'} from XLA:TPU's out-of-memory compile error
  (None if `error` is another one)."""
  text = str(error)
  m = _OOM.search(text) or _OOM_TEMP.search(text)
  if not m:
    return None
  used = float(m.group(1)) * _UNITS[m.group(2)]
  capacity = float(m.group(3)) * _UNITS[m.group(4)]
  largest = [l.strip() for l in text.splitlines() if re.match(r'\s*\d+\.\s+Size:', l)][:10]
  return dict(hbm_bytes_per_chip=int(used), hbm_capacity=int(capacity), largest=largest)

"""Accelerator slices by name ('v5p-8', 'v6e-256', ...): their devices without the hardware, for
ahead-of-time compilation (python -m sora_jax.compile), and each chip's memory and speed for the
roofline.

Names follow Cloud TPU's accelerator types: the number is TensorCores for v4 and v5p (two per chip,
one 'megacore' device), chips for v5e and v6e. Devices come from `jax.experimental.topologies`
through libtpu (`pip install -e ".[tpu]"`), as MaxText's train_compile does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os


@dataclasses.dataclass(frozen=True)
class Chip:
  kind: str
  hbm_bytes: int  # per chip
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s per chip, all links, one direction (collective roofline)


GiB = 2**30
# Public Cloud TPU system-architecture figures.
CHIPS = {
    'v4': Chip('TPU v4', 32 * GiB, 275e12, 1.2e12, 4.5e11),
    'v5e': Chip('TPU v5 lite', 16 * GiB, 197e12, 8.19e11, 2e11),
    'v5p': Chip('TPU v5p', 95 * GiB, 459e12, 2.765e12, 6e11),
    'v6e': Chip('TPU v6e', 32 * GiB, 918e12, 1.64e12, 4.48e11),
}
CORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}
# libtpu's names for the chip generations.
_TOPOLOGY_PREFIX = {'v4': 'v4', 'v5p': 'v5', 'v5e': 'v5e', 'v6e': 'v6e'}
# Chips -> physical shape of a slice, as Cloud TPU lays them out.
_SHAPES_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
              256: '4x8x8', 512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}
_SHAPES_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
              256: '16x16'}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # e.g. 'v5p-8'
  generation: str  # 'v4' | 'v5p' | 'v5e' | 'v6e'
  chips: int
  topology: str  # libtpu's name, e.g. 'v5:2x2x1'

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def names() -> list[str]:
  out = []
  for gen, cores in CORES_PER_CHIP.items():
    shapes = _SHAPES_2D if gen in ('v5e', 'v6e') else _SHAPES_3D
    out += [f'{gen}-{chips * cores}' for chips in shapes]
  return out


def parse(name: str) -> Slice:
  """'v5p-8' -> Slice; an unknown name is a ValueError listing the known ones."""
  gen, _, count = name.partition('-')
  shapes = _SHAPES_2D if gen in ('v5e', 'v6e') else _SHAPES_3D
  if gen not in CHIPS or not count.isdigit() or int(count) % CORES_PER_CHIP[gen] or (
      int(count) // CORES_PER_CHIP[gen] not in shapes):
    raise ValueError(f'--topology={name!r}: unknown TPU slice; known: {", ".join(names())}.')
  chips = int(count) // CORES_PER_CHIP[gen]
  return Slice(name, gen, chips, f'{_TOPOLOGY_PREFIX[gen]}:{shapes[chips]}')


def check_libtpu():
  """A one-line error when libtpu (the TPU compiler) is not installed."""
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError('Compiling for TPU needs libtpu: pip install -e ".[tpu]" (jax\'s TPU extra, '
                     'from the package registry).')


def devices(target: Slice, num_slices: int = 1):
  """The target's devices (no hardware needed): num_slices x chips, with coordinates and slice
  indices, for a mesh exactly as on the pod."""
  check_libtpu()
  # Compiling touches no TPU: let several processes (tests, a second compile) load libtpu at once
  # instead of failing on its lock file.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  if not tpu_present():  # no Cloud TPU metadata to ask: name a single host, or libtpu complains
    os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', target.name)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  megacore = CORES_PER_CHIP[target.generation] == 2
  desc = topologies.get_topology_desc(
      platform='tpu', topology_name=target.topology,
      chip_config_name='megacore' if megacore else 'default',
      chips_per_host_bounds=(2, 2, 1) if target.chips >= 4 else (1, 1, 1), num_slices=num_slices)
  found = desc.devices
  if len(found) != target.chips * num_slices:
    raise RuntimeError(f'{target.name}: libtpu gave {len(found)} devices, expected'
                       f' {target.chips * num_slices}.')
  return found


def hosts(target: Slice, num_slices: int = 1) -> int:
  return num_slices * max(1, math.ceil(target.chips / 4))


def tpu_present() -> bool:
  """Whether this machine has TPU chips (jax's own PCI probe)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return False


def skip_absent_tpu():
  """With libtpu installed (the `tpu` / `test` extras) on a machine without TPU chips, JAX would
  try the TPU backend at start-up and print libtpu's initialisation errors; use the other platforms
  instead. An explicit JAX_PLATFORMS is kept. Call before JAX initialises its backends."""
  if os.environ.get('JAX_PLATFORMS') or importlib.util.find_spec('libtpu') is None or tpu_present():
    return
  gpu = any(importlib.util.find_spec(m) for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))
  platforms = 'cuda,cpu' if gpu else 'cpu'
  os.environ['JAX_PLATFORMS'] = platforms  # subprocesses
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', platforms)  # this process: JAX read the variable at import

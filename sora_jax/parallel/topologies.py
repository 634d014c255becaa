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
import os
import re


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
    # NVIDIA datasheets (SXM): dense bf16, HBM, NVLink 4 (450 GB/s each way).
    'h100': Chip('NVIDIA H100 80GB HBM3', 84978434048, 989e12, 3.35e12, 4.5e11),
    'h200': Chip('NVIDIA H200', 150754820096, 989e12, 4.8e12, 4.5e11),
}
GPUS = ('h100', 'h200')  # 'h100-8': one node of 8 GPUs (NVLink), compiled through the CUDA plugin
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
  generation: str  # 'v4' | 'v5p' | 'v5e' | 'v6e' | 'h100' | 'h200'
  chips: int
  topology: str  # libtpu's name, e.g. 'v5:2x2x1' (GPUs: slices x hosts x devices)

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def platform(self) -> str:
    return 'cuda' if self.generation in GPUS else 'tpu'


def names() -> list[str]:
  out = [f'{g}-8' for g in GPUS]
  for gen, cores in CORES_PER_CHIP.items():
    shapes = _SHAPES_2D if gen in ('v5e', 'v6e') else _SHAPES_3D
    out += [f'{gen}-{chips * cores}' for chips in shapes]
  return out


def parse(name: str) -> Slice:
  """'v5p-8' (or 'h100-8') -> Slice; an unknown name is a ValueError listing the known ones."""
  gen, _, count = name.partition('-')
  if gen in GPUS and count == '8':
    return Slice(name, gen, 8, '1x1x8')
  shapes = _SHAPES_2D if gen in ('v5e', 'v6e') else _SHAPES_3D
  if gen not in CORES_PER_CHIP or not count.isdigit() or int(count) % CORES_PER_CHIP[gen] or (
      int(count) // CORES_PER_CHIP[gen] not in shapes):
    raise ValueError(f'--topology={name!r}: unknown TPU slice or GPU node; known: '
                     f'{", ".join(names())}.')
  chips = int(count) // CORES_PER_CHIP[gen]
  return Slice(name, gen, chips, f'{_TOPOLOGY_PREFIX[gen]}:{shapes[chips]}')


def check_libtpu():
  """A one-line error when libtpu (the TPU compiler) is not installed."""
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError('Compiling for TPU needs libtpu: pip install -e ".[tpu]" (jax\'s TPU extra, '
                     'from the package registry).')


def check_compiler(target: Slice):
  """A one-line error when the target's compiler (libtpu, or the CUDA PJRT plugin) is missing."""
  if target.platform == 'tpu':
    return check_libtpu()
  if importlib.util.find_spec('jax_cuda12_plugin') is None:
    raise ValueError(f'Compiling for {target.name} needs the CUDA PJRT plugin: pip install -e '
                     '".[cuda-compile]" (no GPU or CUDA libraries needed to compile).')


def _gpu_devices(target: Slice, num_slices: int):
  if num_slices != 1:
    raise ValueError(f'--num_slices={num_slices}: GPU targets are one node ({target.name}).')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # The device description XLA compiles for (its GpuTargetConfigProto), from XLA's gpu_specs.
  chip = target.chip
  spec = _GPU_SPEC.format(memory=chip.hbm_bytes, bandwidth=int(chip.hbm_bandwidth),
                          kind=chip.kind)
  return topologies.get_topology_desc(target.generation, platform='cuda', target_config=spec,
                                      topology=target.topology).devices


_GPU_SPEC = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{kind}"
"""


def devices(target: Slice, num_slices: int = 1):
  """The target's devices (no hardware needed): num_slices x chips, with coordinates and slice
  indices, for a mesh exactly as on the pod."""
  check_compiler(target)
  if target.platform == 'cuda':
    return _gpu_devices(target, num_slices)
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


def tpu_present() -> bool:
  """Whether this machine has TPU chips (jax's own PCI probe)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return False


def enough_cpu_threads(per_device: int = 4, rendezvous_timeout_s: int = 300):
  """XLA:CPU sizes its thread pools max(cores, devices) (cores: the NPROC variable if set). A
  program's collectives block their thread until every device arrives, and a device may run
  several independent ones at once: with 8 fake devices on a 2-core machine, 8 threads could all be
  blocked at two different all-reduces while the device that would release them waits for a thread
  (a train step aborted at a 40 s rendezvous timeout, "7 of 8 arrived"). With
  --xla_force_host_platform_device_count=N and NPROC unset, NPROC = max(cores, per_device * N); and
  unless XLA_FLAGS sets it, a rendezvous waits `rendezvous_timeout_s` for a late device before XLA
  aborts the process (its default, 40 s, is short for 8 devices sharing 2 busy cores). Call before
  JAX initialises its backends."""
  flags = os.environ.get('XLA_FLAGS', '')
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)', flags)
  if not match:
    return
  if 'NPROC' not in os.environ:
    os.environ['NPROC'] = str(max(os.cpu_count() or 1, per_device * int(match.group(1))))
  if 'xla_cpu_collective_call_terminate_timeout_seconds' not in flags:
    os.environ['XLA_FLAGS'] = (f'{flags} --xla_cpu_collective_call_terminate_timeout_seconds='
                               f'{rendezvous_timeout_s}')


def skip_absent_tpu():
  """With libtpu installed (the `tpu` / `test` extras) on a machine without TPU chips, JAX would
  try the TPU backend at start-up and print libtpu's initialisation errors; use the other platforms
  instead (CUDA only where there is a GPU: the plugin alone, for compiling, is not one). An explicit JAX_PLATFORMS is kept. Call before JAX initialises its backends."""
  plugins = [m for m in ('libtpu', 'jax_cuda12_plugin') if importlib.util.find_spec(m)]
  if os.environ.get('JAX_PLATFORMS') or not plugins or tpu_present():
    return
  gpu = os.path.exists('/dev/nvidia0') and 'jax_cuda12_plugin' in plugins
  platforms = 'cuda,cpu' if gpu else 'cpu'
  os.environ['JAX_PLATFORMS'] = platforms  # subprocesses
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', platforms)  # this process: JAX read the variable at import

"""Multi-process JAX: start-up, failure detection, preemption, and the data position across layouts.

One process per host (TPU VM, GPU node) or per GPU; each sees its local devices and reads only its
rows of every global batch (data_pipelines/pipeline.py). `initialize()` picks the setup from:
  1. --coordinator_address/--num_processes/--process_id, or JAX_COORDINATOR_ADDRESS,
     JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/local.sh, GKE/XPK);
  2. jax.distributed.initialize()'s own cluster detection: SLURM, Open MPI, a Cloud TPU VM or TPU
     slice, GKE (launch/slurm.sbatch, launch/tpu_pod.sh, launch/gke_xpk.md);
  3. where it detects none, a single process (--distributed=cluster makes that an error instead).

A process that dies stops the others within about --heartbeat_timeout_seconds: the coordination
service notices the missing heartbeats and every client aborts with an error naming the dead task,
rather than waiting in a collective forever. SIGTERM (preemption; also TPU maintenance events, which
arrive as SIGTERM) makes every process save at one agreed step and exit 0: see `Preemption`.
"""

import os
import signal
import threading

import jax
from absl import flags, logging
from jax.experimental import multihost_utils

ENV = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def define_flags():
  """Defined by the programs that take them (train.py), so library modules import cleanly."""
  flags.DEFINE_enum('distributed', 'auto', ['auto', 'cluster', 'off'],
                    'auto: coordinator flags/env, else a cluster jax.distributed.initialize()'
                    ' detects, else one process; cluster: as auto, but no cluster is an error;'
                    ' off: one process.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (or env %s).' % ENV[0])
  flags.DEFINE_integer('num_processes', None, 'Processes in the job (or env %s).' % ENV[1])
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or env %s).' % ENV[2])
  flags.DEFINE_integer('heartbeat_timeout_seconds', 60,
                       'A process silent this long is declared dead and all others abort.')
  flags.DEFINE_integer('initialization_timeout', 300,
                       'Seconds to wait for all processes to join at start-up.')
  flags.DEFINE_integer('shutdown_timeout_seconds', 60,
                       'Seconds an exiting process waits for the others at the shutdown barrier.')
  flags.DEFINE_integer('preempted_exit_code', 0,
                       'Exit status after a preemption checkpoint; non-zero (e.g. 75) where the'
                       ' scheduler restarts only failed jobs (JobSet, SLURM requeue on time-out).')


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None, *,
               heartbeat_timeout_seconds: int = 60, initialization_timeout: int = 300,
               shutdown_timeout_seconds: int = 60) -> bool:
  """Joins the multi-process job this process belongs to, if any; True if multi-process.

  Call before anything touches a device (the backend is created at the first use).
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV[0]) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV[1])
  process_id = process_id if process_id is not None else _env_int(ENV[2])
  if jax.distributed.is_initialized() or mode == 'off':
    return jax.process_count() > 1
  timeouts = dict(heartbeat_timeout_seconds=heartbeat_timeout_seconds,
                  initialization_timeout=initialization_timeout,
                  shutdown_timeout_seconds=shutdown_timeout_seconds)
  if coordinator_address:
    missing = [n for n, v in (('num_processes', num_processes), ('process_id', process_id))
               if v is None]
    if missing:
      raise ValueError(f'Coordinator {coordinator_address} given but not {missing}: pass'
                       f' --num_processes and --process_id, or set {ENV[1]} and {ENV[2]}.')
    kw = dict(coordinator_address=coordinator_address, num_processes=num_processes,
              process_id=process_id)
  else:
    kw = {}  # jax.distributed.initialize() reads SLURM / MPI / TPU / GKE environments itself
  # CPU processes exchange collectives over TCP with gloo (also the default in jax 0.10.2).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**kw, **timeouts)
  except ValueError as e:
    # JAX's words when no cluster is detected and nothing was given: then this is one process.
    if kw or mode == 'cluster' or 'coordinator_address should be defined' not in str(e):
      raise
    return False
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def initialize_from_flags() -> bool:
  f = flags.FLAGS
  return initialize(f.distributed, f.coordinator_address, f.num_processes, f.process_id,
                    heartbeat_timeout_seconds=f.heartbeat_timeout_seconds,
                    initialization_timeout=f.initialization_timeout,
                    shutdown_timeout_seconds=f.shutdown_timeout_seconds)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer.') from None


# ------------------------------------------------------------------------------------ preemption --

class Preemption:
  """After SIGTERM, `reached(step)` turns True at the same step on every process: save and exit.

  Multi-process: JAX's preemption sync manager (started by jax.distributed.initialize) catches
  SIGTERM in any process, tells the others through the coordination service, and picks the step
  after the furthest one any process has reached. Why not a flag all-gathered every N steps: that
  would be a blocking collective in the loop; the sync point costs nothing until a notice arrives.
  One process: a signal handler sets a flag (a second SIGTERM kills as usual); `close()` puts the
  old handler back.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.received = False
    self.previous = None
    if not self.multi and threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step boundary, then exiting.')
    self.received = True
    self.close()

  def close(self):
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)
      self.previous = None

  def reached(self, step: int) -> bool:
    """Call once per step, with the number of steps done, on every process."""
    if self.multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received


# ------------------------------------------------------------------ data position across layouts --

def seek(iterator, step: int):
  """Puts a fresh per-process iterator where it is after `step` batches, from the step alone.

  Why this works under any process count: each global batch is fixed by its index (the shapes
  records [s*B, (s+1)*B), the BatchPlan's batch s) and every process reads its rows of each one, so
  after s steps every process has consumed s elements of its own per-process stream. The Grain state
  of such a stream is {'next_index': s * e}, e = elements per step in this layout (the per-process
  batch for shapes, 1 for bucketed batches): one read measures e. Packed sequences and Grain worker
  processes keep richer per-process state, which cannot be re-derived: resume those on the same
  number of processes.
  """
  state = iterator.get_state()
  if set(state) != {'next_index'} or state['next_index'] != 0:
    raise ValueError(
        'This input pipeline keeps per-process state that cannot be re-derived from the step'
        f' ({sorted(state)}; config.data.packing or config.data.worker_count > 0): resume it on'
        ' the same number of processes that wrote the checkpoint.')
  next(iterator)
  per_step = iterator.get_state()['next_index']
  iterator.set_state({'next_index': step * per_step})


def check_batch_rows(batch_sharding, data_parallel: int):
  """Process p of P must hold block p of every global batch's rows (batch sharded over data x fsdp):
  that is the block its input pipeline reads, and what makes a global batch the same whatever the
  number of processes."""
  p, n = jax.process_index(), jax.process_count()
  if data_parallel % n:
    raise ValueError(f'The batch is split {data_parallel} ways (mesh data x fsdp) over {n}'
                     ' processes; each process must hold its own rows: make data x fsdp a multiple'
                     ' of the process count (config.mesh).')
  index_map = batch_sharding.addressable_devices_indices_map((data_parallel,))
  rows = sorted({(idx[0].start or 0) for idx in index_map.values()})
  per = data_parallel // n
  if rows != list(range(p * per, (p + 1) * per)):
    raise ValueError(f'Process {p} of {n} holds batch rows {rows} of {data_parallel}, not the'
                     f' block {p * per}..{(p + 1) * per - 1} its input pipeline reads: the mesh'
                     ' must order devices by process along the data and fsdp axes'
                     ' (sharding.make_mesh).')

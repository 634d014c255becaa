"""Multi-process training for real, on one machine: processes with fake CPU devices joined through
a loopback coordinator (launch/local.sh), gloo collectives, preemption by SIGTERM, resume under
another process count, and a dead process stopping the job.

The slow tests start several training processes (each compiles the tiny model): ~1-2 min each on
2 CPU cores. They train on a manifest of small clips (the bucketed user-data path).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

from data_pipelines import pipeline
from sora_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, 'launch', 'local.sh')
CONFIG = os.path.join(ROOT, 'tests', 'multihost_config.py')
TIMEOUT = 600  # per launched job; a hang fails the test instead of the CI run


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def numbers(rows):
  """What must match between runs: everything but the timing-derived fields."""
  return [{k: v for k, v in r.items() if k not in ('steps_per_second', 'tflops_per_device')}
          for r in rows]


def wait_for_rows(workdir, n, proc, timeout=TIMEOUT):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'Exited with {proc.returncode} before logging {n} steps.')
    if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
      return
    time.sleep(0.1)
  raise AssertionError(f'No {n} logged steps in {timeout} s.')


@pytest.fixture(scope='module')
def manifest(tmp_path_factory):
  """12 lossless 16-frame clips of a coloured square moving down (a batch needs >= 8 examples)."""
  d = tmp_path_factory.mktemp('clips')
  rng = np.random.default_rng(0)
  rows = []
  for i in range(12):
    color = rng.integers(0, 256, 3)
    frames = np.broadcast_to(rng.integers(0, 40, (16, 1, 1, 3)), (16, 24, 24, 3)).astype(np.uint8)
    for t in range(16):
      frames[t, 4 + t % 8:12 + t % 8, 2 + i:10 + i] = color
    path = mf.write_video(d / f'clip{i}.mkv', frames, codec='ffv1', fps=8, pix_fmt='bgr0')
    rows.append({'path': path, 'caption': f'clip {i}: a square of colour {color.tolist()}'})
  (d / 'manifest.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(d / 'manifest.jsonl')


@pytest.fixture(scope='module')
def env():
  """The children's environment; they share conftest's persistent compilation cache."""
  e = dict(os.environ)
  e.pop('XLA_FLAGS', None)  # conftest's 8 devices; local.sh sets the count per process
  return e


def train_args(manifest, workdir, *flags):
  return [sys.executable, '-m', 'sora_jax.train', f'--config={CONFIG}',
          f'--config.data.manifest={manifest}', f'--workdir={workdir}', *flags]


def launch(num_processes, devices_per_process, args, env, log):
  return subprocess.Popen(
      [LOCAL, f'--num_processes={num_processes}', f'--devices_per_process={devices_per_process}',
       '--', *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
      start_new_session=True)


def run(num_processes, devices_per_process, args, env, log_path):
  with open(log_path, 'w') as log:
    proc = launch(num_processes, devices_per_process, args, env, log)
    rc = proc.wait(TIMEOUT)
  assert rc == 0, open(log_path).read()[-5000:]


def child_pid(launcher, process_id):
  """The pid of the training process local.sh started as JAX_PROCESS_ID=process_id."""
  with open(f'/proc/{launcher.pid}/task/{launcher.pid}/children') as f:
    for pid in f.read().split():
      try:
        with open(f'/proc/{pid}/environ', 'rb') as e:
          if f'JAX_PROCESS_ID={process_id}'.encode() in e.read().split(b'\0'):
            return int(pid)
      except OSError:  # a short-lived child (local.sh's `sleep`) already gone
        continue
  raise AssertionError(f'No process {process_id} under local.sh.')


# ------------------------------------------------------------------------------------------ fast --


def test_local_sh_stops_the_others_when_one_fails(tmp_path):
  script = ('import os, sys, time\n'
            'i = int(os.environ["JAX_PROCESS_ID"])\n'
            'print("process", i, "of", os.environ["JAX_NUM_PROCESSES"], os.environ["XLA_FLAGS"])\n'
            'sys.exit(3) if i == 1 else time.sleep(60)\n')
  start = time.monotonic()
  out = subprocess.run([LOCAL, '--num_processes=3', '--devices_per_process=2', '--', sys.executable,
                        '-c', script], capture_output=True, text=True, timeout=60)
  assert out.returncode == 3 and time.monotonic() - start < 20
  lines = out.stdout.splitlines()
  for i in range(3):  # each child's own device count (other inherited XLA flags kept)
    line = next(l for l in lines if l.startswith(f'[{i}] process {i} of 3 '))
    assert line.split()[5:].count('--xla_force_host_platform_device_count=2') == 1, line
  assert 'process 1 (pid' in out.stderr and 'exited with status 3' in out.stderr


def test_initialize_reads_flags_and_env(monkeypatch):
  for name in distributed.ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  with pytest.raises(ValueError, match=r"not \['num_processes', 'process_id'\]"):
    distributed.initialize()
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.initialize()


def _initialize_in_subprocess(script: str, **env_vars) -> list[str]:
  """Runs `script` after `initialize()` in a fresh process (it cannot be undone, and must come
  before JAX's backend starts); returns its printed words."""
  env = {k: v for k, v in os.environ.items()
         if k not in distributed.ENV and not k.startswith(('SLURM_', 'OMPI_', 'TPU_'))}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', **env_vars)
  out = subprocess.run([sys.executable, '-c', 'import jax\nfrom sora_jax.parallel import distributed\n'
                        + script], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()


def test_initialize_uses_jax_cluster_detection():
  """No cluster: one process, and --distributed=cluster is an error. A SLURM job step is detected by
  jax.distributed.initialize() itself (here a one-task job: a one-process job with a coordinator)."""
  assert _initialize_in_subprocess(
      'print(distributed.initialize(), jax.distributed.is_initialized())\n'
      'try:\n  distributed.initialize("cluster")\nexcept ValueError as e:\n'
      '  print("refused", "coordinator_address" in str(e))') == ['False', 'False', 'refused', 'True']
  assert _initialize_in_subprocess(
      'multi = distributed.initialize(initialization_timeout=30)\n'
      'print(multi, jax.distributed.is_initialized(), jax.process_count(), jax.device_count())',
      SLURM_JOB_ID='4321', SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='1', SLURM_PROCID='0',
      SLURM_LOCALID='0') == ['False', 'True', '1', '2']


def test_seek_rederives_the_data_position_for_any_process_count():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  for index, count in ((0, 1), (1, 2)):
    read = pipeline.train_iterator(config, process_index=index, process_count=count)
    for _ in range(3):
      next(read)
    fresh = pipeline.train_iterator(config, process_index=index, process_count=count)
    distributed.seek(fresh, 3)
    assert fresh.get_state() == read.get_state()
    want, got = next(read), next(fresh)
    np.testing.assert_array_equal(got['video'], want['video'])
  config.data.packing = True
  with pytest.raises(ValueError, match='same number of processes'):
    distributed.seek(pipeline.train_iterator(config), 3)


# ------------------------------------------------------------------------------------------ slow --


@pytest.mark.slow
def test_preempted_two_process_run_resumes_on_one_process_bit_exact(manifest, env, tmp_path):
  """2 processes x 2 devices, SIGTERM to one process -> both save at one step and exit 0; 1 process
  x 4 devices resumes from that checkpoint, is preempted itself (exit status 75 as asked), and a
  rerun finishes: every logged number equals an uninterrupted 1 x 4 run's, bit for bit."""
  steps = ['--config.total_steps=30', '--config.checkpoint_every_steps=1000']
  reference = str(tmp_path / 'reference')
  run(1, 4, train_args(manifest, reference, *steps), env, tmp_path / 'reference.log')

  workdir = str(tmp_path / 'run')
  args = train_args(manifest, workdir, *steps, '--heartbeat_timeout_seconds=20')
  with open(tmp_path / 'two.log', 'w') as log:
    proc = launch(2, 2, args, env, log)
    wait_for_rows(workdir, 2, proc)
    os.kill(child_pid(proc, 1), signal.SIGTERM)  # a preemption notice to one host only
    assert proc.wait(TIMEOUT) == 0, open(tmp_path / 'two.log').read()[-5000:]
  rows = read_metrics(workdir)
  stopped = rows[-1]['step']
  assert 2 <= stopped < 30 and [r['step'] for r in rows] == list(range(1, stopped + 1))
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == [str(stopped)]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', str(stopped), 'dataset'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']

  with open(tmp_path / 'one.log', 'w') as log:  # resumes from 2 processes' checkpoint
    proc = launch(1, 4, [*args, '--preempted_exit_code=75'], env, log)
    wait_for_rows(workdir, stopped + 1, proc)
    proc.send_signal(signal.SIGTERM)  # forwarded by local.sh
    assert proc.wait(TIMEOUT) == 75, open(tmp_path / 'one.log').read()[-5000:]
  stopped_again = read_metrics(workdir)[-1]['step']
  assert stopped < stopped_again < 30
  assert sorted(map(int, os.listdir(os.path.join(workdir, 'checkpoints')))) == [
      stopped, stopped_again]

  run(1, 4, args, env, tmp_path / 'finish.log')
  assert numbers(read_metrics(workdir)) == numbers(read_metrics(reference))


@pytest.mark.slow
def test_a_dead_process_stops_the_other_within_the_heartbeat_timeout(manifest, env, tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'run')
  args = train_args(manifest, workdir, '--config.total_steps=100000',
                    '--heartbeat_timeout_seconds=10', '--shutdown_timeout_seconds=10')
  procs, logs = [], []
  for i in range(2):
    logs.append(open(tmp_path / f'{i}.log', 'w'))
    procs.append(subprocess.Popen(
        args, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(env, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                 JAX_PROCESS_ID=str(i), JAX_PLATFORMS='cpu',
                 XLA_FLAGS='--xla_force_host_platform_device_count=2')))
  try:
    wait_for_rows(workdir, 2, procs[0])
    procs[1].kill()
    start = time.monotonic()
    rc = procs[0].wait(60)
    elapsed = time.monotonic() - start
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  assert rc != 0 and elapsed < 10 + 20, (rc, elapsed)
  log = open(tmp_path / '0.log').read()
  assert re.search(r'unhealthy \(stopped sending heartbeats\)|Gloo .* failed', log), log[-3000:]


def test_shapes_stream_gives_the_same_global_batches_on_any_process_count():
  """Each process reads the contiguous block of rows its devices hold, so the global batches of the
  built-in data do not depend on how many processes read them."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  one = pipeline.train_iterator(config)
  two = [pipeline.train_iterator(config, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(2):
    whole = next(one)
    halves = [next(it) for it in two]
    for key in ('video', 'tokens'):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])

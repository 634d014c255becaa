"""Runs the repository's programs as a user does, `python -m MODULE ARGS` in a process of its own, for
a fraction of the cost: each run is a process forked from one server that has already imported JAX,
sora_jax and data_pipelines (seconds of imports on a small CPU host, paid once per test session).

A run is still a separate process: MODULE executes afresh as `__main__` (runpy, as `-m` does, with
sys.argv[0] its file and sys.path[0] the working directory), in its own working directory, with its own
absl flags, JAX backend and devices, file descriptors 1 and 2, and exit status. An uncaught exception
prints its traceback to stderr and exits 1, as the interpreter does. What differs from a cold start is
only that the modules the server imported are already in sys.modules. The environment is the test
process's, or `env` (as for subprocess.run): each distinct environment gets its own server, started
with it, since JAX reads some variables (JAX_PLATFORMS, XLA_FLAGS) when it is imported.

  result = programs.run('sora_jax.sample', '--workdir=...', cwd=ROOT)  # a CompletedProcess
"""

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading

_SERVERS = {}  # environment -> server process
_LOCK = threading.Lock()
PRELOAD = ('jax', 'jax.numpy', 'flax.nnx', 'optax', 'orbax.checkpoint', 'grain', 'av', 'absl.app',
           'ml_collections.config_flags', 'sora_jax.cli', 'sora_jax.train', 'sora_jax.sample',
           'sora_jax.evaluate', 'sora_jax.prepare', 'sora_jax.compile', 'data_pipelines.inspect')


def run(module, *args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` in `cwd` (default: this process's) with environment `env` (default:
  this process's), as a CompletedProcess with text stdout and stderr."""
  key = tuple(sorted((env if env is not None else os.environ).items()))
  with _LOCK:
    server = _SERVERS.get(key)
    if server is None or server.poll() is not None:
      server = _SERVERS[key] = subprocess.Popen(
          [sys.executable, __file__, *PRELOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
          text=True, env=dict(key))
      atexit.register(server.kill)
    with tempfile.TemporaryDirectory(prefix='program_') as d:
      out, err = os.path.join(d, 'stdout'), os.path.join(d, 'stderr')
      request = {'module': module, 'args': [str(a) for a in args],
                 'cwd': str(cwd or os.getcwd()), 'stdout': out, 'stderr': err, 'timeout': timeout}
      server.stdin.write(json.dumps(request) + '\n')
      server.stdin.flush()
      reply = server.stdout.readline()
      if not reply:
        raise RuntimeError(f'the program server died (exit {server.wait()})')
      returncode = json.loads(reply)['returncode']
      with open(out) as f_out, open(err) as f_err:
        stdout, stderr = f_out.read(), f_err.read()
  if returncode is None:
    raise subprocess.TimeoutExpired([module, *args], timeout, stdout, stderr)
  return subprocess.CompletedProcess(['python', '-m', module, *args], returncode, stdout, stderr)


def _child(request):
  """In the forked process: MODULE as `python -m` runs it; never returns."""
  import runpy  # pylint: disable=g-import-not-at-top
  import traceback  # pylint: disable=g-import-not-at-top
  code = 1
  try:
    os.chdir(request['cwd'])
    for fd, path in ((1, request['stdout']), (2, request['stderr'])):
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
      os.dup2(target, fd)
      os.close(target)
    sys.stdin = open(os.devnull)
    sys.path[0] = os.getcwd()  # `-m` puts the working directory first
    sys.argv = ['-m', *request['args']]  # run_module sets argv[0] to the module's file
    # The program itself was imported by the server only for its dependencies: `-m` runs it as
    # `__main__` without it ever being imported under its own name.
    module = request['module']
    sys.modules.pop(module, None)
    parent, _, child = module.rpartition('.')
    if parent in sys.modules and hasattr(sys.modules[parent], child):
      delattr(sys.modules[parent], child)
    try:
      runpy.run_module(module, run_name='__main__', alter_sys=True)
      code = 0
    except SystemExit as e:
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:
        sys.stderr.write(f'{e.code}\n')
        code = 1
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
  finally:
    try:  # the interpreter's shutdown: wait for non-daemon threads, run atexit handlers, flush
      threading._shutdown()  # pylint: disable=protected-access
      atexit._run_exitfuncs()  # pylint: disable=protected-access
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def _serve():
  import importlib  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  sys.path[0] = os.getcwd()  # not this file's folder (tests/), which is not on a user's path
  for name in sys.argv[1:]:
    importlib.import_module(name)
  replies = sys.stdout
  for line in sys.stdin:
    request = json.loads(line)
    replies.flush()
    pid = os.fork()
    if pid == 0:
      _child(request)
    deadline = time.monotonic() + request['timeout']
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        returncode = os.waitstatus_to_exitcode(status)
        break
      if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        returncode = None
        break
      time.sleep(0.02)
    replies.write(json.dumps({'returncode': returncode}) + '\n')
    replies.flush()


if __name__ == '__main__':
  _serve()

r"""Trains a text-to-video DiT with rectified flow.

  python -m sora_jax.train --config=configs/demo.py --workdir=runs/demo [--config.total_steps=...]

Re-running the same command on an existing workdir resumes from its latest checkpoint (state, RNG and
data iterator), bit-exactly on CPU, also with another number of processes or devices. Several hosts:
launch/ (local.sh, tpu_pod.sh, slurm.sbatch, gke_xpk.md) and sora_jax/parallel/distributed.py. SIGTERM
(preemption) saves a checkpoint at a step all processes agree on, then exits 0
(--preempted_exit_code).
"""

import functools
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from data_pipelines import bucketed, pipeline
from sora_jax import cli
from sora_jax.common import video_io
from sora_jax.config import geometry, validation
from sora_jax.evaluation import previews
from sora_jax.inference import frozen as frozen_lib
from sora_jax.parallel import distributed, sharding
from sora_jax.training import checkpoint, metrics
from sora_jax.training import state as state_lib
from sora_jax.training import resume, steps, update


def define_flags():
  """Defined only when run as a program, so the module imports cleanly next to the other CLIs."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and samples go.')
  distributed.define_flags()


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains (or resumes) the run in `workdir`; returns the final state. A start that fails in a new
  workdir leaves nothing behind; one that does not fit an existing run's checkpoints writes nothing."""
  fresh = not os.path.isdir(workdir) or not os.listdir(workdir)
  managers = []
  try:
    return _run(config, workdir, managers)
  except BaseException:
    for mngr in managers:  # finish an in-flight save: kept, and its threads then do not bury this
      try:                 # error under "cannot schedule new futures after shutdown" at exit
        mngr.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        logging.error('The checkpoint save in flight failed too: %s', e)
    if (fresh and jax.process_index() == 0
        and not os.path.exists(os.path.join(workdir, 'config.json'))):  # it never started
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _run(config: ml_collections.ConfigDict, workdir: str, managers: list):
  # ---- Config and mesh: everything is checked before anything compiles or is written.
  mesh_shape = validation.validate(config, jax.device_count())
  resume.check(config, workdir)
  mesh = sharding.make_mesh(mesh_shape, dcn=geometry.dcn_shape(config))
  logging.info('Mesh %s over %d devices (%d processes).', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ---- Input.
  skips = bucketed.SkipLog(config.data.max_skip_fraction)
  data_iter = pipeline.train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count(),
      data_parallel=mesh.shape['data'] * mesh.shape['fsdp'], skips=skips)
  batch_sharding = sharding.batch_sharding(mesh)
  distributed.check_batch_rows(batch_sharding, mesh.shape['data'] * mesh.shape['fsdp'])

  # Frozen parts (autoencoder, pretrained text encoder) turn batches into what the model trains on.
  frozen = frozen_lib.Frozen(config, mesh)

  # ---- Model, optimizer and state, born sharded; or restored onto this mesh.
  tx, schedule = state_lib.make_optimizer(config)
  mngr = checkpoint.manager(workdir, config)
  managers.append(mngr)
  if mngr.latest_step() is not None:
    graphdef, abstract, state_sh = state_lib.shardings(config, mesh)
    # The newest checkpoint that restores (damaged ones are set aside). Grain's iterator state is
    # per process: written by another process count, re-derive it.
    state, same_layout = checkpoint.restore_newest(mngr, state_lib.checkpointed(abstract),
                                                   data_iter)
    if 'frozen' in abstract:  # LoRA: the base again, checked against the adapters' record
      state_lib.check_base(config, checkpoint.saved_base(mngr, int(state['step'])))
      state['frozen'] = state_lib.load_base(config, abstract['frozen'], state_sh['frozen'])
    if not same_layout:
      distributed.seek(data_iter, int(state['step']))
    logging.info('Resumed from step %d.', int(state['step']))
  else:
    graphdef, state, state_sh = state_lib.init(config, mesh)
    if config.init_from:
      state = state_lib.init_from(config, state, state_sh)
      logging.info('Initialised the parameters from %s.', config.init_from)
  num_params = sum(x.size for x in jax.tree.leaves(state_lib.model_params(state)))
  logging.info('Model: %.2fM parameters.', num_params / 1e6)
  if 'frozen' in state:
    logging.info('LoRA: %.3fM trainable adapter parameters (rank %d), the base frozen.',
                 sum(x.size for x in jax.tree.leaves(state['params'])) / 1e6, config.lora.rank)
  base = state_lib.base_record(config) if 'frozen' in state else None

  # ---- The update step: explicit shardings, donated state, no host sync.
  is_vae = config.model.family == 'vae'
  null_caption = None if is_vae else frozen.null_caption()
  jitted = steps.jit_train_step(graphdef, config, tx, schedule, null_caption, state_sh, mesh)
  started = time.perf_counter()
  text_dtype = null_caption[0].dtype if config.text.encoder == 'umt5' else jnp.float32
  train_step = steps.BucketSteps(jitted, state, config, mesh, text_dtype=text_dtype)
  logging.info('Compiled the train step of %d bucket(s) in %.1f s.', len(train_step.compiled),
               time.perf_counter() - started)
  preview = previews.make(graphdef, config, mesh, frozen)

  def write_samples(step):
    videos, prompts = preview(state_lib.model_params(state, 'ema'))
    if jax.process_index() == 0:
      video_io.write_videos(videos, prompts, os.path.join(workdir, 'samples', f'step_{step}'),
                            fps=config.data.fps)
      writer.write_videos(step, videos, prompts, fps=config.data.fps)  # TensorBoard, by the loss

  # ---- Loop.
  step = int(state['step'])
  resume.write_config(config, workdir, step)  # the run has started
  writer = metrics.Writer(workdir, resume_step=step)
  progress = metrics.Progress(step, config.total_steps)
  pending = []  # device metrics since the last log; fetched only when logging
  window_flops = []  # model FLOPs of each step since the last log (from shapes: no device sync)
  step_flops = functools.partial(metrics.model_flops, config, num_params)
  peak = metrics.peak_tflops(override=config.peak_tflops_per_device)
  preemption, preempted = distributed.Preemption(), False
  saver = checkpoint.Saver(mngr, config.max_failed_saves)
  nonfinite = metrics.NonFinite(config.optim.max_nonfinite_steps, step)
  with jax.set_mesh(mesh):
    while step < config.total_steps:
      local = next(data_iter)
      # Video stays uint8 up to here (a quarter of the bytes); the step maps it to [-1, 1].
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
               for k, v in local.items()}
      if config.autoencoder and 'video' in batch:  # encode_batch takes pixels in [-1, 1]
        batch['video'] = update.normalize_pixels(batch['video'])
      batch = frozen.encode_batch(batch, batch_sharding)
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      nonfinite.add(step_metrics['nonfinite'])
      window_flops.append(step_flops(batch))
      step += 1
      log_now = step % config.log_every_steps == 0 or step == config.total_steps
      if log_now:
        window = jax.device_get(pending)
        pending = []
        finite = [m for m in window if not m['nonfinite']] or window  # skipped steps: counted
        logged = {k: float(np.mean([m[k] for m in finite])) for k in window[-1]
                  if k not in ('learning_rate', 'nonfinite')}
        logged['nonfinite_steps'] = int(sum(m['nonfinite'] for m in window))
        logged['learning_rate'] = float(window[-1]['learning_rate'])
        if pipeline.uses_user_data(config):
          logged['skipped_examples'] = len(skips.skipped)
        logged['steps_per_second'] = progress.update(step, logged['loss'])
        if window_flops[-1]:
          tflops = np.mean(window_flops) * logged['steps_per_second'] / jax.device_count() / 1e12
          logged['tflops_per_device'] = float(tflops)
          if peak:
            logged['mfu'] = float(tflops / peak)
        window_flops = []
        writer.write(step, logged)
      preempted = preemption.reached(step)  # every step, on every process
      save_now = (preempted or step % config.checkpoint_every_steps == 0
                  or step == config.total_steps)
      # Non-finite steps are read where the loop waits on the device anyway: logging, saving.
      if (log_now or save_now) and nonfinite.limit_reached():
        raise nonfinite.error(step, saver.latest())
      if save_now:  # a failed save is logged and tried again at the next checkpoint step
        saver.save(step, state_lib.checkpointed(state), data_iter, force=preempted, base=base)
      if preempted:
        logging.warning('Preempted: saved step %d; run the same command again to resume.', step)
        break
      if config.sample_every_steps and step % config.sample_every_steps == 0:
        write_samples(step)
    if not preempted and (config.sample_every_steps == 0 or step % config.sample_every_steps):
      write_samples(step)
  preemption.close()
  saver.finish()
  writer.close()
  return state


def check_config(config, num_devices: int):
  """validation.validate, with how to get more CPU devices when the mesh does not fit."""
  try:
    validation.validate(config, num_devices)
    if config.lora.rank and config.lora.init_from:  # the file's rank, alpha and modules, up front
      state_lib.lora_file(config)
  except ValueError as e:
    if 'devices' in str(e) and jax.default_backend() == 'cpu':
      raise ValueError(f'{e} (On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N'
                       ' devices.)') from e
    raise


def main(argv):
  del argv
  with cli.user_errors():
    distributed.initialize_from_flags()  # before anything touches a device
    check_config(flags.FLAGS.config, jax.device_count())
    resume.check(flags.FLAGS.config, flags.FLAGS.workdir)
  jax.config.update('jax_threefry_partitionable', True)
  steps.enable_compilation_cache(flags.FLAGS.config.compilation_cache_dir)
  checkpoint.quiet_orbax_logs()
  state = train(flags.FLAGS.config, flags.FLAGS.workdir)
  if int(state['step']) < flags.FLAGS.config.total_steps:  # preempted; saved
    sys.exit(flags.FLAGS.preempted_exit_code)


if __name__ == '__main__':
  cli.run(main, define_flags, required=['config', 'workdir'])

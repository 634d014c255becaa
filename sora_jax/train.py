r"""Trains a text-to-video DiT with rectified flow.

  python -m sora_jax.train --config=configs/demo.py --workdir=runs/demo [--config.total_steps=...]

Re-running the same command on an existing workdir resumes from its latest checkpoint (state, RNG and
data iterator), bit-exactly on CPU, also with another number of processes or devices. Several hosts:
launch/ (local.sh, tpu_pod.sh, slurm.sbatch, gke_xpk.md) and sora_jax/distributed.py. SIGTERM
(preemption) saves a checkpoint at a step all processes agree on, then exits 0
(--preempted_exit_code).
"""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from data_pipelines import bucketed, pipeline
from data_pipelines import shapes
from sora_jax import checkpoint, conditioning, config_lib, distributed, metrics, sampling, sharding
from sora_jax import upscale, video_io
from sora_jax import frozen as frozen_lib
from sora_jax import state as state_lib
from sora_jax.diffusion import flow
from sora_jax.models import dit, text


def define_flags():
  """Defined only when run as a program, so the module imports cleanly next to the other CLIs."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and samples go.')
  distributed.define_flags()


def make_train_step(graphdef, config, tx, schedule, null_caption=None):
  """(state, batch) -> (state, metrics); pure, jitted by the caller.

  `null_caption` = (tokens, mask) [1, ...] of the empty caption as the model takes captions (byte
  tokens, or a frozen encoder's embeddings: sora_jax/frozen.py); default: the byte tokenizer's.
  model.family='vae' trains the autoencoder on reconstruction + KL instead (captions unused).

  A batch is either one clip per row ({'video', 'tokens', 'mask'}), or packed sequences of several
  clips ({'patches', 'positions', 'segment_ids', 'tokens' [B, S, L], 'mask'}: data_pipelines/packing.py)
  when it holds 'segment_ids'. Packed: one t and caption dropout per segment, noise per token, and the
  loss is the mean over real (non-padding) tokens.
  """
  null_tokens, null_mask = null_caption or text.tokenize([''], config.text.max_length)
  shift = sampling.timestep_shift(config)

  def dropped(drop, null, value):
    """Caption dropout for [B, L] tokens or [B, L, D] embeddings (drop [B, 1])."""
    return jnp.where(drop.reshape(drop.shape + (1,) * (value.ndim - 2)), null, value)
  d = config.diffusion

  def per_frame_timesteps(rng, t, num_frames):
    """[B] -> [B, T]: with probability frame_noise_prob a clip gets an independent time per temporal
    patch. Why: with some frames nearly clean and others noisy, where the object goes next is a
    first-order question, so the caption's motion words get a strong gradient; t stays shared (as
    sampled) for the other clips, which is what the sampler uses."""
    pt = config.model.patch_size[0]
    own_rng, pick_rng = jax.random.split(rng)
    frames = flow.sample_timesteps(own_rng, t.shape[0] * (num_frames // pt),
                                   logit_mean=d.logit_mean, logit_std=d.logit_std, shift=shift)
    frames = jnp.repeat(frames.reshape(t.shape[0], -1), pt, axis=1)
    pick = jax.random.bernoulli(pick_rng, d.frame_noise_prob, (t.shape[0], 1))
    return jnp.where(pick, frames, t[:, None])

  def clip_loss(batch, t_rng, noise_rng, drop_rng):
    x0 = batch['video']
    b = x0.shape[0]
    t = flow.sample_timesteps(t_rng, b, logit_mean=d.logit_mean, logit_std=d.logit_std,
                              shift=shift)
    if d.frame_noise_prob > 0:
      t = per_frame_timesteps(jax.random.fold_in(t_rng, 1), t, x0.shape[1])
    given = None
    if conditioning.enabled(config):
      # Given frames ride on the per-frame times: t = 0 before interpolation keeps them clean.
      given, image = conditioning.sample_given(jax.random.fold_in(t_rng, 2), config, b,
                                               x0.shape[1])
      if not config.autoencoder:
        x0 = conditioning.as_image(x0, image, config.model.patch_size[0])
      t_given = 0.0
      if config.condition.context_noise > 0:
        t_given = jax.random.uniform(jax.random.fold_in(t_rng, 3), (b, 1),
                                     maxval=config.condition.context_noise)
      t = jnp.where(given > 0, t_given,
                    t if t.ndim == 2 else jnp.broadcast_to(t[:, None], given.shape))
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    x_t = flow.interpolate(x0, noise, t)
    # Caption dropout: the empty caption teaches the unconditional velocity used by CFG.
    drop = jax.random.bernoulli(drop_rng, config.text.dropout_prob, (b, 1))
    tokens = dropped(drop, null_tokens, batch['tokens'])
    mask = dropped(drop, null_mask, batch['mask'])

    lowres = base = None
    if upscale.enabled(config):  # the clip's own degraded copy as extra input channels
      lowres, base = upscale.training_condition(x0, config, jax.random.fold_in(noise_rng, 1))

    def loss_fn(params):
      if given is None:
        v = nnx.merge(graphdef, params)(x_t, t, tokens, mask, lowres=lowres, base=base)
        return flow.loss(v, x0, noise, flow.loss_weight(t, d.loss_t_floor)).mean(), {}
      v = nnx.merge(graphdef, params)(x_t, t, tokens, mask, given=given)
      weight = flow.loss_weight(t, d.loss_t_floor)
      return conditioning.masked_loss(v, x0, noise, weight, given).mean(), {}

    return loss_fn

  def packed_loss(batch, t_rng, noise_rng, drop_rng):
    x0, segment_ids = batch['patches'], batch['segment_ids']
    b, s = batch['tokens'].shape[:2]
    t = flow.sample_timesteps(t_rng, b * s, logit_mean=d.logit_mean, logit_std=d.logit_std,
                              shift=shift).reshape(b, s)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
    t_token = dit.per_token(t, dit.segment_index(segment_ids))
    x_t = flow.interpolate(x0, noise, t_token)
    drop = jax.random.bernoulli(drop_rng, config.text.dropout_prob, (b * s, 1))
    flat = lambda x: x.reshape(b * s, *x.shape[2:])
    tokens = dropped(drop, null_tokens, flat(batch['tokens'])).reshape(batch['tokens'].shape)
    mask = dropped(drop, null_mask, flat(batch['mask'])).reshape(batch['mask'].shape)

    def loss_fn(params):
      v = nnx.merge(graphdef, params).packed(x_t, batch['positions'], segment_ids, t, tokens, mask)
      return flow.packed_loss(v, x0, noise, segment_ids,
                              flow.loss_weight(t_token, d.loss_t_floor)), {}

    return loss_fn

  def vae_loss(batch, t_rng, noise_rng, drop_rng):
    """(loss, metrics such as PSNR) of the autoencoder on the batch's clips."""
    del drop_rng, t_rng
    from sora_jax.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
    v = config.vae

    def loss_fn(params):
      return vae_lib.vae_loss(nnx.merge(graphdef, params), batch['video'], noise_rng,
                              kl_weight=v.kl_weight, l1_weight=v.l1_weight, l2_weight=v.l2_weight)

    return loss_fn

  def train_step(state, batch):
    rng, t_rng, noise_rng, drop_rng = jax.random.split(state['rng'], 4)
    if config.model.family == 'vae':
      make_loss = vae_loss
    else:
      make_loss = packed_loss if 'segment_ids' in batch else clip_loss
    loss_fn = make_loss(batch, t_rng, noise_rng, drop_rng)
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    # EMA decay warms up so that early (poor) weights fade fast in short runs.
    step = state['step']
    decay = jnp.minimum(config.optim.ema_decay, (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state['ema'], params)
    new_state = dict(step=step + 1, params=params, ema=ema, opt_state=opt_state, rng=rng)
    return new_state, dict(extra, loss=loss, grad_norm=optax.tree.norm(grads),
                           learning_rate=schedule(step))

  return train_step


def model_flops(config, num_params: int, batch) -> float:
  """Model FLOPs of one train step on `batch` (0 for the autoencoder: convolutions, not counted)."""
  m = config.model
  if m.family == 'vae':
    return 0.0
  if 'segment_ids' in batch:  # packed: [B, N] tokens per sequence
    sequences, tokens = batch['segment_ids'].shape
  else:
    sequences = batch['video'].shape[0]
    tokens = math.prod(n // p for n, p in zip(batch['video'].shape[1:4], m.patch_size))
  depth, width = ((m.wan.num_layers, m.wan.num_attention_heads * m.wan.attention_head_dim)
                  if m.family == 'wan' else (m.depth, m.width))
  return metrics.transformer_step_flops(num_params, tokens, sequences, depth=depth, width=width)


def reconstruct(graphdef, params, video):
  """Autoencoder reconstruction (posterior mean) of [B, T, H, W, 3] clips in [-1, 1]."""
  model = nnx.merge(graphdef, params)
  return np.asarray(jnp.clip(model.decode(model.encode(jnp.asarray(video))[0]), -1.0, 1.0))


def sample_prompts(n: int) -> list[str]:
  """A fixed mix of seen and held-out prompts for periodic samples."""
  seen = [shapes.caption(c, s, d) for (c, s), d in
          zip(shapes.pairs('train'), shapes.DIRECTIONS * 8)]
  held = [shapes.caption(c, s, d) for (c, s), d in zip(shapes.pairs('heldout'), shapes.DIRECTIONS)]
  return [p for pair in zip(seen, held) for p in pair][:n]


def train(config: ml_collections.ConfigDict, workdir: str):
  # ---- Config and mesh: everything is checked before anything compiles.
  mesh_shape = config_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(mesh_shape, dcn=config_lib.dcn_shape(config))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
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
  frozen = frozen_lib.Frozen(config)

  # ---- Model, optimizer and state, born sharded; or restored onto this mesh.
  tx, schedule = state_lib.make_optimizer(config)
  mngr = checkpoint.manager(workdir, config)
  if mngr.latest_step() is not None:
    graphdef, abstract, state_sh = state_lib.shardings(config, mesh)
    # Grain's iterator state is per process: written by another process count, re-derive it.
    same_layout = distributed.saved_process_count(mngr) == jax.process_count()
    state = checkpoint.restore(mngr, abstract, data_iter if same_layout else None)
    if not same_layout:
      distributed.seek(data_iter, int(state['step']))
    logging.info('Resumed from step %d.', int(state['step']))
  else:
    graphdef, state, state_sh = state_lib.init(config, mesh)
    if config.init_from:
      state = state_lib.init_from(config, state, state_sh)
      logging.info('Initialised the parameters from %s.', config.init_from)
  num_params = sum(x.size for x in jax.tree.leaves(state['params']))
  logging.info('Model: %.2fM parameters.', num_params / 1e6)

  # ---- The update step: explicit shardings, donated state, no host sync.
  is_vae = config.model.family == 'vae'
  null_caption = None if is_vae else frozen.null_caption()
  train_step = jax.jit(make_train_step(graphdef, config, tx, schedule, null_caption),
                       in_shardings=(state_sh, batch_sharding), out_shardings=(state_sh, None),
                       donate_argnums=(0,))
  if not is_vae:
    generate = sampling.make_generate(graphdef, config, frozen=frozen, **sampling.settings(config))

  def write_samples(step):
    out_dir = os.path.join(workdir, 'samples', f'step_{step}')
    if is_vae:  # reconstructions of fixed clips, input above output
      batch = pipeline.eval_batches(config, 'heldout', config.num_train_samples,
                                    config.num_train_samples)[0]
      recon = reconstruct(graphdef, state['ema'], batch['video'])
      videos = video_io.to_uint8(np.concatenate([batch['video'], recon], axis=2))
      prompts = [f'reconstruction {i}' for i in range(len(videos))]
    elif upscale.enabled(config):  # bilinear | upscaled | real, side by side
      clips, prompts = upscale.eval_clips(config, 'heldout', config.num_train_samples)
      low = np.asarray(upscale.downsample(clips, config.upscale.factor))
      up = sampling.generate_videos(generate, state['ema'], prompts, config=config, mesh=mesh,
                                    seed=config.seed, batch_size=len(prompts), frozen=frozen,
                                    lowres=low)
      bilinear = video_io.to_uint8(np.asarray(upscale.upsample(low, config.upscale.factor)))
      videos = np.concatenate([bilinear, up, video_io.to_uint8(clips)], axis=3)
    else:
      prompts = sample_prompts(config.num_train_samples)
      videos = sampling.generate_videos(generate, state['ema'], prompts, config=config, mesh=mesh,
                                        seed=config.seed, batch_size=len(prompts), frozen=frozen)
    if jax.process_index() == 0:
      sampling.write_videos(videos, prompts, out_dir, fps=config.data.fps)

  # ---- Loop.
  step = int(state['step'])
  writer = metrics.Writer(workdir, resume_step=step)
  progress = metrics.Progress(step, config.total_steps)
  pending = []  # device metrics since the last log; fetched only when logging
  window_flops = []  # model FLOPs of each step since the last log (from shapes: no device sync)
  step_flops = functools.partial(model_flops, config, num_params)
  peak = metrics.peak_tflops(override=config.peak_tflops_per_device)
  preemption, preempted = distributed.Preemption(), False
  with jax.set_mesh(mesh):
    while step < config.total_steps:
      local = next(data_iter)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
               for k, v in local.items()}
      batch = frozen.encode_batch(batch, batch_sharding)
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)
      window_flops.append(step_flops(batch))
      step += 1
      if step % config.log_every_steps == 0 or step == config.total_steps:
        window = jax.device_get(pending)
        pending = []
        logged = {k: float(np.mean([m[k] for m in window])) for k in window[-1]
                  if k != 'learning_rate'}
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
      if preempted or step % config.checkpoint_every_steps == 0 or step == config.total_steps:
        checkpoint.save(mngr, step, state, data_iter, force=preempted)
      if preempted:
        logging.warning('Preempted: saved step %d; run the same command again to resume.', step)
        break
      if config.sample_every_steps and step % config.sample_every_steps == 0:
        write_samples(step)
    if not preempted and (config.sample_every_steps == 0 or step % config.sample_every_steps):
      write_samples(step)
  preemption.close()
  mngr.wait_until_finished()
  writer.close()
  return state


def main(argv):
  del argv
  distributed.initialize_from_flags()  # before anything touches a device
  jax.config.update('jax_threefry_partitionable', True)
  checkpoint.quiet_orbax_logs()
  if flags.FLAGS.workdir is None:
    raise app.UsageError('--workdir is required.')
  state = train(flags.FLAGS.config, flags.FLAGS.workdir)
  if int(state['step']) < flags.FLAGS.config.total_steps:  # preempted; saved
    sys.exit(flags.FLAGS.preempted_exit_code)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)

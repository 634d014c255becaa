"""The evaluation of a run trained on user data (config.data.manifest / prepared / tfds_name): its
flow-matching loss by flow time, on held-out videos. The shapes judge means nothing on real videos.

The loss is MaxDiffusion's and MLPerf's kind of eval loss: the velocity MSE at a fixed grid of flow
times (the midpoints of config.eval.num_timesteps equal bins of [0, 1]) with fixed noise, keyed by
each example's position and the time, so the figure is deterministic and every checkpoint sees the
same inputs: a curve to compare checkpoints by. Unweighted and unshifted, unlike the training loss.

Held out: the user data has no split of its own, so `eval_data` (evaluate --eval_data) names videos
kept out of training, as the pipelines already read them: a manifest (.csv / .jsonl) or a folder
written by `python -m sora_jax.prepare` with the training data's buckets, fps and cached encodings.
Without it, the run's own training data is measured (reported as eval_split 'train'): comparable
across checkpoints, but a measure of fit, not of generalisation. The first config.eval.num_videos
usable examples are used, each once, as one centre-cropped clip (its start drawn from config.seed
and its position: the same clip at every evaluation).
"""

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data_pipelines import bucketed, pipeline
from sora_jax.common import tokenizers
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import geometry
from sora_jax.diffusion import flow
from sora_jax.parallel import sharding

NOISE_SEED = 1234  # the shapes loss's too (suite.flow_matching_loss)


def applies(config) -> bool:
  """Runs this evaluation replaces the shapes judge for: text-to-video (and frame-conditioned)
  diffusion on user data. Autoencoder and upscaler runs keep their own evaluations."""
  return (pipeline.uses_user_data(config) and config.model.family != 'vae'
          and not geometry.upscale_enabled(config))


def check_options(config, eval_data: str | None, *, flow_loss: bool = True,
                  upscale_workdir: str | None = None):
  """ValueError / FileNotFoundError for evaluate options that do not fit `config`'s run."""
  if applies(config):
    if not flow_loss:
      raise ValueError('--noflow_loss: a run trained on user data is evaluated by its flow loss'
                       ' alone.')
    if upscale_workdir:
      raise ValueError('--upscale_workdir judges sampled videos; a run trained on user data is'
                       ' evaluated by its flow loss, nothing is sampled.')
  if not eval_data:
    return
  if not applies(config):
    raise ValueError(f'--eval_data={eval_data!r} is for runs trained on user data'
                     ' (config.data.manifest, prepared or tfds_name); this run has its own'
                     ' evaluation.')
  if os.path.isdir(eval_data):
    if not os.path.exists(os.path.join(eval_data, 'index.json')):
      raise FileNotFoundError(f'--eval_data={eval_data!r} is a folder without index.json: not one'
                              ' written by `python -m sora_jax.prepare`.')
  elif not os.path.isfile(eval_data):
    raise FileNotFoundError(f'--eval_data={eval_data!r}: no such manifest or prepared folder.')
  elif os.path.splitext(eval_data)[1].lower() not in ('.csv', '.jsonl', '.json'):
    raise ValueError(f'--eval_data={eval_data!r} must be a .csv / .jsonl manifest or a folder'
                     ' written by `python -m sora_jax.prepare`.')


def eval_config(config, eval_data: str | None):
  """`config` reading `eval_data` (else its own data) with centre crops: same pixels every time."""
  c = copy.deepcopy(config)
  if eval_data:
    c.data.manifest = c.data.prepared = c.data.tfds_name = ''
    c.data[('prepared' if os.path.isdir(eval_data) else 'manifest')] = os.path.abspath(eval_data)
  c.data.random_crop = False
  return c


def plans(examples, table, batch_size: int, rows: int):
  """(eval table, [(plan, real rows)]): every example once, bucket by bucket in data order, in
  batches of min(bucket batch, batch_size) rounded up to the mesh's rows; a last partial batch is
  topped up with its own rows (their losses are dropped)."""
  table = [dataclasses.replace(b, batch_size=-(-min(b.batch_size, batch_size) // rows) * rows)
           for b in table]
  out = []
  for b, bucket in enumerate(table):
    ids = np.array([i for i, e in enumerate(examples) if e.bucket == b], np.int64)
    for start in range(0, len(ids), bucket.batch_size):
      chunk = ids[start:start + bucket.batch_size]
      out.append(({'index': len(out), 'bucket': b, 'ids': np.resize(chunk, bucket.batch_size)},
                  len(chunk)))
  return table, out


def flow_loss(graphdef, params, config, mesh, frozen, eval_data: str | None = None) -> dict:
  """{'flow_loss': mean over t, 'flow_loss_by_t': {t: loss}, 'num_examples', 'eval_split'
  ('held_out' or 'train'), 'eval_data' (what was read), 'skipped_examples'}."""
  c = eval_config(config, eval_data)
  rows = mesh.shape['data'] * mesh.shape['fsdp']
  skips = bucketed.SkipLog(c.data.max_skip_fraction)
  table = buckets_lib.make(c, rows)
  examples, load_fn = pipeline.user_examples(c, table, skips)
  examples = examples[:c.eval.num_videos]
  if not examples:
    raise ValueError(f'No usable examples in {eval_data or "the training data"} to evaluate on.')
  table, batches = plans(examples, table, c.eval.batch_size, rows)
  load = bucketed.LoadBatch(examples, table, load_fn=load_fn, seed=c.seed,
                            max_length=c.text.max_length, tokenize=tokenizers.Tokenizer(c))
  k = c.eval.num_timesteps
  grid = (np.arange(k) + 0.5) / k
  data_sharding = sharding.batch_sharding(mesh)

  @jax.jit
  def losses(params, batch, t, j, ids):
    """Per-example losses [B]; noise keyed by (example, time), not by the batch it lands in."""
    x0 = batch['video']
    key = jax.random.PRNGKey(NOISE_SEED)
    noise = jax.vmap(lambda i: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, i), j), x0.shape[1:], x0.dtype))(ids)
    t = jnp.full((x0.shape[0],), t, x0.dtype)
    v = nnx.merge(graphdef, params)(flow.interpolate(x0, noise, t), t, batch['tokens'],
                                    batch['mask'])
    return flow.loss(v, x0, noise)

  sums, decode_skips = np.zeros(k), 0
  for plan, real in batches:
    batch = load.map(plan)
    decode_skips += len(batch.pop('_skipped'))
    batch.pop('_paths')
    if 'video' in batch:  # uint8 pixels; Frozen.encode_batch takes them in [-1, 1]
      batch['video'] = pipeline.to_float(batch['video'])
    batch = frozen.encode_batch(jax.device_put(batch, data_sharding), data_sharding)
    batch = {key: batch[key] for key in ('video', 'tokens', 'mask')}
    ids = jnp.asarray(plan['ids'], jnp.int32)
    for j, t in enumerate(grid):
      sums[j] += float(np.asarray(losses(params, batch, t, j, ids))[:real].sum())
  by_t = sums / len(examples)
  result = {'flow_loss': float(by_t.mean()),
            'flow_loss_by_t': {f'{t:.4f}': float(l) for t, l in zip(grid, by_t)},
            'num_examples': len(examples), 'eval_split': 'held_out' if eval_data else 'train',
            'eval_data': os.path.abspath(eval_data) if eval_data else _data_name(config),
            'skipped_examples': len(skips.skipped) + decode_skips}
  logging.info('Flow loss %.4f on %d %s examples of %s; by t %s', result['flow_loss'],
               len(examples), 'held-out' if eval_data else 'training (not held-out)',
               result['eval_data'], result['flow_loss_by_t'])
  return result


def _data_name(config) -> str:
  d = config.data
  return d.manifest or d.prepared or f'tfds:{d.tfds_name}'

r"""Compiles what `sora_jax.train` would run on a TPU slice, from any machine, and reports whether it
fits and how fast it could run there.

  python -m sora_jax.compile --config=configs/wan2_1_t2v_14b.py --topology=v5p-8 \
      --config.data.height=720 --config.data.width=1280 --report=wan14b_v5p8.json

The same config files and --config.* overrides as `train`. For the slice's devices (libtpu through
`jax.experimental.topologies`; no TPU needed: pip install -e ".[tpu]") and the config's mesh, it lowers
from abstract shapes (no weights allocated) and compiles: the train step of every bucket, one sampling
step (the guided velocity of a batch), and the frozen encoders' encode steps. For each it reports
per-chip argument / output / temporary bytes against the chip's HBM (or XLA's out-of-memory figures
and largest buffers), model FLOPs, the compiled FLOPs and HBM bytes (per layer from 1- and 2-layer
unrolled programs, since XLA counts a loop body once), collective bytes by kind, and a roofline step
time and MFU (the slowest of compute, HBM and ICI at peak: a ceiling, not a forecast).
"""

import copy
import json
import math
import sys

import jax
import jax.numpy as jnp
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags

from sora_jax import cli
from sora_jax.common import tokenizers
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import geometry, validation
from sora_jax.diffusion import flow
from sora_jax.inference import frozen as frozen_lib
from sora_jax.parallel import compiled as compiled_lib
from sora_jax.parallel import sharding, topologies
from sora_jax.training import factory, metrics, steps
from sora_jax.training import state as state_lib
from sora_jax.training.objectives import wan_i2v

PROGRAMS = ('train', 'sample', 'encode')


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training config file.', lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5p-8, v5p-64, v6e-8, v6e-256, v5e-16,'
                      ' v4-32; or a GPU node: h100-8, h200-8.')
  flags.DEFINE_integer('num_slices', 1, 'Slices joined over the data-centre network (multi-slice:'
                       ' config.mesh.dcn_data * dcn_fsdp must equal it).')
  flags.DEFINE_string('report', None, 'Write the report here as JSON.')
  flags.DEFINE_list('programs', list(PROGRAMS), f'Which of {PROGRAMS} to compile.')
  flags.DEFINE_bool('count_flops', True, 'Also compile 1- and 2-layer unrolled copies of the'
                    ' diffusion programs to count compiled FLOPs, bytes and collectives per layer.')


def target_mesh(config, target, num_slices: int):
  """The config's mesh over the target's devices; config errors as ValueError before compiling."""
  n = target.chips * num_slices
  try:
    shape = validation.validate(config, n, weights=False)  # shapes only: no weights are read
  except ValueError as e:
    raise ValueError(f'{e} (on {num_slices} x {target.name}: {n} chips)') from e
  dcn = geometry.dcn_shape(config)
  if math.prod(dcn.values()) != num_slices:
    raise ValueError(f'--num_slices={num_slices}: config.mesh.dcn_data * dcn_fsdp = '
                     f'{math.prod(dcn.values())} must equal it (the axes that span slices).')
  devices = topologies.devices(target, num_slices)
  return sharding.make_mesh(shape, devices=devices, dcn=dcn if num_slices > 1 else None,
                            physical=True)


def _depth_key(config):
  return ('wan', 'num_layers') if config.model.family == 'wan' else (None, 'depth')


def _with_depth(config, depth: int):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.scan_layers = False
    sub, key = _depth_key(c)
    (c.model[sub] if sub else c.model)[key] = depth
  return c


def _depth(config) -> int:
  sub, key = _depth_key(config)
  return int((config.model[sub] if sub else config.model)[key])


def _analyse(name, lower, *, model_flops, chip, per_layer=None, depth=None, extra=None,
             recompute=1.0):
  """Compile `lower()` and collect the report entry; an out-of-memory compile is a result too.

  The compute time counts at least `recompute` x the model FLOPs (full remat runs each forward pass
  twice: 8/6), since XLA's count misses what runs in Mosaic kernels (splash attention)."""
  entry = dict(name=name, model_flops=model_flops, hbm_capacity=int(chip.hbm_bytes))
  entry.update(extra or {})
  try:
    exe = lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = compiled_lib.out_of_memory(e)
    if oom is None:
      raise
    entry.update(oom, fits=False, over_bytes=oom['hbm_bytes_per_chip'] - oom['hbm_capacity'],
                 estimated_step_s=None, estimated_mfu=None)
    return entry
  entry.update(compiled_lib.memory(exe))
  entry['mosaic_kernels'] = exe.as_text().count('tpu_custom_call')  # splash attention, if chosen
  entry['fits'] = entry['hbm_bytes_per_chip'] <= chip.hbm_bytes
  entry['over_bytes'] = max(0, entry['hbm_bytes_per_chip'] - chip.hbm_bytes)
  if per_layer is not None:  # (cost, collectives) of the 1- and 2-layer unrolled programs
    (c1, k1), (c2, k2) = per_layer
    cost = {k: compiled_lib.per_layer(c1[k], c2[k], depth) for k in c1}
    coll = {k: int(compiled_lib.per_layer(k1[k], k2[k], depth)) for k in k1}
  else:
    cost, coll = compiled_lib.cost(exe), compiled_lib.collective_bytes(exe.as_text())
  if model_flops is None:  # no analytic count: XLA's
    model_flops = cost['flops']
  entry['model_flops'] = float(model_flops)
  entry.update(compiled_flops=cost['flops'], bytes_accessed=cost['bytes_accessed'],
               collective_bytes=coll)
  entry.update(compiled_lib.roofline(
      flops=max(cost['flops'], model_flops * recompute), bytes_accessed=cost['bytes_accessed'],
      collective=sum(coll.values()), model_flops=model_flops, peak_flops=chip.peak_flops,
      hbm_bandwidth=chip.hbm_bandwidth, ici_bandwidth=chip.ici_bandwidth))
  return entry


def _cost_of(lower):
  exe = lower().compile()
  return compiled_lib.cost(exe), compiled_lib.collective_bytes(exe.as_text())


def _null_caption(config):
  if config.text.encoder == 'umt5':  # values do not matter to the compiler, shapes do
    tokens, mask = steps.caption_spec(config, 1, jnp.dtype(config.model.dtype))
    return jnp.zeros(tokens.shape, tokens.dtype), jnp.zeros(mask.shape, mask.dtype)
  return tokenizers.tokenize([''], config.text.max_length)


def train_programs(config, mesh, chip, *, count_flops=True):
  """Report entries of the train step of every bucket."""
  n_chips = mesh.devices.size
  text_dtype = jnp.dtype(config.model.dtype)

  def lowered(cfg):
    tx, schedule = state_lib.make_optimizer(cfg)
    graphdef, abstract, state_sh = state_lib.shardings(cfg, mesh)
    step = steps.jit_train_step(graphdef, cfg, tx, schedule, _null_caption(cfg), state_sh, mesh)
    return step, abstract

  step, abstract = lowered(config)
  num_params, frozen_params = (_count(abstract.get(k, {})) for k in ('params', 'frozen'))
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  family = config.model.family
  probes = {}
  if count_flops and family != 'vae':
    probes = {d: lowered(_with_depth(config, d)) for d in (1, 2)}
  out = []
  for bucket in buckets_lib.make(config, data_parallel):
    spec = steps.batch_spec(config, bucket, text_dtype=text_dtype)
    flops = metrics.model_flops(config, num_params, spec, frozen_params) / n_chips

    def lower(step=step, abstract=abstract, spec=spec):
      with jax.set_mesh(mesh):
        return step.lower(abstract, spec)

    per_layer = None
    if probes:
      per_layer = [_cost_of(lambda p=probes[d]: _lower_in(mesh, p[0], p[1], spec)) for d in (1, 2)]
    logging.info('Compiling the train step of bucket %s (batch %d).', bucket.shape,
                 bucket.batch_size)
    out.append(_analyse(f'train {"x".join(map(str, bucket.shape))} batch {bucket.batch_size}',
                        lower, model_flops=flops, chip=chip, per_layer=per_layer,
                        depth=_depth(config),
                        recompute=8 / 6 if config.model.remat != 'none' else 1.0,
                        extra=dict(program='train', bucket=list(bucket.shape),
                                   batch_size=bucket.batch_size,
                                   num_params=num_params + frozen_params,
                                   trainable_params=num_params)))
  return out


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _lower_in(mesh, fn, *args):
  with jax.set_mesh(mesh):
    return fn.lower(*args)


def sample_program(config, mesh, chip, *, count_flops=True):
  """One sampling step: the classifier-free-guided velocity of one video per data replica, on the
  EMA parameters (float32, sharded as in training)."""
  n_chips = mesh.devices.size
  batch = mesh.shape['data'] * mesh.shape['fsdp']
  bucket = buckets_lib.Bucket(*buckets_lib.shapes(config)[0], batch_size=batch)
  text_dtype = jnp.dtype(config.model.dtype)

  def lowered(cfg):
    graphdef, abstract, state_sh = state_lib.shardings(cfg, mesh)
    neg = _null_caption(cfg)
    batch_sh = sharding.batch_sharding(mesh)

    i2v = ('image_condition',) if factory.wan_i2v(cfg) else ()
    i2v += ('image_embeds',) if factory.wan_clip(cfg) else ()  # Wan 2.2 I2V-A14B: no CLIP tokens

    def velocity(params, x, t, tokens, mask, *image):
      model = nnx.merge(graphdef, state_lib.model_params(params, 'ema'))
      both_tokens = jnp.concatenate([tokens, jnp.broadcast_to(neg[0], tokens.shape)])
      both_mask = jnp.concatenate([mask, jnp.broadcast_to(neg[1], mask.shape)])
      if image:  # Wan 2.1 I2V: both CFG halves see the image (sampling.make_generate)
        both = [jnp.concatenate([v, v]) for v in image]
        fn = lambda x2, t2: wan_i2v.velocity(model, x2, t2, both_tokens, both_mask, *both)
      else:
        fn = lambda x2, t2: model(x2, t2, both_tokens, both_mask)
      return flow.guided_velocity(fn, cfg.sample.guidance_scale)(x, t)

    # The EMA weights (and a LoRA run's frozen base, which they adapt).
    keys = ('ema', 'frozen') if 'frozen' in abstract else ('ema',)
    fn = jax.jit(velocity, in_shardings=({k: state_sh[k] for k in keys},)
                 + (batch_sh,) * (4 + len(i2v)), out_shardings=batch_sh)
    spec = steps.batch_spec(cfg, bucket, text_dtype=text_dtype)
    args = ({k: abstract[k] for k in keys}, spec['video'],
            jax.ShapeDtypeStruct((batch,), jnp.float32), spec['tokens'], spec['mask'],
            *(spec[k] for k in i2v))
    num_params = sum(_count(abstract.get(k, {})) for k in ('params', 'frozen'))
    return fn, args, num_params, spec

  fn, args, num_params, spec = lowered(config)
  doubled = dict(spec, video=jax.ShapeDtypeStruct((2 * batch,) + spec['video'].shape[1:],
                                                  spec['video'].dtype))
  flops = metrics.model_flops(config, num_params, doubled) / 3 / n_chips  # forward only
  per_layer = None
  if count_flops:
    per_layer = []
    for d in (1, 2):
      f, a, _, _ = lowered(_with_depth(config, d))
      per_layer.append(_cost_of(lambda f=f, a=a: _lower_in(mesh, f, *a)))
  return _analyse(f'sample step batch {batch} (CFG: {2 * batch} model rows)',
                  lambda: _lower_in(mesh, fn, *args), model_flops=flops, chip=chip,
                  per_layer=per_layer, depth=_depth(config),
                  extra=dict(program='sample', bucket=list(bucket.shape), batch_size=batch))


def encode_programs(config, mesh, chip):
  """The frozen encoders' steps for one batch of the default bucket: captions through the text
  encoder, clips through the autoencoder (what train.py runs before each train step)."""
  batch = mesh.shape['data'] * mesh.shape['fsdp']
  bucket = buckets_lib.Bucket(*buckets_lib.shapes(config)[0], batch_size=batch)
  out = []
  for name, fn, args in frozen_lib.abstract_encode_steps(config, mesh, bucket):
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(args[0]))
    # umT5: 2 FLOPs per parameter and token; the VAE's convolutions: XLA's count (None).
    flops = (2.0 * params * math.prod(args[1].shape) / mesh.devices.size
             if name.startswith('text') else None)
    out.append(_analyse(name, lambda fn=fn, args=args: _lower_in(mesh, fn, *args),
                        model_flops=flops, chip=chip,
                        extra=dict(program='encode', bucket=list(bucket.shape), batch_size=batch)))
  return out


def compile_all(config, mesh, target, programs=PROGRAMS, *, count_flops=True) -> list[dict]:
  chip = target.chip
  entries = []
  if 'train' in programs:
    entries += train_programs(config, mesh, chip, count_flops=count_flops)
  if 'sample' in programs and config.model.family != 'vae':
    entries.append(sample_program(config, mesh, chip, count_flops=count_flops))
  if 'encode' in programs:
    entries += encode_programs(config, mesh, chip)
  return entries


def table(entries, target, mesh) -> str:
  gb = lambda b: f'{b / 2**30:.1f}' if b is not None else '-'
  lines = [f'{target.name} ({target.chips} chips of {gb(target.chip.hbm_bytes)} GiB HBM), mesh '
           f'{dict(mesh.shape)}',
           f'{"program":<44} {"fits":>4} {"GiB/chip":>8} {"args":>6} {"temp":>6} '
           f'{"TFLOP/chip":>10} {"step s":>7} {"MFU":>5}  bound']
  for e in entries:
    mfu = f'{e["estimated_mfu"]:.0%}' if e.get('estimated_mfu') is not None else '-'
    step = f'{e["estimated_step_s"]:.2f}' if e.get('estimated_step_s') is not None else '-'
    lines.append(f'{e["name"][:44]:<44} {"yes" if e["fits"] else "NO":>4} '
                 f'{gb(e["hbm_bytes_per_chip"]):>8} {gb(e.get("argument_bytes")):>6} '
                 f'{gb(e.get("temp_bytes")):>6} {e["model_flops"] / 1e12:>10.1f} {step:>7} '
                 f'{mfu:>5}  {e.get("bound", "")}')
    if not e['fits']:
      lines.append(f'    over by {gb(e["over_bytes"])} GiB' + ''.join(
          f'\n    {l}' for l in e.get('largest', [])[:5]))
  return '\n'.join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.user_errors():
    target = topologies.parse(f.topology)
    topologies.check_compiler(target)
    unknown = sorted(set(f.programs) - set(PROGRAMS))
    if unknown:
      raise ValueError(f'--programs: unknown {unknown}; choose from {PROGRAMS}.')
    mesh = target_mesh(f.config, target, f.num_slices)
  jax.config.update('jax_threefry_partitionable', True)
  entries = compile_all(f.config, mesh, target, f.programs, count_flops=f.count_flops)
  print(table(entries, target, mesh))
  if f.report:
    with open(f.report, 'w') as out:
      json.dump(dict(topology=target.name, num_slices=f.num_slices, chips=target.chips *
                     f.num_slices, mesh=dict(mesh.shape), programs=entries), out, indent=2)
  sys.stdout.flush()


if __name__ == '__main__':
  cli.run(main, define_flags, required=['config', 'topology'])

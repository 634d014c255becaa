r"""Exports a Wan-family run for the torch tools (ComfyUI, diffusers).

  python -m sora_jax.export --workdir=runs/wan13b_lora --output=wan13b_lora.safetensors \
      --format=lora
  python -m sora_jax.export --workdir=runs/wan13b_lora --output=wan13b_merged --format=diffusers \
      [--checkpoint_step=N] [--nouse_ema]

--format=lora (LoRA runs, config.lora.rank > 0): the adapters as one .safetensors in the ComfyUI
layout (interop/wan_lora.py: export_lora) with the run's rank and alpha, which ComfyUI,
WanPipeline.load_lora_weights, `sample --lora` and `--config.lora.init_from` read. Only the adapters
are read from the checkpoint: the base is not needed.
--format=diffusers: the transformer as a WanTransformer3DModel folder (config.json and
diffusion_pytorch_model*.safetensors, sharded above 10 GB) that
WanTransformer3DModel.from_pretrained and interop.load_wan_transformer load; a LoRA run's adapters
are merged into its base first (kernel + alpha / rank * A @ B, stored in the base's dtype:
config.lora.base_dtype). Not the VAE or text encoder: the run used the pipeline folder's, unchanged.
Both take the EMA parameters (--nouse_ema: the raw ones) of the latest checkpoint (or
--checkpoint_step). One process writes the files, from host copies of the parameters.
"""

import os

import jax
import numpy as np
from absl import flags, logging
from flax import nnx

from sora_jax import cli
from sora_jax.config import schema
from sora_jax.inference import restore
from sora_jax.interop import wan_lora
from sora_jax.training import checkpoint, factory
from sora_jax.training import state as state_lib


def define_flags():
  """Defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string('workdir', None, 'Training workdir of a Wan-family run (model.family=wan).')
  flags.DEFINE_string('output', None, 'The .safetensors file (--format=lora) or the folder'
                      ' (--format=diffusers) to write.')
  flags.DEFINE_enum('format', None, ['lora', 'diffusers'], 'lora: the adapters of a LoRA run, in'
                    ' the ComfyUI layout; diffusers: the whole transformer (LoRA merged) as a'
                    ' WanTransformer3DModel folder.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint to export (default: latest).')
  flags.DEFINE_bool('use_ema', True, 'Export the EMA parameters.')


def check(config, workdir: str, fmt: str, output: str):
  """Refuses what cannot be exported, before anything loads (ValueError)."""
  family = config.model.family
  if family != 'wan':
    raise ValueError(f'{workdir} is a model.family={family!r} run: export writes Wan 2.1 files'
                     ' (model.family=\'wan\', e.g. configs/wan2_1_t2v_1_3b.py) only.')
  if fmt == 'lora' and not config.lora.rank:
    raise ValueError(f'{workdir} is a full fine-tuning run (config.lora.rank=0): it has no'
                     ' adapters to export; --format=diffusers writes its transformer.')
  if fmt == 'lora' and os.path.isdir(output):
    raise ValueError(f'--output={output} is a folder: --format=lora writes one .safetensors file.')
  if fmt == 'diffusers' and os.path.exists(output) and not (
      os.path.isdir(output) and not os.listdir(output)):
    # Into an earlier export's folder, its stale shards would sit beside the new index.
    raise ValueError(f'--output={output} exists: --format=diffusers writes a new folder.')


def flat_dit(params) -> dict:
  """{WanDiT parameter path: host array} of a run's parameters (their 'dit' part). ValueError for
  adapters outside it (config.lora.targets matching the byte text encoder): no Wan file has them."""
  flat = {path: v.get_value() for path, v in nnx.to_flat_state(params)}
  outside = sorted('/'.join(map(str, p)) for p in flat
                   if p[0] != 'dit' and p[-1] in ('lora_a', 'lora_b'))
  if outside:
    raise ValueError('Adapters outside the Wan transformer have no place in a Wan file: '
                     + ', '.join(outside))
  return {path[1:]: np.asarray(jax.device_get(v)) for path, v in flat.items() if path[0] == 'dit'}


def lora_adapters(workdir: str, step: int | None, use_ema: bool):
  """(adapters, step): a LoRA run's adapters alone from its checkpoint (no base), as host arrays."""
  config = schema.load_config(workdir)
  _, abstract = restore.abstract_params(config, restore.inference_mesh())
  adapters = nnx.split_state(abstract, nnx.LoRAParam, nnx.Param)[0]
  mngr = checkpoint.manager(workdir, read_only=True)
  adapters, step = checkpoint.restore_params(mngr, adapters, 'ema' if use_ema else 'params', step)
  return wan_lora.split_adapters(flat_dit(adapters))[1], step


def merged_transformer(config, params) -> dict:
  """The Wan transformer's flat parameters, a LoRA run's adapters merged into their kernels."""
  dit = flat_dit(params)
  if not config.lora.rank:
    return dit
  base, adapters = wan_lora.split_adapters(dit)
  return wan_lora.merge(base, adapters, config.lora.rank, config.lora.alpha or config.lora.rank)


def diffusers_config(config) -> dict:
  """The run's transformer as diffusers WanTransformer3DModel config fields."""
  fields = factory.wan_kwargs(config, factory.channels(config))
  return dict(fields, patch_size=list(fields['patch_size']))


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  f = flags.FLAGS
  with cli.user_errors():  # every input checked before a checkpoint loads
    config = schema.load_config(f.workdir)
    check(config, f.workdir, f.format, f.output)
    step = restore.find_step(f.workdir, f.checkpoint_step)
    if f.format == 'diffusers' and config.lora.rank:
      state_lib.check_base(config, checkpoint.saved_base(
          checkpoint.manager(f.workdir, read_only=True), step))
  if f.format == 'lora':
    adapters, step = lora_adapters(f.workdir, step, f.use_ema)
    rank, alpha = config.lora.rank, config.lora.alpha or config.lora.rank
    os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
    wan_lora.export_lora(adapters, rank, alpha, f.output, base=config.init_from)
    logging.info('Wrote %d adapted modules (rank %d, alpha %g) of step %d.', len(adapters), rank,
                 alpha, step)
  else:
    config, _, _, params, step = restore.load(f.workdir, step=step, use_ema=f.use_ema)
    written = wan_lora.export_diffusers(merged_transformer(config, params),
                                        diffusers_config(config), f.output)
    logging.info('Wrote %s of step %d.', ', '.join(written), step)
  print(f.output)


if __name__ == '__main__':
  cli.run(main, define_flags, required=['workdir', 'output', 'format'])

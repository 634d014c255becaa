r"""Samples videos from a trained run.

  python -m sora_jax.sample --workdir=runs/demo --prompt="a red circle moving left" \
      --prompt="a green square moving up" --output_dir=out [--sampler=dpm++2m --num_steps=16]
      [--negative_prompt="a blue triangle"]
      [--guidance_schedule=interval --guidance_interval=0.2,0.8]

A Wan 2.1 image-to-video run (configs/wan2_1_i2v_14b.py) takes --image=first.png: the first frame,
through the VAE condition channels and the CLIP image tokens as WanImageToVideoPipeline feeds them.

Conditioning (a run trained with config.condition.mix, e.g. configs/demo_conditioned.py;
sora_jax/diffusion/given_frames.py): --image=first.png (image-to-video), --end_image=last.png (with --image:
connect two images), --video=clip.mp4 --extend=forward|backward [--overlap=K] (continue a clip after
its last / before its first K model frames; the output starts / ends with them), --video=clip.mp4
--edit_strength=0.6 (SDEdit under the new prompt: works with any run), --num_frames=N longer than the
training clip (sliding windows of the training length overlapping by --overlap frames). Images and
videos are resized to the run's frame size. --upscale_workdir=runs/demo_upscale: a cascaded
super-resolution run (sora_jax/inference/upscale.py) upscales every video before it is written.

--lora=FILE [--lora_scale=S]: a Wan 2.1 LoRA file (ComfyUI, diffusers/PEFT or musubi layout, e.g.
one `sora_jax.export --format=lora` wrote) merged into a Wan-family run's kernels,
kernel + S * alpha / rank * A @ B, before sampling.

Writes one H.264 mp4 per prompt and OUT/samples.json = {"samples": [{"prompt", "path"}, ...]}.
"""

import jax
import numpy as np
from absl import flags, logging

from sora_jax import cli
from sora_jax.common import video_io
from sora_jax.config import geometry, schema
from sora_jax.inference import frame_inputs
from sora_jax.inference import frozen as frozen_lib
from sora_jax.inference import restore, sampling, upscale
from sora_jax.training import checkpoint, factory
from sora_jax.training import state as state_lib


def define_flags():
  """Defined only when run as a program, so the module imports cleanly."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json + checkpoints/).')
  flags.DEFINE_multi_string('prompt', None, 'Text prompt; repeat the flag for several videos.')
  flags.DEFINE_string('output_dir', None, 'Where the mp4 files and samples.json go.')
  flags.DEFINE_integer('seed', 0, 'Noise seed; video i uses fold_in(seed, i).')
  cli.define_sampler_flags()
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint to load (default: latest).')
  flags.DEFINE_bool('use_ema', True, 'Sample with the EMA parameters.')
  flags.DEFINE_integer('batch_size', 16, 'Videos generated per compiled call.')
  flags.DEFINE_string('image', None, 'First frame (image-to-video); any image PyAV reads.')
  flags.DEFINE_string('end_image', None, 'Last frame (with --image: connect the two).')
  flags.DEFINE_string('video', None, 'Input video for --extend or --edit_strength.')
  flags.DEFINE_enum('extend', None, ['forward', 'backward'], 'Continue --video after its end or'
                    ' before its start.')
  flags.DEFINE_float('edit_strength', None, 'SDEdit strength in (0, 1] of --video: noise it to'
                     ' this flow time and denoise under the prompt.')
  flags.DEFINE_integer('num_frames', None, 'Output frames; more than the training clip: sliding'
                       ' windows.')
  flags.DEFINE_string('upscale_workdir', None, 'An upscaler run (config.upscale.factor > 1, e.g.'
                      ' configs/demo_upscale.py) applied to the videos: factor x larger frames.')
  cli.define_noise_flag()
  flags.DEFINE_string('lora', None, 'A Wan LoRA .safetensors (ComfyUI, diffusers/PEFT or musubi'
                      ' layout) merged into the kernels of a Wan-family run. On a LoRA run it adds'
                      ' to the run\'s own adapters (both apply; it does not replace them).')
  flags.DEFINE_float('lora_scale', 1.0, 'Strength of --lora: kernel + lora_scale * alpha / rank *'
                     ' A @ B (0: none, 1: as trained).')
  flags.DEFINE_integer('overlap', None, 'Model frames shared by consecutive windows / taken from'
                       ' --video (default: patch_size[0] * config.condition.max_frames).')


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  f = flags.FLAGS
  # Every input is checked before the checkpoint loads and anything compiles.
  with cli.user_errors():
    config = schema.load_config(f.workdir)
    t_pix = config.data.num_frames
    if config.model.family == 'vae':
      raise ValueError(f'{f.workdir} holds an autoencoder (model.family=vae), not a text-to-video'
                       ' model; use it as --config.autoencoder of a DiT run.')
    if geometry.upscale_enabled(config):
      raise ValueError(f'{f.workdir} is an upscaler (config.upscale.factor > 1): pass it as'
                       ' --upscale_workdir after a base model\'s --workdir.')
    lora = state_lib.read_lora_file(config, f.lora) if f.lora else None
    restore.find_step(f.workdir, f.checkpoint_step)
    options = sampling.settings(config, **cli.flag_values())
    if f.edit_strength is not None and not 0 < f.edit_strength <= 1:
      raise ValueError(f'--edit_strength={f.edit_strength} must be in (0, 1].')
    i2v = factory.wan_i2v(config)
    if i2v:  # Wan 2.1 image-to-video: the image enters through its own channels and CLIP tokens
      if not f.image:
        raise ValueError(f'{f.workdir} is a Wan image-to-video run: pass --image=FILE (the first'
                         ' frame).')
      others = [name for name in ('end_image', 'video', 'extend', 'edit_strength', 'num_frames')
                if getattr(f, name) is not None]
      if others:
        raise ValueError(f'A Wan image-to-video run takes --image only, not --{others[0]}.')
      video_io.read_frames(f.image, config.data.height, config.data.width)  # readable
      clip = given = None
    else:
      clip, _, given = frame_inputs.cli_inputs(
          config, image=f.image, end_image=f.end_image, video=f.video, extend=f.extend,
          edit_strength=f.edit_strength, overlap=f.overlap)
    long = f.num_frames is not None and f.num_frames != t_pix
    if long:
      if f.num_frames < t_pix:
        raise ValueError(f'--num_frames={f.num_frames} is below the training clip of {t_pix}.')
      if not geometry.conditioning_enabled(config):
        raise ValueError('--num_frames beyond the training clip conditions each window on the'
                         ' previous one: this checkpoint was trained without conditioning'
                         ' (config.condition.mix).')
      if f.edit_strength is not None:
        raise ValueError('--edit_strength works on one clip; drop --num_frames.')
      overlap = geometry.resolve_overlap(config, f.overlap)
    upscaler = None
    if f.upscale_workdir:
      upscaler = upscale.Upscaler(f.upscale_workdir, noise=f.upscale_noise)
      upscaler.check_input(f.num_frames or t_pix, config.data.height, config.data.width)
  config, mesh, graphdef, params, step = restore.load(f.workdir, step=f.checkpoint_step,
                                                      use_ema=f.use_ema)
  if lora is not None:
    adapters, rank, alpha = lora
    params = restore.merge_lora(params, adapters, f.lora_scale * alpha / rank)
    logging.info('Merged %s (rank %d, alpha %g) at scale %g.', f.lora, rank, alpha, f.lora_scale)
  logging.info('Sampling %d prompts from step %d (%s).', len(f.prompt), step, options)
  frozen = frozen_lib.Frozen(config, mesh)
  generate = sampling.make_generate(graphdef, config, frozen=frozen,
                                    edit_strength=f.edit_strength, **options)
  video = None
  if clip is not None:
    video = np.asarray(frozen.encode(clip[None]))[0]
  kw = dict(config=config, mesh=mesh, seed=f.seed, batch_size=f.batch_size, frozen=frozen,
            video=video, given=given)
  with jax.set_mesh(mesh):
    if long:
      temporal = geometry.temporal_factor(config)
      model_frames = 1 + -(-(f.num_frames - 1) // temporal) if temporal > 1 else f.num_frames
      direction = 'backward' if f.extend == 'backward' else 'forward'
      videos = sampling.generate_long(generate, params, f.prompt, num_frames=model_frames,
                                      overlap=overlap, direction=direction, **kw)
      videos = videos[:, :f.num_frames] if direction == 'forward' else videos[:, -f.num_frames:]
    else:
      videos = sampling.generate_videos(generate, params, f.prompt, **kw,
                                        **({'image': f.image} if i2v else {}))
  if upscaler is not None:
    videos = upscaler(videos, f.prompt, seed=f.seed, batch_size=f.batch_size)
  if jax.process_index() == 0:
    samples = video_io.write_videos(videos, f.prompt, f.output_dir, fps=config.data.fps)
    for s in samples:
      print(s['path'])


if __name__ == '__main__':
  cli.run(main, define_flags, required=['workdir', 'prompt', 'output_dir'])

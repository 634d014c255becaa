"""The one training-config schema: defaults for every key, and validation.

Config files in `configs/` start from `base_config()` and override what they tune, so every key that
exists anywhere exists here, with a default and a type. `validate()` runs before anything is compiled and
names the offending key in its message.
"""

import json
import math
import os

import ml_collections

from data_pipelines import buckets


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16  # global, across all hosts
  c.total_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.sample_every_steps = 0  # 0: only at the end of training
  # Start a fresh run from these weights: a diffusers WanTransformer3DModel folder (model.family='wan')
  # or another sora_jax workdir of the same architecture (its latest checkpoint's EMA parameters).
  c.init_from = ''
  # Diffuse in the latent space of this frozen video autoencoder (empty: pixels): a sora_jax workdir
  # trained with model.family='vae', or a diffusers AutoencoderKLWan folder.
  c.autoencoder = ''
  c.num_train_samples = 4  # videos written by periodic sampling
  c.peak_tflops_per_device = 0.0  # for the logged MFU; 0: from the device kind (unknown on CPU)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.context = 1  # sequence sharding; self-attention then runs per model.context_parallel
  # Multi-slice TPU pods / multi-host GPU: how many of data's / fsdp's devices are in different slices
  # (data-centre network); the rest of each axis stays inside a slice. Must divide mesh.data / fsdp.
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1

  c.data = ml_collections.ConfigDict()
  # Source: the built-in captioned shapes generator, unless one of these three is set.
  c.data.manifest = ''  # CSV/JSONL of captioned videos and images, decoded on the fly
  c.data.prepared = ''  # folder written by `python -m data_pipelines.prepare` (ArrayRecord shards)
  c.data.tfds_name = ''  # a dataset built by data_pipelines/tfds_builder.py, e.g. captioned_videos/x
  c.data.tfds_data_dir = ''
  c.data.num_frames = 12  # clip shape of the shapes data, of samples, and the default bucket
  c.data.height = 32
  c.data.width = 32
  c.data.fps = 8  # clips are sampled at this frame rate; sample videos are written at it
  c.data.bounce = 0.0  # shapes data: fraction of clips whose object bounces once off a frame edge
  c.data.stop = 0.0  # shapes data: fraction of clips whose object stops against the edge ahead
  c.data.rest = 0.0  # shapes data: fraction of clips within a short run of that edge or resting there
  # (frames, height, width) buckets, e.g. ((16, 64, 64), (16, 48, 80), (1, 64, 64)); empty: one bucket
  # (num_frames, height, width). 1-frame buckets hold images.
  c.data.buckets = ()
  c.data.tokens_per_batch = 0  # per-bucket global batch = this // tokens per clip (0: batch_size)
  c.data.random_crop = True  # else centre crop
  c.data.max_skip_fraction = 0.1  # more skipped examples than this is an error, not a dataset
  c.data.probe_threads = 8  # threads probing a manifest's files at start-up
  # Sequence packing (NaViT-style, data_pipelines/packing.py): several clips of any shape share one
  # fixed-length token sequence, each attending only to itself; batch_size then counts sequences.
  # Off (default, and configs/demo.py): one clip per row, batches bucketed by shape.
  c.data.packing = False
  c.data.packing_length = 0  # tokens per packed sequence (0: the largest bucket's token count)
  c.data.packing_segments = 4  # at most this many clips (and captions) per sequence
  c.data.packing_bins = 0  # sequences the first-fit packer fills at once (0: the per-process batch)
  c.data.worker_count = 0  # Grain worker processes (0: in the main process)
  c.data.prefetch_buffer_size = 2  # batches buffered per worker process
  c.data.read_threads = 2  # threads loading ahead in each process (decoding releases the GIL)

  c.text = ml_collections.ConfigDict()
  c.text.encoder = 'bytes'  # 'bytes': small byte-level encoder trained with the model; 'umt5': frozen
  c.text.path = ''  # umt5: a Hugging Face UMT5EncoderModel folder (or a Wan diffusers folder)
  c.text.max_length = 48  # tokens, including BOS/EOS
  c.text.width = 128
  c.text.depth = 2
  c.text.num_heads = 4
  c.text.word_buckets = 1024  # hashed word embeddings added to bytes (0: bytes only)
  c.text.dropout_prob = 0.1  # caption dropout for classifier-free guidance

  c.model = ml_collections.ConfigDict()
  # 'dit': sora_jax's DiT (below); 'wan': the Wan 2.1 architecture (model.wan); 'vae': the causal
  # video autoencoder (config.vae), trained alone on reconstruction.
  c.model.family = 'dit'
  c.model.patch_size = (2, 4, 4)  # (t, h, w)
  c.model.width = 256
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.rope_theta = 256.0
  c.model.dtype = 'float32'  # compute dtype; parameters are always float32
  c.model.scan_layers = True
  c.model.remat = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs)
  # Self-attention kernel (sora_jax/models/attention.py): auto | xla | cudnn | splash | chunked.
  # auto: cuDNN flash on GPU, Pallas splash on TPU, else xla for short and chunked for long sequences.
  c.model.attention = 'auto'
  # With mesh.context > 1: 'ring' (K/V blocks rotate with ppermute), 'all_to_all' (Ulysses: sequence
  # <-> heads), or '' (let GSPMD partition the attention).
  c.model.context_parallel = 'ring'

  # model.family='wan': diffusers WanTransformer3DModel fields (patch: model.patch_size; text_dim: the
  # text encoder's width; channels: 3 or the autoencoder's latent channels). Wan 2.1 T2V 1.3B below.
  c.model.wan = ml_collections.ConfigDict()
  c.model.wan.num_attention_heads = 12
  c.model.wan.attention_head_dim = 128
  c.model.wan.ffn_dim = 8960
  c.model.wan.num_layers = 30
  c.model.wan.freq_dim = 256
  c.model.wan.cross_attn_norm = True
  c.model.wan.eps = 1e-6
  c.model.wan.rope_max_seq_len = 1024

  # model.family='vae' (and what a sora_jax autoencoder workdir holds): the Wan-VAE architecture.
  c.vae = ml_collections.ConfigDict()
  c.vae.base_dim = 96
  c.vae.z_dim = 16
  c.vae.dim_mult = (1, 2, 4, 4)
  c.vae.num_res_blocks = 2
  c.vae.attn_scales = ()
  c.vae.temperal_downsample = (False, True, True)  # (sic) diffusers' spelling
  c.vae.dropout = 0.0
  c.vae.l1_weight = 1.0  # reconstruction + KL training loss
  c.vae.l2_weight = 0.0
  c.vae.kl_weight = 1e-6

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.prediction = 'velocity'  # what the DiT outputs: 'velocity' or 'x0' (loss is on velocity)
  c.diffusion.logit_mean = 0.0  # logit-normal timestep sampling
  c.diffusion.logit_std = 1.0
  c.diffusion.shift = 1.0  # timestep shift at `shift_base_tokens` tokens
  c.diffusion.shift_base_tokens = 384  # shift grows as sqrt(tokens / base)
  c.diffusion.frame_noise_prob = 0.0  # fraction of clips trained with a flow time per frame
  c.diffusion.loss_t_floor = 0.0  # velocity-loss weight min(1, (t / floor)^2); 0 = unweighted

  # Conditioning on given frames (sora_jax/conditioning.py): image-to-video, extension, connecting
  # clips. mix: (pattern, probability) pairs drawn per training clip, patterns none | first | first_k
  # | last_k | first_last; only 'none' (default): no mask input channel, plain text-to-video.
  # max_frames: k of the *_k patterns is uniform in [1, max_frames] temporal patches.
  c.condition = ml_collections.ConfigDict()
  c.condition.mix = (('none', 1.0),)
  c.condition.max_frames = 1
  # Given frames at a small flow time instead of 0: training draws it uniformly in [0, context_noise]
  # per clip, sampling uses sample_context_noise, so long videos re-render (not copy) the previous
  # window's artifacts. 0: clean given frames.
  c.condition.context_noise = 0.0
  c.condition.sample_context_noise = 0.0

  # Cascaded super-resolution (sora_jax/upscale.py): factor > 1 makes this run an upscaler that sees
  # its clips downsampled by `factor` and re-upsampled as extra input channels; noise_aug: the
  # low-resolution input is noised to a flow time ~ U(0, noise_aug) in training, sample_noise when
  # sampling (so the base model's artifacts are not copied). configs/demo_upscale.py.
  c.upscale = ml_collections.ConfigDict()
  c.upscale.factor = 1
  c.upscale.noise_aug = 0.15
  c.upscale.sample_noise = 0.05
  c.upscale.residual = True  # x0 = clean upsampled input + the model's output (needs x0 prediction)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 100
  c.optim.end_lr_fraction = 0.1  # cosine decays to this fraction of the peak
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.ema_decay = 0.999

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 30
  c.sample.guidance_scale = 4.0
  c.sample.sampler = 'euler'  # 'euler' | 'heun' | 'dpm++2m' (sora_jax/diffusion/samplers.py)
  c.sample.negative_prompt = ''  # the unconditional half of CFG sees this caption
  c.sample.guidance_schedule = 'constant'  # 'constant' | 'linear' | 'interval'
  c.sample.guidance_interval = (0.0, 1.0)  # flow-time interval for 'interval'

  c.eval = ml_collections.ConfigDict()
  c.eval.num_videos = 64  # for the held-out flow-matching loss
  c.eval.num_timesteps = 8  # fixed timestep grid
  c.eval.samples_per_prompt = 1  # prompt-adherence samples
  c.eval.batch_size = 32
  return c


def _unknown_keys(cfg, ref, prefix=''):
  for key in cfg.keys():
    name = prefix + key
    if key not in ref:
      yield name
    elif isinstance(cfg[key], ml_collections.ConfigDict):
      if not isinstance(ref[key], ml_collections.ConfigDict):
        yield name
      else:
        yield from _unknown_keys(cfg[key], ref[key], name + '.')


def resolve_mesh_shape(config, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with the (at most one) -1 filled in."""
  axes = {a: int(config.mesh[a]) for a in ('data', 'fsdp', 'tensor', 'context')}
  for a, n in axes.items():
    if n == 0 or n < -1:
      raise ValueError(f'config.mesh.{a}={n}: axis sizes are positive or -1.')
  for a in ('data', 'fsdp'):
    dcn = int(config.mesh.get(f'dcn_{a}', 1))
    if dcn < 1:
      raise ValueError(f'config.mesh.dcn_{a}={dcn} must be >= 1.')
  free = [a for a, n in axes.items() if n == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free}.')
  fixed = math.prod(n for n in axes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh: {num_devices} devices are not divisible by the fixed axes'
          f' {dict((a, n) for a, n in axes.items() if n != -1)} (product {fixed}).')
    axes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh: data*fsdp*tensor*context = {fixed} but there are {num_devices} devices.')
  for a in ('data', 'fsdp'):
    dcn = int(config.mesh.get(f'dcn_{a}', 1))
    if axes[a] % dcn:
      raise ValueError(f'config.mesh.dcn_{a}={dcn} does not divide mesh.{a}={axes[a]}.')
  return axes


def dcn_shape(config) -> dict[str, int]:
  return {a: int(config.mesh.get(f'dcn_{a}', 1)) for a in ('data', 'fsdp')}


def _check_data(config):
  d = config.data
  sources = [k for k in ('manifest', 'prepared', 'tfds_name') if d[k]]
  if len(sources) > 1:
    raise ValueError(f'config.data: set at most one of manifest, prepared, tfds_name; got {sources}.')
  if d.manifest and not os.path.isfile(d.manifest):
    raise ValueError(f'config.data.manifest={d.manifest!r} is not a file.')
  if d.prepared and not os.path.isfile(os.path.join(d.prepared, 'index.json')):
    raise ValueError(f'config.data.prepared={d.prepared!r} holds no index.json: run'
                     ' `python -m data_pipelines.prepare` first.')
  if not 0.0 <= d.max_skip_fraction <= 1.0:
    raise ValueError(f'config.data.max_skip_fraction={d.max_skip_fraction} not in [0, 1].')
  if d.read_threads < 1:
    raise ValueError(f'config.data.read_threads={d.read_threads} must be >= 1.')
  if d.fps <= 0:
    raise ValueError(f'config.data.fps={d.fps} must be positive.')
  for name in ('bounce', 'stop', 'rest'):
    if not 0.0 <= d[name] <= 1.0:
      raise ValueError(f'config.data.{name}={d[name]} not in [0, 1].')
  if d.bounce + d.stop + d.rest > 1.0:
    raise ValueError('config.data.bounce + config.data.stop + config.data.rest ='
                     f' {d.bounce + d.stop + d.rest:g} exceeds 1.')
  errors = buckets.check(config)
  if errors:
    raise ValueError(' '.join(errors))


def _check_packing(config):
  d = config.data
  if not isinstance(d.packing, bool):
    raise ValueError(f'config.data.packing={d.packing!r} must be True or False.')
  for key, low in (('packing_length', 0), ('packing_segments', 1), ('packing_bins', 0)):
    if not isinstance(d[key], int) or d[key] < low:
      raise ValueError(f'config.data.{key}={d[key]!r} must be an int >= {low}.')
  if not d.packing:
    return
  patch = tuple(config.model.patch_size)
  longest = max(buckets.shapes(config), key=lambda s: buckets.tokens(s, patch))
  if d.packing_length and d.packing_length < buckets.tokens(longest, patch):
    raise ValueError(
        f'config.data.packing_length={d.packing_length} cannot hold a clip of {longest}'
        f' ({buckets.tokens(longest, patch)} tokens with config.model.patch_size={patch}).')


FAMILIES = ('dit', 'wan', 'vae')


def autoencoder_geometry(path: str) -> dict:
  """{'temporal', 'spatial', 'z_dim'} of the autoencoder at `path` (a sora_jax 'vae' workdir or a
  diffusers AutoencoderKLWan folder), read from its config.json; both use the diffusers field names."""
  for sub in ('', 'vae'):
    cfg_path = os.path.join(path, sub, 'config.json')
    if os.path.isfile(cfg_path):
      break
  else:
    raise ValueError(f'config.autoencoder={path!r}: no config.json there (nor in vae/).')
  with open(cfg_path) as f:
    cfg = json.load(f)
  if 'model' in cfg:  # a sora_jax workdir: its config.json is the training config
    if cfg['model'].get('family') != 'vae':
      raise ValueError(f'config.autoencoder={path!r} is a sora_jax workdir of model.family='
                       f'{cfg["model"].get("family")!r}, not a "vae" run.')
    cfg = cfg['vae']
  try:
    return dict(temporal=2 ** sum(bool(x) for x in cfg['temperal_downsample']),
                spatial=2 ** (len(cfg['dim_mult']) - 1), z_dim=int(cfg['z_dim']))
  except KeyError as e:
    raise ValueError(f'config.autoencoder={path!r}: {cfg_path} lacks {e}; is it a video VAE?')


def latent_shape(clip, geometry) -> tuple[int, int, int]:
  t, h, w = clip
  return (1 + (t - 1) // geometry['temporal'], h // geometry['spatial'], w // geometry['spatial'])


def model_clip_shape(config) -> tuple[int, int, int]:
  """(frames, height, width) the diffusion model sees for the default clip: pixels, or latents."""
  clip = (config.data.num_frames, config.data.height, config.data.width)
  return latent_shape(clip, autoencoder_geometry(config.autoencoder)) if config.autoencoder else clip


def _check_causal_clip(config, temporal, spatial, what):
  """A causal autoencoder encodes the first frame alone, then groups of `temporal` frames."""
  for t, h, w in buckets.shapes(config):
    if (t - 1) % temporal or h % spatial or w % spatial:
      key = 'config.data.buckets' if config.data.buckets else (
          'config.data.num_frames' if (t - 1) % temporal else 'config.data.height/width')
      raise ValueError(
          f'{key}: clip {(t, h, w)} does not fit {what} ({temporal}x temporal, {spatial}x spatial'
          f' compression): frames must be 1 + {temporal}k (e.g. {1 + temporal * max(1, t // temporal)})'
          f' and height/width multiples of {spatial}.')


def _check_vae(config):
  v = config.vae
  if v.z_dim <= 0 or v.base_dim <= 0 or v.num_res_blocks <= 0 or not v.dim_mult:
    raise ValueError('config.vae: z_dim, base_dim, num_res_blocks must be positive and dim_mult'
                     ' non-empty.')
  if len(v.temperal_downsample) != len(v.dim_mult) - 1:
    raise ValueError(f'config.vae.temperal_downsample={tuple(v.temperal_downsample)} needs'
                     f' len(config.vae.dim_mult) - 1 = {len(v.dim_mult) - 1} entries.')
  if config.autoencoder:
    raise ValueError('config.autoencoder must be empty when training an autoencoder'
                     ' (model.family="vae").')
  for key in ('l1_weight', 'l2_weight', 'kl_weight'):
    if v[key] < 0:
      raise ValueError(f'config.vae.{key}={v[key]} must be >= 0.')
  _check_causal_clip(config, 2 ** sum(bool(x) for x in v.temperal_downsample),
                     2 ** (len(v.dim_mult) - 1), 'config.vae')


def _check_transformer(config, mesh):
  m = config.model
  patch = tuple(m.patch_size)
  if len(patch) != 3 or any(p <= 0 for p in patch):
    raise ValueError(f'config.model.patch_size={patch} must be three positive ints (t, h, w).')
  clips = buckets.shapes(config)
  geometry = None
  if config.autoencoder:
    geometry = autoencoder_geometry(config.autoencoder)
    _check_causal_clip(config, geometry['temporal'], geometry['spatial'],
                       f'config.autoencoder={config.autoencoder!r}')
  for clip in clips:
    where = f'the clip {clip}'
    if geometry:
      clip = latent_shape(clip, geometry)
      where = f'the latent clip {clip}'
    for name, n, p in zip(('num_frames', 'height', 'width'), clip, patch):
      if n % p:
        key = 'config.data.buckets' if config.data.buckets else f'config.data.{name}'
        raise ValueError(
            f'config.model.patch_size={patch} does not divide {where}: {key}={n if not geometry else clip}'
            f' gives {name} {n}, not a multiple of {p}.')
  if mesh['context'] > 1:
    for clip in clips:
      shape = latent_shape(clip, geometry) if geometry else clip
      tokens = math.prod(n // p for n, p in zip(shape, patch))
      if tokens % mesh['context']:
        raise ValueError(f'config.mesh.context={mesh["context"]} does not divide the {tokens} tokens'
                         f' of clip {clip}: the token sequence is split evenly over it.')
  _check_packing(config)
  if config.data.packing and (m.family != 'dit' or config.autoencoder or
                              config.text.encoder != 'bytes'):
    raise ValueError('config.data.packing=True works with model.family="dit" on pixels with the byte'
                     ' text encoder only (packed latents / frozen-encoder captions are not'
                     ' implemented); set config.data.packing=False.')
  if m.family == 'wan':
    w = m.wan
    width, heads, head_dim = w.num_attention_heads * w.attention_head_dim, w.num_attention_heads, \
        w.attention_head_dim
    if head_dim % 2 or head_dim < 6:
      raise ValueError(f'config.model.wan.attention_head_dim={head_dim} must be even and >= 6.')
  else:
    width, heads = m.width, m.num_heads
    if m.width % m.num_heads or (m.width // m.num_heads) % 2 or m.width // m.num_heads < 6:
      raise ValueError(
          f'config.model.width={m.width} / num_heads={m.num_heads} must give an even head dim'
          ' of at least 6 (3D RoPE rotates pairs on each of the t, h, w axes).')
  if width % mesh['tensor'] or heads % mesh['tensor']:
    raise ValueError(
        f'config.model width {width} and {heads} heads must be divisible by'
        f' config.mesh.tensor={mesh["tensor"]}.')


def validate(config, num_devices: int) -> dict[str, int]:
  """Rejects bad configs before compilation; returns the resolved mesh shape."""
  unknown = list(_unknown_keys(config, base_config()))
  if unknown:
    raise ValueError(f'Unknown config key(s): {", ".join("config." + k for k in unknown)}.')
  mesh = resolve_mesh_shape(config, num_devices)
  for key in ('batch_size', 'total_steps', 'log_every_steps', 'checkpoint_every_steps',
              'keep_checkpoints'):
    if int(config[key]) <= 0:
      raise ValueError(f'config.{key}={config[key]} must be positive.')
  batch_shards = mesh['data'] * mesh['fsdp']
  if config.batch_size % batch_shards:
    raise ValueError(
        f'config.batch_size={config.batch_size} is not divisible by the data-parallel size'
        f' mesh.data*mesh.fsdp={batch_shards}.')
  _check_data(config)
  m = config.model
  if m.family not in FAMILIES:
    raise ValueError(f'config.model.family={m.family!r}: expected one of {", ".join(FAMILIES)}.')
  if m.family == 'vae':
    _check_vae(config)
  else:
    _check_transformer(config, mesh)
  from sora_jax.models import attention  # pylint: disable=g-import-not-at-top
  if m.attention not in attention.IMPLS:
    raise ValueError(f'config.model.attention={m.attention!r}: expected one of'
                     f' {", ".join(attention.IMPLS)}.')
  if m.context_parallel not in ('', 'ring', 'all_to_all'):
    raise ValueError(f'config.model.context_parallel={m.context_parallel!r}: expected ring,'
                     ' all_to_all or "".')
  if m.remat not in ('none', 'full', 'dots'):
    raise ValueError(f'config.model.remat={m.remat!r}: expected none, full or dots.')
  if m.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f'config.model.dtype={m.dtype!r}: expected float32 or bfloat16.')
  if config.diffusion.prediction not in ('velocity', 'x0'):
    raise ValueError(f'config.diffusion.prediction={config.diffusion.prediction!r}: expected'
                     ' velocity or x0.')
  if not 0.0 <= config.diffusion.loss_t_floor < 1.0:
    raise ValueError(f'config.diffusion.loss_t_floor={config.diffusion.loss_t_floor} not in [0, 1).')
  if not 0.0 <= config.diffusion.frame_noise_prob <= 1.0:
    raise ValueError(f'config.diffusion.frame_noise_prob={config.diffusion.frame_noise_prob} not in'
                     ' [0, 1].')
  from sora_jax import upscale  # pylint: disable=g-import-not-at-top
  upscale.check(config)
  if m.family != 'vae':
    from sora_jax import conditioning  # pylint: disable=g-import-not-at-top
    geometry = autoencoder_geometry(config.autoencoder) if config.autoencoder else None
    conditioning.check(config, [latent_shape(s, geometry)[0] if geometry else s[0]
                                for s in buckets.shapes(config)])
  if config.text.encoder not in ('bytes', 'umt5'):
    raise ValueError(f'config.text.encoder={config.text.encoder!r}: expected bytes or umt5.')
  if config.text.encoder == 'umt5' and not os.path.isdir(config.text.path):
    raise ValueError(f'config.text.path={config.text.path!r} is not a folder: text.encoder=umt5 needs'
                     ' a Hugging Face UMT5EncoderModel folder.')
  if config.init_from and not os.path.isdir(config.init_from):
    raise ValueError(f'config.init_from={config.init_from!r} is not a folder.')
  if config.text.width % config.text.num_heads:
    raise ValueError(f'config.text.width must be divisible by config.text.num_heads.')
  if config.text.word_buckets < 0:
    raise ValueError(f'config.text.word_buckets={config.text.word_buckets} must be >= 0.')
  if not 0.0 <= config.text.dropout_prob < 1.0:
    raise ValueError(f'config.text.dropout_prob={config.text.dropout_prob} not in [0, 1).')
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f'config.optim.ema_decay={config.optim.ema_decay} not in [0, 1).')
  if config.optim.warmup_steps > config.total_steps:
    raise ValueError(
        f'config.optim.warmup_steps={config.optim.warmup_steps} exceeds'
        f' config.total_steps={config.total_steps}.')
  return mesh

"""The one training-config schema: every key with its default, the values some keys allow, and
reading a run's saved config.json.

Config files in `configs/` start from `base_config()` and override what they tune, so every key that
exists anywhere exists here, with a default and a type. Validation: config/validation.py.
"""

import importlib.util
import json
import os

import ml_collections

# The values some keys allow (validation.py checks them; models and kernels name them too).
FAMILIES = ('dit', 'wan', 'vae')  # config.model.family
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'splash', 'chunked')  # config.model.attention
CONDITION_PATTERNS = ('none', 'first', 'first_k', 'last_k', 'first_last')  # config.condition.mix


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 16  # global, across all hosts
  c.total_steps = 1000
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  # Failed checkpoint saves (disk full, no permission) in a row before the run stops; a failed save
  # is logged and tried again at the next checkpoint step.
  c.max_failed_saves = 3
  c.sample_every_steps = 0  # 0: only at the end of training
  # Start a fresh run from these weights: a diffusers WanTransformer3DModel folder (model.family='wan')
  # or another sora_jax workdir of the same architecture (its latest checkpoint's EMA parameters).
  c.init_from = ''
  # Diffuse in the latent space of this frozen video autoencoder (empty: pixels): a sora_jax workdir
  # trained with model.family='vae', or a diffusers AutoencoderKLWan folder.
  c.autoencoder = ''
  # Wan 2.1 image-to-video (model.wan.image_dim > 0): the frozen CLIP image encoder, a folder holding
  # image_encoder/ and image_processor/ (a diffusers WanImageToVideoPipeline folder).
  c.image_encoder = ''
  c.num_train_samples = 4  # videos written by periodic sampling (not config.sample.prompts: all)
  c.peak_tflops_per_device = 0.0  # for the logged MFU; 0: from the device kind (unknown on CPU)
  # XLA's persistent compilation cache (restarts, resumes and other hosts load compiled programs
  # instead of compiling again); '' turns it off.
  c.compilation_cache_dir = '~/.cache/sora_jax/xla'

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
  c.data.prepared = ''  # folder written by `python -m sora_jax.prepare` (ArrayRecord shards)
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
  c.data.tokens_per_batch = 0  # per-bucket global batch = this // model tokens per clip (0: batch_size)
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
  # Self-attention kernel (sora_jax/parallel/attention.py): auto | xla | cudnn | splash | chunked.
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
  # 0: text-to-video. Wan 2.1 I2V: the CLIP feature width (1280); the input is then the noisy
  # latents, a 4-channel first-frame mask and the first frame's latents (config.image_encoder).
  c.model.wan.image_dim = 0
  # Wan 2.2 I2V-A14B: that first-frame input (2C + 4 channels) without CLIP tokens (image_dim 0).
  c.model.wan.image_condition = False
  # Wan 2.2 A14B (two experts switched by timestep; configs/wan2_2_a14b.py): the pipeline's
  # boundary_ratio (0: one transformer) and the expert this run trains, 'high_noise' (flow times
  # t >= boundary_ratio, transformer/) or 'low_noise' (t < boundary_ratio, transformer_2/). One per
  # run: both 14B experts with their optimizer states would double the state, and upstream trains
  # them separately. Sampling runs the other one from config.init_from's folder.
  c.model.wan.boundary_ratio = 0.0
  c.model.wan.expert = ''
  # Wan 2.2 TI2V-5B (configs/wan2_2_ti2v_5b.py; diffusers' expand_timesteps): image-to-video through
  # given frames (config.condition.mix) carried by a per-frame timestep of 0 alone (no mask channel,
  # no CLIP), in the Wan 2.2 VAE's latents.
  c.model.wan.expand_timesteps = False

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

  # Conditioning on given frames (sora_jax/diffusion/given_frames.py): image-to-video, extension, connecting
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

  # Cascaded super-resolution (sora_jax/inference/upscale.py): factor > 1 makes this run an upscaler that sees
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
  # Steps with a non-finite loss or gradient norm change no weights; this many in a row stop the run.
  c.optim.max_nonfinite_steps = 10
  # Adam's first moment in this dtype ('': the parameters', float32); 'bfloat16' saves 2 bytes per
  # parameter (what lets Wan 14B train at 720p on 4 v5p chips).
  c.optim.mu_dtype = ''

  # LoRA fine-tuning (sora_jax/models/lora.py): rank 0 trains every parameter. With rank > 0 the
  # base (config.init_from: a Wan folder or a sora_jax workdir) is frozen and only adapters on the
  # linear layers matching `targets` train; optimizer state, EMA and checkpoints hold adapters only.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 0.0  # scale = alpha / rank; 0: alpha = rank (scale 1)
  c.lora.targets = r'blocks/(attn1|attn2|self_attn|cross_attn|ffn|mlp)/[^/]+$'  # module paths (re)
  c.lora.dropout = 0.0
  c.lora.base_dtype = ''  # the frozen base's dtype ('': as trained, float32); 'bfloat16' halves it
  c.lora.init_from = ''  # start the adapters from a LoRA file (ComfyUI, diffusers/PEFT or musubi)

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 30
  c.sample.guidance_scale = 4.0
  # Wan 2.2 A14B: the low-noise expert's CFG scale (diffusers' guidance_scale_2; 0: guidance_scale).
  c.sample.guidance_scale_2 = 0.0
  c.sample.sampler = 'euler'  # 'euler' | 'heun' | 'dpm++2m' (sora_jax/diffusion/samplers.py)
  c.sample.negative_prompt = ''  # the unconditional half of CFG sees this caption
  c.sample.prompts = ()  # training previews; empty: shapes prompts, or the data's first captions
  # Training previews stop after the batch during which this many seconds ran out (0: no limit),
  # on every process alike, with a warning saying how many videos were made.
  c.sample.max_seconds = 0.0
  c.sample.guidance_schedule = 'constant'  # 'constant' | 'linear' | 'interval' | 'hat'
  c.sample.guidance_interval = (0.0, 1.0)  # flow-time interval for 'interval'

  c.eval = ml_collections.ConfigDict()
  c.eval.num_videos = 64  # for the held-out flow-matching loss
  c.eval.num_timesteps = 8  # fixed timestep grid
  c.eval.samples_per_prompt = 1  # prompt-adherence samples
  c.eval.batch_size = 32
  return c


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir!r} a training workdir?')
  with open(path) as f:
    saved = json.load(f)
  # On top of today's defaults, so runs saved before a key existed still load (with its default).
  config = base_config()
  _merge(config, saved)
  config.model.patch_size = tuple(config.model.patch_size)
  return config


def _merge(config, saved: dict):
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      with config.ignore_type():
        config[key] = value


# The repository's demo config: the default of the data tools' --config, from any working directory
# (the README installs the checkout in place).
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CONFIG = os.path.join(_REPOSITORY, 'configs', 'demo.py')


def config_file(beside: str, name: str):
  """The config module `name` (e.g. 'demo.py') in the folder of the file `beside`: config files build
  on one another by path, so they load from any working directory (configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(beside)), name)
  spec = importlib.util.spec_from_file_location(f'sora_jax_configs.{name[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

"""transformers `CLIPVisionModel` folders -> sora_jax.models.clip_vision, and CLIPImageProcessor's
preprocessing in numpy (no torch).

Accepted folders: config.json (model_type 'clip_vision_model') + model.safetensors, or shards listed by
model.safetensors.index.json; or a Wan I2V pipeline folder, whose image_encoder/ holds them (and
image_processor/ the preprocessor_config.json). float32, bfloat16 and float16 files load. Every tensor
must be consumed (a CLIPVisionModelWithProjection's visual_projection is skipped by name: Wan does not
use it) and every parameter assigned, or the error lists the missing / unexpected names.

  encoder = load_clip_vision_encoder('Wan2.1-I2V-14B-480P-Diffusers')
  embeds = encoder.encode_images(images)   # uint8 [H, W, 3] images -> [B, 257, 1280]: Wan's image_embeds
  pixels = encoder.processor(images)       # CLIPImageProcessor's pixel_values, channels-last
  embeds = encoder(pixels)                 # hidden_states[-2] of CLIPVisionModel(pixels)

Preprocessing (`CLIPImageProcessor`): resize so the shortest side is `size` (bicubic, antialiased,
on the uint8 pixels with integer arithmetic), center crop to `crop_size`, then (x / 255 - mean) / std.
Its resampling is transformers' default (torchvision) backend's, bit for bit: torch's uint8
antialiased bicubic (int16 weights at a per-axis precision, width pass then height pass). Without
torchvision installed, transformers falls back to a Pillow-based processor, whose resampling gives
under 1% of the pixels one or two levels apart (pixel_values about 2e-3 relative L2 apart).
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.interop import safetensors_io
from sora_jax.models import clip_vision
from sora_jax.parallel import sharding

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
PREPROCESSOR_NAME = 'preprocessor_config.json'
ENCODER_SUBFOLDER = 'image_encoder'       # Wan I2V pipeline layout
PROCESSOR_SUBFOLDER = 'image_processor'
MODEL_TYPE = 'clip_vision_model'
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(clip_vision.CLIPVisionConfig))
# Fields of transformers' CLIPVisionConfig / PretrainedConfig that do not change the vision tower's
# forward pass (projection_dim: CLIPVisionModelWithProjection's head, skipped; dropouts: eval only).
# Anything else, e.g. a quantization_config, is an error.
IGNORED_FIELDS = frozenset("""
    _attn_implementation _attn_implementation_autoset _commit_hash _name_or_path add_cross_attention
    architectures attention_dropout bad_words_ids begin_suppress_tokens bos_token_id
    chunk_size_feed_forward cross_attention_hidden_size decoder_start_token_id diversity_penalty
    do_sample dropout dtype early_stopping encoder_no_repeat_ngram_size eos_token_id
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id
    gradient_checkpointing id2label initializer_factor initializer_range is_decoder
    is_encoder_decoder label2id length_penalty max_length min_length model_type
    no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions
    output_hidden_states output_scores pad_token_id prefix problem_type projection_dim pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id
    suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder
    tie_word_embeddings tokenizer_class top_k top_p torch_dtype torchscript transformers_version
    typical_p use_bfloat16 use_cache
""".split())
# transformers 4.x saves the tower under 'vision_model.'; 5.x loads (and may save) it without.
KEY_PREFIX = 'vision_model.'
# Tensors a checkpoint may hold that the tower does not use: CLIPVisionModelWithProjection's head,
# and the position-id buffer older transformers saved.
SKIPPED_KEYS = ('visual_projection.weight', 'embeddings.position_ids')


# --------------------------------------------------------------------------- folders and config


def _model_index(path):
  index = os.path.join(path, 'model_index.json')
  if os.path.isfile(index):
    with open(index) as f:
      return json.load(f)
  return None


def encoder_dir(path) -> str:
  """The folder holding the CLIP config.json: `path` itself or `path/image_encoder`."""
  path = os.fspath(path)
  for folder in (path, os.path.join(path, ENCODER_SUBFOLDER)):
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
      return folder
  index = _model_index(path)
  if index is not None and not index.get(ENCODER_SUBFOLDER, [None])[0]:
    raise FileNotFoundError(
        f'{path!r} is a {index.get("_class_name", "diffusers")} folder without an image encoder: a '
        'text-to-video Wan pipeline (or a Wan 2.2 one, which conditions on the image latents '
        'only). The CLIP image encoder comes with Wan 2.1 image-to-video pipelines, e.g. '
        'Wan2.1-I2V-14B-480P-Diffusers/image_encoder.')
  raise FileNotFoundError(
      f'No CLIP image encoder at {path!r}: expected {CONFIG_NAME} there or in '
      f'{os.path.join(path, ENCODER_SUBFOLDER)!r} (a transformers CLIPVisionModel folder)')


def config_from_hf(d: dict) -> clip_vision.CLIPVisionConfig:
  """A transformers config.json dict -> CLIPVisionConfig (strict: unknown fields are an error)."""
  model_type = d.get('model_type')
  if model_type != MODEL_TYPE:
    hint = ''
    if model_type == 'clip':
      hint = (' This is a full CLIPModel (text and vision towers); pass a CLIPVisionModel folder '
              '(e.g. a Wan I2V pipeline\'s image_encoder/).')
    elif model_type is None and '_class_name' in d:
      hint = f' This is a diffusers {d["_class_name"]} config, not a transformers CLIP one.'
    raise ValueError(f'config.json model_type={model_type!r}: expected {MODEL_TYPE!r} (a '
                     f'transformers CLIPVisionModel).{hint}')
  unknown = sorted(set(d) - set(CONFIG_FIELDS) - IGNORED_FIELDS)
  if unknown:
    raise ValueError(f'config.json has fields the CLIP vision tower does not know: {unknown}. If '
                     'they do not change the forward pass, add them to IGNORED_FIELDS.')
  return clip_vision.CLIPVisionConfig(**{k: d[k] for k in CONFIG_FIELDS if k in d})


def load_clip_vision_config(path) -> clip_vision.CLIPVisionConfig:
  with open(os.path.join(encoder_dir(path), CONFIG_NAME)) as f:
    return config_from_hf(json.load(f))


# --------------------------------------------------------------------------- name table


def _linear_kernel(w):  # torch Linear weight [out, in] -> kernel [in, out]
  return w.T


def _conv_kernel(w):
  """Conv2d weight [D, C, p, p] -> linear kernel [(p, p, C), D], the patch feature order of
  CLIPVisionModel.embed."""
  return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _same(w):
  return w


def param_table(cfg: clip_vision.CLIPVisionConfig) -> dict:
  """Our parameter path -> (the checkpoint keys feeding it, without 'vision_model.', transform).
  Layer parameters list one key per layer (stacked on the leading 'layers' axis)."""
  table = {
      ('patch_embedding', 'kernel'): (['embeddings.patch_embedding.weight'], _conv_kernel),
      ('class_embedding',): (['embeddings.class_embedding'], _same),
      ('position_embedding',): (['embeddings.position_embedding.weight'], _same),
  }
  layers = [f'encoder.layers.{i}.' for i in range(cfg.num_hidden_layers)]
  for ours, theirs in (('pre_layrnorm', 'pre_layrnorm'), ('post_layernorm', 'post_layernorm')):
    table[(ours, 'scale')] = ([f'{theirs}.weight'], _same)
    table[(ours, 'bias')] = ([f'{theirs}.bias'], _same)
  for ours, theirs in (('layer_norm1', 'layer_norm1'), ('layer_norm2', 'layer_norm2')):
    table[('layers', ours, 'scale')] = ([f'{l}{theirs}.weight' for l in layers], _same)
    table[('layers', ours, 'bias')] = ([f'{l}{theirs}.bias' for l in layers], _same)
  for ours, theirs in (('q_proj', 'self_attn.q_proj'), ('k_proj', 'self_attn.k_proj'),
                       ('v_proj', 'self_attn.v_proj'), ('out_proj', 'self_attn.out_proj'),
                       ('fc1', 'mlp.fc1'), ('fc2', 'mlp.fc2')):
    table[('layers', ours, 'kernel')] = ([f'{l}{theirs}.weight' for l in layers], _linear_kernel)
    table[('layers', ours, 'bias')] = ([f'{l}{theirs}.bias' for l in layers], _same)
  return table


# --------------------------------------------------------------------------- loading


def abstract_clip_vision_model(config: clip_vision.CLIPVisionConfig, dtype=jnp.float32, *,
                               param_dtype=jnp.float32, scan_layers=True, remat='none',
                               attention_impl='auto') -> clip_vision.CLIPVisionModel:
  """The tower with shapes and logical axes but no weights (nnx.eval_shape)."""
  with nnx.use_eager_sharding(False):  # placed from the logical-axis metadata, not at creation
    return nnx.eval_shape(lambda: clip_vision.CLIPVisionModel(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
        remat=remat, attention_impl=attention_impl))


def load_clip_vision_params(path, model: clip_vision.CLIPVisionModel,
                            mesh=None) -> clip_vision.CLIPVisionModel:
  """`model` (concrete or abstract) with the checkpoint's weights, in the model's parameter dtype;
  with `mesh`, each placed as its logical axes say (sora_jax.parallel.sharding.RULES)."""
  folder = encoder_dir(path)
  files = safetensors_io.weight_files(folder, WEIGHTS_NAME)
  ours = {k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k: k for k in files}
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  table = param_table(model.config)
  needed = {k for keys, _ in table.values() for k in keys}
  missing = sorted(needed - set(ours))
  unexpected = sorted(set(ours) - needed - set(SKIPPED_KEYS))
  if missing or unexpected:
    raise ValueError(
        f'{folder}: checkpoint does not match the {model.config.num_hidden_layers}-layer CLIP '
        f'vision tower of its config.json; missing tensors ({len(missing)}): '
        f'{safetensors_io.listing(missing, 12)}; unexpected tensors ({len(unexpected)}): '
        f'{safetensors_io.listing(unexpected, 12)}')
  if set(table) != set(flat):  # a mapping bug, not a checkpoint problem
    raise AssertionError(f'parameters without a source: {sorted(set(flat) - set(table))}; '
                         f'sources without a parameter: {sorted(set(table) - set(flat))}')
  shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh))) if mesh else {}

  with safetensors_io.reader(files) as read:
    for path_, (keys, fn) in table.items():
      variable = flat[path_]
      arrays = [fn(read(ours[k])) for k in keys]
      value = np.stack(arrays) if path_[0] == 'layers' else arrays[0]
      if value.shape != tuple(variable.shape):
        raise ValueError(
            f'{folder}: {keys[0]}{" (and the other layers)" if len(keys) > 1 else ""} -> '
            f'{"/".join(path_)}: the checkpoint gives {value.shape} after layout conversion, '
            f'config.json implies {tuple(variable.shape)}')
      value = value.astype(variable.dtype)
      if path_ in shardings:
        target = shardings[path_].get_value()
        value = jax.make_array_from_callback(value.shape, target, lambda idx, v=value: v[idx])
      else:
        value = jnp.asarray(value)
      flat[path_] = variable.replace(value)
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def load_clip_vision_model(path, dtype=jnp.float32, *, param_dtype=jnp.float32, scan_layers=True,
                           remat='none', attention_impl='auto',
                           mesh=None) -> clip_vision.CLIPVisionModel:
  """CLIPVisionModel built from `path`'s config.json (abstractly) with its weights loaded."""
  abstract = abstract_clip_vision_model(
      load_clip_vision_config(path), dtype, param_dtype=param_dtype, scan_layers=scan_layers,
      remat=remat, attention_impl=attention_impl)
  return load_clip_vision_params(path, abstract, mesh=mesh)


class CLIPVisionEncoder:
  """Jitted tower with loaded weights and its preprocessing.

  f(pixel_values [B, S, S, 3]) -> hidden_states[hidden_layer] [B, 1 + P, D] float32 (default -2:
  Wan's image_embeds); f.encode_images(images) preprocesses uint8 images first (`processor`).
  """

  def __init__(self, model: clip_vision.CLIPVisionModel, processor: 'CLIPImageProcessor',
               hidden_layer: int = -2):
    self.model, self.processor, self.hidden_layer = model, processor, hidden_layer
    crop = processor.crop_size if processor.do_center_crop else None
    if crop is not None and crop != (model.config.image_size,) * 2:
      raise ValueError(f'The image processor crops to {crop}, the CLIP tower takes '
                       f'{model.config.image_size} x {model.config.image_size} images')
    graphdef, self._state = nnx.split(model)
    self._forward = jax.jit(
        lambda state, x: nnx.merge(graphdef, state)(x, hidden_layer=hidden_layer))

  def __call__(self, pixel_values):
    return self._forward(self._state, jnp.asarray(pixel_values))

  def encode_images(self, images):
    return self(self.processor(images))


def load_clip_vision_encoder(path, dtype=jnp.float32, *, param_dtype=jnp.float32,
                             hidden_layer=-2, attention_impl='auto', mesh=None) -> CLIPVisionEncoder:
  """The CLIP image encoder of `path` (a CLIPVisionModel folder or a Wan I2V pipeline folder) with
  its preprocessing (`load_clip_image_processor`)."""
  model = load_clip_vision_model(path, dtype, param_dtype=param_dtype,
                                 attention_impl=attention_impl, mesh=mesh)
  return CLIPVisionEncoder(model, load_clip_image_processor(path), hidden_layer)


# --------------------------------------------------------------------------- preprocessing

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` CLIP processors use
# preprocessor_config.json fields that do not change CLIPImageProcessor's pixel_values.
PROCESSOR_IGNORED = frozenset("""
    _processor_class feature_extractor_type image_processor_type processor_class disable_grouping
    return_tensors data_format input_data_format device
""".split())


@dataclasses.dataclass(frozen=True)
class CLIPImageProcessor:
  """transformers' CLIPImageProcessor (torchvision backend) in numpy. Defaults: the class's own,
  which are also what Wan's image_processor/preprocessor_config.json says.

  size: (shortest_edge,) keeps the aspect ratio; (height, width) resizes to exactly that.
  """
  do_resize: bool = True
  size: tuple[int, ...] = (224,)
  do_center_crop: bool = True
  crop_size: tuple[int, int] = (224, 224)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  image_std: tuple[float, float, float] = OPENAI_CLIP_STD
  do_convert_rgb: bool = True

  @classmethod
  def from_dict(cls, d: dict) -> 'CLIPImageProcessor':
    """From a preprocessor_config.json dict (strict: unknown fields and settings other than
    bicubic resampling are errors)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - PROCESSOR_IGNORED - {'resample', 'do_pad', 'pad_size'})
    if unknown:
      raise ValueError(f'{PREPROCESSOR_NAME} has fields CLIPImageProcessor does not know: '
                       f'{unknown}')
    if d.get('do_pad'):
      raise NotImplementedError('do_pad=True: padding is not implemented (CLIP processors crop)')
    if d.get('resample', BICUBIC) != BICUBIC:
      raise NotImplementedError(f'resample={d["resample"]}: only bicubic ({BICUBIC}), what CLIP '
                                'processors use, is implemented')
    fields = {k: d[k] for k in names if k in d and d[k] is not None}
    if 'size' in fields:
      fields['size'] = _size(fields['size'], 'size')
    if 'crop_size' in fields:
      crop = _size(fields['crop_size'], 'crop_size')
      fields['crop_size'] = crop * 2 if len(crop) == 1 else crop
    for key in ('image_mean', 'image_std'):
      if key in fields:
        value = fields[key]
        fields[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple))
                                               else [value] * 3))
    return cls(**fields)

  def __call__(self, images) -> np.ndarray:
    """uint8 images (one [H, W, 3] or [H, W] array, a list of them of any sizes, a [B, H, W, 3]
    array, or PIL images) -> pixel_values float32 [B, crop_h, crop_w, 3] (channels-last)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif not isinstance(images, (list, tuple)):
      images = [images]
    if not images:
      raise ValueError('no images given')
    return np.stack([self.preprocess_one(image) for image in images])

  def preprocess_one(self, image) -> np.ndarray:
    image = _as_uint8_rgb(image, self.do_convert_rgb)
    if self.do_resize:
      image = resize_bicubic_uint8(image, *self.output_size(*image.shape[:2]))
    if self.do_center_crop:
      image = center_crop(image, *self.crop_size)
    x = image.astype(np.float32)
    if self.do_normalize:
      # torchvision backend: rescale folded into the mean and std (float32), then (x - m) / s.
      scale = np.float32(1.0 / self.rescale_factor) if self.do_rescale else np.float32(1)
      mean = np.asarray(self.image_mean, np.float32) * scale
      std = np.asarray(self.image_std, np.float32) * scale
      x = (x - mean) / std
    elif self.do_rescale:
      x = x * np.float32(self.rescale_factor)
    return x

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """The resized (height, width): transformers' get_resize_output_image_size."""
    if len(self.size) == 2:
      return self.size
    short, long = sorted((height, width))
    new_long = int(self.size[0] * long / short)
    return (new_long, self.size[0]) if width <= height else (self.size[0], new_long)


def _size(value, name) -> tuple[int, ...]:
  if isinstance(value, int):
    return (value,)
  if isinstance(value, dict):
    if set(value) == {'shortest_edge'}:
      return (int(value['shortest_edge']),)
    if set(value) == {'height', 'width'}:
      return (int(value['height']), int(value['width']))
  raise NotImplementedError(f'{name}={value!r}: expected an int, {{"shortest_edge": n}} or '
                            '{"height": h, "width": w}')


def load_clip_image_processor(path) -> CLIPImageProcessor:
  """CLIPImageProcessor from preprocessor_config.json in `path`, `path/image_processor` or, for an
  image_encoder folder, its sibling image_processor/ (the Wan pipeline layout); the class defaults
  (also Wan's settings) when there is none."""
  path = os.fspath(path)
  candidates = [path, os.path.join(path, PROCESSOR_SUBFOLDER)]
  if os.path.basename(os.path.normpath(path)) == ENCODER_SUBFOLDER:
    candidates.append(os.path.join(os.path.dirname(os.path.normpath(path)), PROCESSOR_SUBFOLDER))
  for folder in candidates:
    file = os.path.join(folder, PREPROCESSOR_NAME)
    if os.path.isfile(file):
      with open(file) as f:
        return CLIPImageProcessor.from_dict(json.load(f))
  return CLIPImageProcessor()


def _as_uint8_rgb(image, convert_rgb=True) -> np.ndarray:
  if hasattr(image, 'convert') and hasattr(image, 'mode'):  # a PIL image
    image = image.convert('RGB') if convert_rgb else image
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8 (0..255), got {image.dtype}: CLIPImageProcessor '
                     'resamples uint8 pixels with integer arithmetic, so float input would round '
                     'differently')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'expected an [H, W, 3] RGB (or [H, W] grey) image, got shape {image.shape}')
  if image.shape[-1] == 1 and convert_rgb:
    image = np.repeat(image, 3, axis=-1)
  return image


def _keys_cubic(x, a=-0.5):
  """The bicubic convolution kernel (Keys, a = -0.5), as torch's / Pillow's antialiased filter."""
  x = np.abs(x)
  return np.where(x < 1.0, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2.0, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def bicubic_taps(in_size: int, out_size: int):
  """One axis of torch's antialiased bicubic resampling of uint8 images: for each output index its
  first input index and int16 weights, at the fixed-point precision the axis' largest weight allows.

  Follows aten/src/ATen/native/cpu/UpSampleKernel.cpp (HelperInterpBase::
  _compute_indices_min_size_weights_aa and _compute_index_ranges_int16_weights; Pillow's
  precompute_coeffs with Pillow-SIMD's int16 coefficients): weights in float64, normalised per
  output, scaled by 2^precision and rounded half away from zero.
  Returns (indices [out, taps] clipped into the input, weights int64 [out, taps], precision).
  """
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  taps = int(math.ceil(support)) * 2 + 1
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  center = scale * (np.arange(out_size) + 0.5)
  xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
  xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
  xsize = np.clip(xsize, 0, taps)
  j = np.arange(taps)
  w = _keys_cubic((j[None] + xmin[:, None] - center[:, None] + 0.5) * invscale)
  w = np.where(j[None] < xsize[:, None], w, 0.0)
  total = w.sum(axis=1, keepdims=True)
  w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), 0.0)
  wt_max = float(w.max())
  precision = 0
  while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  v = w * (1 << precision)
  weights = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64)
  indices = np.minimum(xmin[:, None] + j[None], in_size - 1)
  return indices, weights, precision


def _resample_axis(image, out_size, axis):
  if image.shape[axis] == out_size:
    return image
  indices, weights, precision = bicubic_taps(image.shape[axis], out_size)
  x = np.moveaxis(image, axis, 0).astype(np.int64)
  acc = (x[indices] * weights.reshape(weights.shape + (1,) * (x.ndim - 1))).sum(axis=1)
  out = np.clip((acc + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)
  return np.moveaxis(out, 0, axis)


def resize_bicubic_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, C] -> [height, width, C]: torch.nn.functional.interpolate(mode='bicubic',
  antialias=True, align_corners=False) on a uint8 tensor, which is what torchvision's resize (and
  so CLIPImageProcessor) runs on CPU; exact (integer arithmetic), width pass first."""
  return _resample_axis(_resample_axis(image, width, 1), height, 0)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """torchvision-backend center crop: zero-padded first when the image is smaller than the crop."""
  h, w = image.shape[:2]
  if height > h or width > w:
    top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
    image = np.pad(image, ((top, max(height - h, 0) - top), (left, max(width - w, 0) - left),
                           (0, 0)))
    h, w = image.shape[:2]
  top, left = int((h - height) / 2.0), int((w - width) / 2.0)
  return image[top:top + height, left:left + width]

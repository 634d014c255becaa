"""Wan 2.1 LoRA files and merged checkpoints in the layouts the torch tools read (numpy only).

An adapter set is a plain dict {module path: {'lora_a': [L, din, r], 'lora_b': [L, r, dout]}} with one
`rank` and `alpha` beside it. Paths are WanDiT module paths: ('blocks', 'attn1', 'to_q'), ('blocks',
'ffn', 'up'), ...; block modules are stacked on the leading layer axis as their kernels are, the
non-block linears (('proj_out',), ('time_proj',), ...) are not: [din, r] and [r, dout]. The update is
kernel + (alpha / rank) * lora_a @ lora_b, PEFT's; in PEFT's own tensors lora_A.weight [r, din] is
lora_a.T and lora_B.weight [dout, r] is lora_b.T (torch weights are [out, in], our kernels [in, out]).

  config = wan_transformer.wan_config_from_diffusers('Wan2.1-T2V-1.3B-Diffusers')
  adapters, rank, alpha = import_lora('some_wan_lora.safetensors', config)
  export_lora(adapters, rank, alpha, 'ours.safetensors')       # for ComfyUI / diffusers
  merged = merge(params_flat, adapters, rank, alpha)            # {path: array}, LoRA folded in
  export_diffusers(merged, config, 'out/transformer')           # a WanTransformer3DModel folder

File layouts read by import_lora (detected from the key names):
  comfy   the original Wan naming ComfyUI, diffusers' Wan loader and most released LoRAs use:
          diffusion_model.blocks.N.self_attn.q.lora_A.weight / .lora_B.weight (or lora_down / lora_up)
          and an optional scalar diffusion_model.blocks.N.self_attn.q.alpha (absent: alpha = rank)
  peft    diffusers' own (WanPipeline.save_lora_weights):
          transformer.blocks.N.attn1.to_q.lora_A.weight / .lora_B.weight, with or without the
          'transformer.' prefix; alpha from the 'lora_adapter_metadata' JSON (lora_alpha,
          alpha_pattern, use_rslora) or, without it, alpha = rank as diffusers assumes
  musubi  musubi-tuner / kohya: lora_unet_blocks_N_self_attn_q.lora_down.weight / .lora_up.weight /
          .alpha
export_lora writes the comfy layout, which ComfyUI and WanPipeline.load_lora_weights both load.
"""

import collections
import dataclasses
import functools
import json
import math
import os
import re

import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sora_jax.interop import safetensors_io
from sora_jax.interop import wan_transformer as wt
from sora_jax.models import wan

# Every linear layer of WanDiT: our module path -> (diffusers name, original Wan name), the pairs of
# diffusers' _convert_non_diffusers_wan_lora_to_diffusers (loaders/lora_conversion_utils.py). Block
# names are relative to 'blocks.N.'. patch_embedding is a convolution in both torch models: no LoRA.
LINEARS = {
    **{('blocks', attn, proj): (f'{attn}.{theirs}', f'{wan_attn}.{o}')
       for attn, wan_attn in (('attn1', 'self_attn'), ('attn2', 'cross_attn'))
       for proj, theirs, o in (('to_q', 'to_q', 'q'), ('to_k', 'to_k', 'k'), ('to_v', 'to_v', 'v'),
                               ('to_out', 'to_out.0', 'o'))},
    ('blocks', 'ffn', 'up'): ('ffn.net.0.proj', 'ffn.0'),
    ('blocks', 'ffn', 'down'): ('ffn.net.2', 'ffn.2'),
    ('time_embedder_1',): ('condition_embedder.time_embedder.linear_1', 'time_embedding.0'),
    ('time_embedder_2',): ('condition_embedder.time_embedder.linear_2', 'time_embedding.2'),
    ('time_proj',): ('condition_embedder.time_proj', 'time_projection.1'),
    ('text_embedder_1',): ('condition_embedder.text_embedder.linear_1', 'text_embedding.0'),
    ('text_embedder_2',): ('condition_embedder.text_embedder.linear_2', 'text_embedding.2'),
    ('proj_out',): ('proj_out', 'head.head'),
}
# Wan 2.1 image-to-video only: the image tokens' K/V in cross-attention and the image embedding
# (diffusers' converter: is_i2v_lora, cross_attn.k_img / v_img, img_emb.proj.1 / .3).
I2V_LINEARS = {
    ('blocks', 'attn2', 'add_k_proj'): ('attn2.add_k_proj', 'cross_attn.k_img'),
    ('blocks', 'attn2', 'add_v_proj'): ('attn2.add_v_proj', 'cross_attn.v_img'),
    ('image_embedder', 'ff_1'): ('condition_embedder.image_embedder.ff.net.0.proj', 'img_emb.proj.1'),
    ('image_embedder', 'ff_2'): ('condition_embedder.image_embedder.ff.net.2', 'img_emb.proj.3'),
}
ALL_LINEARS = {**LINEARS, **I2V_LINEARS}

# Per layout, the key suffixes naming lora_a ('a'), lora_b ('b') and alpha (module_name: the rest).
SUFFIXES = {
    'comfy': {'.lora_A.weight': 'a', '.lora_down.weight': 'a', '.lora_B.weight': 'b',
              '.lora_up.weight': 'b', '.alpha': 'alpha'},
    'peft': {'.lora_A.weight': 'a', '.lora_B.weight': 'b'},
    'musubi': {'.lora_down.weight': 'a', '.lora_up.weight': 'b', '.alpha': 'alpha'},
}
PEFT_METADATA_KEY = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_VERSION = '0.42.1'  # the release these layouts were checked against (fixtures)
DEFAULT_MAX_SHARD_BYTES = 10 * 10**9  # diffusers' save_pretrained default, max_shard_size='10GB'


def is_block(path) -> bool:
  return path[0] == 'blocks'


def module_name(path, layer, layout: str) -> str:
  """The name a layout gives module `path` (at `layer` for block modules), without the part suffix:
  ('blocks','attn1','to_q'), 3 -> 'blocks.3.attn1.to_q' (peft), 'diffusion_model.blocks.3.self_attn.q'
  (comfy), 'lora_unet_blocks_3_self_attn_q' (musubi)."""
  theirs, original = ALL_LINEARS[path]
  block = f'blocks.{layer}.' if is_block(path) else ''
  if layout == 'peft':
    return block + theirs
  if layout == 'comfy':
    return 'diffusion_model.' + block + original
  return 'lora_unet_' + (block + original).replace('.', '_')


@functools.lru_cache(maxsize=8)
def parameter_shapes(cfg: wan.WanConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shape of every WanDiT parameter for `cfg`, from an abstract model (no memory, milliseconds)."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: wan.WanDiT(cfg, rngs=nnx.Rngs(0)))
  return {path: tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model))}


def _wan_config(wan_config) -> wan.WanConfig:
  return wan_config if isinstance(wan_config, wan.WanConfig) else wan.WanConfig.from_diffusers(
      wan_config)


# --------------------------------------------------------------------------- LoRA files


def export_lora(adapters: dict, rank: int, alpha: float, path: str, *, base: str = '') -> None:
  """Writes `adapters` as one .safetensors file in the comfy layout (module docstring), each array
  in its own dtype: lora_A.weight = lora_a.T and lora_B.weight = lora_b.T per layer.

  Where alpha != rank, block modules get a scalar float32 `.alpha` (ComfyUI and diffusers' converter
  both apply alpha / rank from it); the non-block modules get lora_B * alpha / rank and no alpha key,
  because diffusers' converter reads alpha only inside blocks and raises on any other alpha key (and
  ComfyUI, with no alpha, scales by 1: the same update). Note diffusers cannot load a file with no
  block module at all (its converter takes min() over the block numbers).
  Metadata: ss_network_dim / ss_network_alpha (kohya's names, shown by ComfyUI tools) and
  `base`, the model the adapters were trained on, when given.
  """
  _check_adapters(adapters, rank)
  scale = alpha / rank
  tensors = {}
  for module, arrays in adapters.items():
    a, b = np.asarray(arrays['lora_a']), np.asarray(arrays['lora_b'])
    if is_block(module):
      for layer in range(a.shape[0]):
        name = module_name(module, layer, 'comfy')
        tensors[f'{name}.lora_A.weight'] = np.ascontiguousarray(a[layer].T)
        tensors[f'{name}.lora_B.weight'] = np.ascontiguousarray(b[layer].T)
        if alpha != rank:
          tensors[f'{name}.alpha'] = np.array(alpha, np.float32)
    else:
      name = module_name(module, None, 'comfy')
      tensors[f'{name}.lora_A.weight'] = np.ascontiguousarray(a.T)
      tensors[f'{name}.lora_B.weight'] = np.ascontiguousarray((b * np.asarray(scale, b.dtype)).T)
  metadata = {'format': 'pt', 'ss_network_dim': str(rank), 'ss_network_alpha': f'{alpha:g}'}
  if base:
    metadata['sora_jax_base_model'] = base
  save_file(tensors, path, metadata=metadata)


def _check_adapters(adapters: dict, rank: int) -> None:
  problems = []
  for module, arrays in adapters.items():
    if module not in ALL_LINEARS:
      problems.append(f'{module}: not a linear layer of WanDiT (known: {sorted(ALL_LINEARS)})')
      continue
    if set(arrays) != {'lora_a', 'lora_b'}:
      problems.append(f'{module}: expected lora_a and lora_b, got {sorted(arrays)}')
      continue
    a, b = np.shape(arrays['lora_a']), np.shape(arrays['lora_b'])
    ndim = 3 if is_block(module) else 2
    if (len(a), len(b)) != (ndim, ndim) or a[-1] != rank or b[-2] != rank or a[:-2] != b[:-2]:
      lead = '[L, ' if ndim == 3 else '['
      problems.append(f'{module}: lora_a {a} and lora_b {b} are not {lead}din, {rank}] and '
                      f'{lead}{rank}, dout]')
  if problems:
    raise ValueError('Adapters do not fit the Wan layout: ' + '; '.join(problems))


def import_lora(path: str, wan_config) -> tuple[dict, int, float]:
  """Reads a Wan LoRA .safetensors file in any layout of the module docstring (detected from its
  keys) for the model of `wan_config` (a WanConfig or a diffusers config.json dict).

  Returns (adapters, rank, alpha), float32 arrays, such that kernel + alpha / rank * lora_a @ lora_b
  is the update the file means. One rank and alpha must hold for the whole set, so where modules
  differ: the most common per-module scale (alpha_i / rank_i; alpha_i / sqrt(rank_i) under PEFT's
  use_rslora) becomes the set's, other modules' lora_b are multiplied by scale_i / scale, and modules
  of a smaller rank are zero-padded to the largest (the padding adds nothing to the product).

  Raises ValueError, naming the keys, when a key names no linear layer of this model or a part
  import cannot represent (DoRA magnitudes, lora_B biases, ComfyUI .diff keys), a shape does not fit
  the model, a lora_A has no lora_B or a block module lacks some layers.
  """
  cfg = _wan_config(wan_config)
  with safe_open(path, framework='numpy') as f:
    keys, metadata = list(f.keys()), f.metadata() or {}
  layout = detect_layout(keys, path)
  suffixes = SUFFIXES[layout]
  shapes = parameter_shapes(cfg)
  # The linears this model has (a text-to-video model has no add_k_proj / image_embedder): an
  # image-to-video LoRA on it names its image modules among the keys that do not fit.
  names = {module_name(m, layer, layout): (m, layer) for m in ALL_LINEARS
           if (*m, 'kernel') in shapes
           for layer in (range(cfg.num_layers) if is_block(m) else [None])}
  if layout == 'peft':  # diffusers writes the 'transformer.' prefix, save_lora_adapter does not
    names.update({'transformer.' + n: target for n, target in names.items()})

  parts, unfit = collections.defaultdict(dict), []
  for key in keys:
    suffix = next((s for s in suffixes if key.endswith(s)), None)
    target = names.get(key[:-len(suffix)]) if suffix else None
    if target is None:
      unfit.append(key)
    else:
      parts[target][suffixes[suffix]] = key
  if unfit:
    raise ValueError(f'{path!r} ({layout} layout) does not fit a Wan model with {cfg.num_layers} '
                     f'layers: {len(unfit)} keys name no LoRA part of its linear layers: '
                     f'{safetensors_io.listing(unfit)}')

  alpha_of = _peft_alphas(metadata, layout)
  entries, problems = {}, []
  with safetensors_io.reader({k: path for k in keys}) as read:
    for (module, layer), part in parts.items():
      if 'a' not in part or 'b' not in part:
        absent = ' and '.join(n for n, p in (('lora_A', 'a'), ('lora_B', 'b')) if p not in part)
        problems.append(f'{module_name(module, layer, layout)} has {sorted(part.values())} but no '
                        f'{absent}')
        continue
      a, b = read(part['a']), read(part['b'])
      din, dout = shapes[(*module, 'kernel')][-2:]
      if a.ndim != 2 or b.ndim != 2 or a.shape[1] != din or b.shape[0] != dout or (
          a.shape[0] != b.shape[1]):
        problems.append(f'{part["a"]} {a.shape} / {part["b"]} {b.shape}: expected [r, {din}] / '
                        f'[{dout}, r] for {"/".join(module)}')
        continue
      r = a.shape[0]
      if 'alpha' in part:
        alpha = read(part['alpha'])
        if alpha.size != 1:
          problems.append(f'{part["alpha"]}: a scalar expected, got shape {alpha.shape}')
          continue
        scale = float(alpha.astype(np.float64).reshape(())) / r
      else:
        scale = alpha_of(module_name(module, layer, 'peft'), r)
      entries[(module, layer)] = (a.astype(np.float32).T, b.astype(np.float32).T, scale)
  for module in sorted({m for m, _ in entries if is_block(m)}):
    absent = [i for i in range(cfg.num_layers) if (module, i) not in entries]
    if absent:
      problems.append(f'{"/".join(module)} is adapted in some layers but not in {absent} '
                      f'(e.g. {module_name(module, absent[0], layout)} has no lora weights); a '
                      f'LoRA must adapt a module in every layer or none')
  if problems:
    raise ValueError(f'{path!r} ({layout} layout) does not fit this Wan model: '
                     + '; '.join(problems))
  return _one_rank_and_alpha(entries, cfg.num_layers)


def detect_layout(keys, path='') -> str:
  """'comfy', 'peft' or 'musubi' from a LoRA file's key names."""
  if any(k.startswith('diffusion_model.') for k in keys):
    return 'comfy'
  if any(k.startswith('lora_unet_') for k in keys):
    return 'musubi'
  if any(k.endswith(('.lora_A.weight', '.lora_B.weight')) for k in keys):
    return 'peft'
  raise ValueError(f'{path!r} is not a Wan LoRA in a known layout (keys starting diffusion_model. '
                   f'(ComfyUI), lora_unet_ (musubi-tuner) or ending .lora_A.weight (diffusers)); '
                   f'its keys: {safetensors_io.listing(keys, 8)}')


def _peft_alphas(metadata: dict, layout: str):
  """(diffusers module name, rank) -> scale, as diffusers builds PEFT's LoraConfig for a peft file:
  from its lora_adapter_metadata JSON, or alpha = rank without one. For comfy / musubi files (only
  asked about modules with no alpha key) it gives alpha = rank, what a missing alpha means there."""
  config = json.loads(metadata[PEFT_METADATA_KEY]) if layout == 'peft' and (
      PEFT_METADATA_KEY in metadata) else {}
  config = {k.removeprefix('transformer.'): v for k, v in config.items()}
  lora_alpha, pattern = config.get('lora_alpha'), config.get('alpha_pattern') or {}
  rslora = bool(config.get('use_rslora'))

  def scale(name, rank):
    # peft.utils.other.get_pattern_key: a pattern key matches a module name that ends with it.
    key = next((p for p in pattern if re.match(rf'(.*\.)?({p})$', name)), None)
    alpha = pattern[key] if key is not None else (lora_alpha if lora_alpha is not None else rank)
    return alpha / (math.sqrt(rank) if rslora else rank)

  return scale


def _one_rank_and_alpha(entries: dict, num_layers: int) -> tuple[dict, int, float]:
  """Stacks per-(module, layer) (a, b, scale) into an adapter set with one rank and alpha."""
  rank = max(a.shape[1] for a, _, _ in entries.values())
  scale = collections.Counter(s for _, _, s in entries.values()).most_common(1)[0][0]
  fitted = {}
  for key, (a, b, s) in entries.items():
    if s != scale:
      b = (b.astype(np.float64) * (s / scale)).astype(np.float32)
    pad = rank - a.shape[1]
    fitted[key] = np.pad(a, ((0, 0), (0, pad))), np.pad(b, ((0, pad), (0, 0)))
  adapters = {}
  for module in dict.fromkeys(m for m, _ in entries):
    layers = range(num_layers) if is_block(module) else [None]
    stack = (lambda xs: np.stack(xs)) if is_block(module) else (lambda xs: xs[0])
    adapters[module] = {'lora_a': stack([fitted[(module, i)][0] for i in layers]),
                        'lora_b': stack([fitted[(module, i)][1] for i in layers])}
  return adapters, rank, scale * rank


# --------------------------------------------------------------------------- merged checkpoints


def split_adapters(params_flat: dict) -> tuple[dict, dict]:
  """A flat parameter dict of a model with LoRA layers (sora_jax.models.lora: 'lora_a' / 'lora_b'
  beside each adapted kernel) -> (the base parameters, the adapter set). Rank and alpha are not
  parameters: take them from the config that added the adapters."""
  base, adapters = {}, collections.defaultdict(dict)
  for path, value in params_flat.items():
    if path[-1] in ('lora_a', 'lora_b'):
      adapters[path[:-1]][path[-1]] = value
    else:
      base[path] = value
  return base, dict(adapters)


def merge(params_flat: dict, adapters: dict, rank: int, alpha: float) -> dict:
  """`params_flat` ({path: array}, numpy or jax) with each adapted kernel replaced by
  kernel + alpha / rank * lora_a @ lora_b, computed in float32 and stored in the kernel's dtype (what
  PEFT's fuse_lora computes). Other entries are passed through as given."""
  _check_adapters(adapters, rank)
  merged = dict(params_flat)
  scale = np.float32(alpha / rank)
  for module, arrays in adapters.items():
    path = (*module, 'kernel')
    if path not in params_flat:
      raise ValueError(f'Adapter on {"/".join(module)} but no {"/".join(path)} in the parameters')
    kernel = np.asarray(params_flat[path])
    delta = np.matmul(np.asarray(arrays['lora_a'], np.float32),
                      np.asarray(arrays['lora_b'], np.float32)) * scale
    if delta.shape != kernel.shape:
      raise ValueError(f'Adapter on {"/".join(module)} gives a {delta.shape} update for a '
                       f'{kernel.shape} kernel')
    merged[path] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
  return merged


def diffusers_config(wan_config_dict: dict) -> dict:
  """The config.json diffusers writes for this WanTransformer3DModel: every __init__ argument
  (defaults filled in, the given values kept as given), _class_name and _diffusers_version; not
  _name_or_path, which diffusers adds only for a model it loaded from a path."""
  cfg = wan.WanConfig.from_diffusers(wan_config_dict)  # validates: T2V Wan, known fields
  config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  config.update({name: None for name in wan._I2V_FIELDS})
  config.update({k: v for k, v in wan_config_dict.items() if not k.startswith('_')})
  config['patch_size'] = list(config['patch_size'])
  config['_class_name'] = 'WanTransformer3DModel'
  config['_diffusers_version'] = wan_config_dict.get('_diffusers_version', DIFFUSERS_VERSION)
  return config


def _inverse_transforms(cfg: wan.WanConfig) -> dict:
  """param_table's transforms (torch tensor -> our array) -> their inverses."""
  pt, ph, pw = cfg.patch_size

  def conv_weight(kernel):  # [(pt, ph, pw, C), D] -> Conv3d weight [D, C, pt, ph, pw]
    return kernel.reshape(pt, ph, pw, cfg.in_channels, -1).transpose(4, 3, 0, 1, 2)

  return {wt._linear_kernel: lambda k: k.T, wt._conv_kernel: conv_weight,
          wt._squeeze0: lambda w: w[None], wt._same: lambda w: w}


def _check_params(params_flat: dict, cfg: wan.WanConfig, table: dict) -> None:
  """Raises ValueError listing parameters the config needs but lacks, ones with no diffusers key
  and shapes that do not fit."""
  shapes = parameter_shapes(cfg)
  missing, extra = set(table) - set(params_flat), set(params_flat) - set(table)
  wrong = {p: np.shape(params_flat[p]) for p in set(table) & set(params_flat)
           if np.shape(params_flat[p]) != shapes[p]}
  problems = []
  if missing:
    problems.append(f'missing parameters: {safetensors_io.listing("/".join(p) for p in missing)}')
  if extra:
    hint = (' (LoRA entries: merge() them into the kernels and drop them, e.g. with split_adapters)'
            if any(p[-1] in ('lora_a', 'lora_b') for p in extra) else '')
    problems.append(f'parameters with no diffusers key{hint}: '
                    f'{safetensors_io.listing("/".join(p) for p in extra)}')
  if wrong:
    problems.append('shapes that do not fit the config: ' + safetensors_io.listing(
        f'{"/".join(p)} {s} (expected {shapes[p]})' for p, s in wrong.items()))
  if problems:
    raise ValueError('Parameters do not match the Wan config: ' + '; '.join(problems))


def diffusers_sources(params_flat: dict, wan_config_dict: dict) -> dict:
  """{diffusers key: (our path, layer index or None, torch-layout transform)}: the non-block
  parameters first, then block 0's, block 1's, ... (so shards hold whole layers). The transforms
  invert param_table's."""
  cfg = wan.WanConfig.from_diffusers(wan_config_dict)  # validates: T2V Wan, known fields
  table = wt.param_table(cfg)
  _check_params(params_flat, cfg, table)
  inverse = _inverse_transforms(cfg)
  top = {keys[0]: (path, None, inverse[fn]) for path, (keys, fn) in table.items()
         if not is_block(path)}
  blocks = {keys[i]: (path, i, inverse[fn]) for i in range(cfg.num_layers)
            for path, (keys, fn) in table.items() if is_block(path)}
  return {**top, **blocks}


def export_diffusers(params_flat: dict, wan_config_dict: dict, folder: str, *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None) -> list[str]:
  """Writes a diffusers WanTransformer3DModel folder (WanTransformer3DModel.from_pretrained(folder)
  loads it with no missing or unexpected keys) from our flat parameters ({path: array}, the tree
  load_wan_params fills; merge a LoRA first with `merge`).

  config.json as diffusers_config writes it; weights in one diffusion_pytorch_model.safetensors, or,
  above `max_shard_bytes`, in diffusion_pytorch_model-0000i-of-0000n.safetensors shards listed by
  diffusion_pytorch_model.safetensors.index.json, filled greedily in parameter order as
  huggingface_hub splits them (a tensor larger than the limit gets a shard of its own). `dtype`:
  cast every tensor (e.g. ml_dtypes.bfloat16); default: each array's own. Returns the files written.
  """
  config = diffusers_config(wan_config_dict)
  sources = diffusers_sources(params_flat, wan_config_dict)

  def tensor(key):
    path, layer, to_torch = sources[key]
    value = np.asarray(params_flat[path] if layer is None else params_flat[path][layer])
    return np.ascontiguousarray(to_torch(value if dtype is None else value.astype(dtype)))

  def nbytes(key):
    path, layer, _ = sources[key]
    shape = np.shape(params_flat[path])[0 if layer is None else 1:]
    return math.prod(shape) * np.dtype(params_flat[path].dtype if dtype is None else dtype).itemsize

  # Shards are converted one at a time: the host holds one shard's copies beyond the parameters.
  shards, size = [[]], 0
  for key in sources:
    if shards[-1] and size + nbytes(key) > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes(key)

  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, wt.CONFIG_NAME), 'w') as f:
    f.write(json.dumps(config, indent=2, sort_keys=True) + '\n')
  stem, ext = os.path.splitext(wt.WEIGHTS_NAME)
  names = ([wt.WEIGHTS_NAME] if len(shards) == 1 else
           [f'{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}' for i in range(len(shards))])
  for name, keys in zip(names, shards):
    save_file({k: tensor(k) for k in keys}, os.path.join(folder, name), metadata={'format': 'pt'})
  written = [wt.CONFIG_NAME, *names]
  if len(shards) > 1:
    index = {'metadata': {'total_size': sum(nbytes(k) for k in sources)},
             'weight_map': {k: name for name, keys in zip(names, shards) for k in sorted(keys)}}
    with open(os.path.join(folder, wt.WEIGHTS_NAME + '.index.json'), 'w') as f:
      f.write(json.dumps(index, indent=2, sort_keys=True) + '\n')
    written.append(wt.WEIGHTS_NAME + '.index.json')
  return written

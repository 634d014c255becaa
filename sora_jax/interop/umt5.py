"""Hugging Face UMT5 / T5 / mT5 encoder checkpoints -> sora_jax.models.umt5, without torch.

Accepted folders:
  - a transformers model folder: config.json + model.safetensors, or sharded
    model-0000x-of-0000y.safetensors with model.safetensors.index.json (encoder-only
    `UMT5EncoderModel` / `T5EncoderModel`, or a full seq2seq checkpoint whose `decoder.*` / `lm_head.*`
    tensors are skipped);
  - a Wan diffusers repository: the same under `text_encoder/`, the tokenizer under `tokenizer/`.
float32, bfloat16 and float16 files load; every tensor must be consumed and every parameter assigned,
otherwise the error lists the missing / unexpected tensor names.

  encode = load_umt5_encoder('Wan2.1-T2V-1.3B-Diffusers', dtype=jnp.bfloat16)
  ids, mask = load_umt5_tokenizer('Wan2.1-T2V-1.3B-Diffusers').tokenize(captions, 512)
  hidden = encode(ids, mask)   # transformers' last_hidden_state (padded positions not zeroed)
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.interop import safetensors_io
from sora_jax.models import umt5

# model_type -> bias_per_layer (UMT5 learns a relative-position bias in every layer, T5 / mT5 only
# in layer 0) and the defaults transformers uses for fields a config.json leaves out.
MODEL_TYPES = {
    'umt5': dict(bias_per_layer=True, feed_forward_proj='gated-gelu'),
    'mt5': dict(bias_per_layer=False, feed_forward_proj='gated-gelu'),
    't5': dict(bias_per_layer=False, feed_forward_proj='relu'),
}
REQUIRED_FIELDS = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_heads', 'num_layers')
OPTIONAL_FIELDS = ('relative_attention_num_buckets', 'relative_attention_max_distance',
                   'feed_forward_proj', 'layer_norm_epsilon')
# Fields of T5-family configs that do not change the encoder's forward pass: decoder, training,
# generation and bookkeeping settings (`dense_act_fn` / `is_gated_act` are re-derived from
# `feed_forward_proj` by transformers too). Anything else, e.g. `quantization_config`, is an error.
IGNORED_FIELDS = frozenset("""
    _attn_implementation _attn_implementation_autoset _commit_hash _name_or_path add_cross_attention
    architectures bad_words_ids begin_suppress_tokens bos_token_id chunk_size_feed_forward
    classifier_dropout cross_attention_hidden_size decoder_start_token_id dense_act_fn
    diversity_penalty do_sample dropout_rate dtype early_stopping encoder_no_repeat_ngram_size
    eos_token_id exponential_decay_length_penalty finetuning_task forced_bos_token_id
    forced_eos_token_id gradient_checkpointing id2label initializer_factor is_decoder
    is_encoder_decoder is_gated_act label2id length_penalty max_length min_length n_positions
    no_repeat_ngram_size num_beam_groups num_beams num_decoder_layers num_return_sequences
    output_attentions output_hidden_states output_past output_scores pad_token_id prefix
    problem_type pruned_heads remove_invalid_values repetition_penalty return_dict
    return_dict_in_generate scalable_attention scale_decoder_outputs sep_token_id suppress_tokens
    task_specific_params temperature tf_legacy_loss tie_encoder_decoder tie_word_embeddings
    tokenizer_class top_k top_p torch_dtype torchscript transformers_version typical_p
    use_bfloat16 use_cache
""".split())
# Tensors of a full encoder-decoder checkpoint that the encoder does not use.
SKIPPED_PREFIXES = ('decoder.', 'lm_head.')


def find_model_dir(path) -> str:
  """The folder holding config.json: `path` itself or its `text_encoder/` (Wan diffusers layout)."""
  path = os.fspath(path)
  for folder in (path, os.path.join(path, 'text_encoder')):
    if os.path.isfile(os.path.join(folder, 'config.json')):
      return folder
  raise FileNotFoundError(f'No UMT5/T5 encoder config.json in {path!r} or {path!r}/text_encoder.')


def config_from_hf(d: dict) -> umt5.UMT5Config:
  """A transformers config.json dict -> UMT5Config (strict: unknown fields are an error)."""
  model_type = d.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'config.json model_type={model_type!r}: expected one of {sorted(MODEL_TYPES)}.')
  unknown = sorted(set(d) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS) - IGNORED_FIELDS
                   - {'model_type'})
  if unknown:
    raise ValueError(f'config.json has fields the UMT5 encoder does not know: {unknown}. If they do '
                     'not change the encoder forward pass, add them to IGNORED_FIELDS.')
  missing = [f for f in REQUIRED_FIELDS if f not in d]
  if missing:
    raise ValueError(f'config.json lacks required fields {missing}.')
  defaults = MODEL_TYPES[model_type]
  fields = {f: d[f] for f in REQUIRED_FIELDS + OPTIONAL_FIELDS if f in d}
  fields.setdefault('feed_forward_proj', defaults['feed_forward_proj'])
  return umt5.UMT5Config(**fields, bias_per_layer=defaults['bias_per_layer'])


def load_umt5_config(path) -> umt5.UMT5Config:
  with open(os.path.join(find_model_dir(path), 'config.json')) as f:
    return config_from_hf(json.load(f))


def _hf_names(config: umt5.UMT5Config):
  """Our parameter path -> (HF tensor names, stacked over layers?, transpose?)."""
  attn, ffn = 'encoder.block.{}.layer.0.', 'encoder.block.{}.layer.1.'
  per_layer = {
      ('blocks', 'attn_norm', 'scale'): (attn + 'layer_norm.weight', False),
      ('blocks', 'ffn_norm', 'scale'): (ffn + 'layer_norm.weight', False),
      **{('blocks', p, 'kernel'): (attn + f'SelfAttention.{p}.weight', True) for p in 'qkvo'},
      **{('blocks', p, 'kernel'): (ffn + f'DenseReluDense.{p}.weight', True)
         for p in (('wi_0', 'wi_1', 'wo') if config.gated else ('wi', 'wo'))},
  }
  bias = attn + 'SelfAttention.relative_attention_bias.weight'
  names = {path: ([name.format(i) for i in range(config.num_layers)], True, transpose)
           for path, (name, transpose) in per_layer.items()}
  if config.bias_per_layer:
    names[('blocks', 'relative_bias')] = ([bias.format(i) for i in range(config.num_layers)], True,
                                          False)
  else:
    names[('relative_bias',)] = ([bias.format(0)], False, False)
  names[('final_norm', 'scale')] = (['encoder.final_layer_norm.weight'], False, False)
  return names


def abstract_umt5_module(path, dtype=jnp.float32, *, scan_layers=True) -> umt5.UMT5Encoder:
  """The encoder `path`'s config.json describes, with shapes but no weights (nnx.eval_shape)."""
  config = load_umt5_config(path)
  with nnx.use_eager_sharding(False):  # placed from the logical-axis metadata, not at creation
    return nnx.eval_shape(lambda: umt5.UMT5Encoder(
        config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, scan_layers=scan_layers))


def load_umt5_module(path, dtype=jnp.float32, *, scan_layers=True) -> umt5.UMT5Encoder:
  """UMT5Encoder with a checkpoint's weights. `dtype`: compute dtype, and the storage dtype of the
  embedding and matmul weights (bf16 halves umt5-xxl's 23 GB); norm scales and biases stay float32."""
  folder = find_model_dir(path)
  config = load_umt5_config(folder)
  files = safetensors_io.weight_files(folder, 'model.safetensors')
  graphdef, state = nnx.split(abstract_umt5_module(folder, dtype, scan_layers=scan_layers))
  targets = dict(nnx.to_flat_state(state))

  names = _hf_names(config)
  # The encoder reads the shared embedding (tied to encoder.embed_tokens; either may be saved).
  embed = next((k for k in ('shared.weight', 'encoder.embed_tokens.weight') if k in files),
               'shared.weight')
  names[('embed', 'embedding')] = ([embed], False, False)
  consumed = {embed, 'encoder.embed_tokens.weight'} & set(files)
  missing = [n for hf, _, _ in names.values() for n in hf if n not in files]
  consumed |= {n for hf, _, _ in names.values() for n in hf}
  unexpected = [k for k in files if k not in consumed and not k.startswith(SKIPPED_PREFIXES)]
  if missing or unexpected:
    raise ValueError(f'{folder}: checkpoint does not match a {config.num_layers}-layer '
                     f'{"UMT5" if config.bias_per_layer else "T5"} encoder; missing tensors '
                     f'{safetensors_io.listing(missing, 12)}; unexpected tensors '
                     f'{safetensors_io.listing(unexpected, 12)}.')
  if set(names) != set(targets):  # a mapping bug, not a checkpoint problem
    raise AssertionError(f'parameters without a source: {sorted(set(targets) - set(names))}; '
                         f'sources without a parameter: {sorted(set(names) - set(targets))}')

  values = []
  with safetensors_io.reader(files) as read:
    for path_, var in targets.items():
      hf, stacked, transpose = names[path_]
      arrays = [read(n) for n in hf]
      arrays = [a.T if transpose else a for a in arrays]
      value = np.stack(arrays) if stacked else arrays[0]
      if value.shape != var.shape:
        raise ValueError(f'{folder}: {hf[0]}{" (x%d layers)" % len(hf) if stacked else ""} has '
                         f'shape {value.shape} after layout conversion, the config implies '
                         f'{var.shape} for {"/".join(path_)}.')
      values.append((path_, var.replace(jnp.asarray(value.astype(var.dtype)))))
  return nnx.merge(graphdef, nnx.from_flat_state(values))


def load_umt5_encoder(path, dtype=jnp.float32):
  """Jitted f(input_ids [B, L], attention_mask [B, L]) -> [B, L, D] float32: transformers'
  `UMT5EncoderModel(...).last_hidden_state`, padded positions included (not zeroed). The weights are
  arguments of the compiled function, not constants baked into it."""
  graphdef, params = nnx.split(load_umt5_module(path, dtype))
  apply = jax.jit(lambda params, ids, mask: nnx.merge(graphdef, params)(ids, mask))
  return lambda input_ids, attention_mask: apply(params, jnp.asarray(input_ids),
                                                 jnp.asarray(attention_mask))



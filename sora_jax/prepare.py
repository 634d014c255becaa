"""Manifest -> preprocessed ArrayRecord shards, for training with `config.data.prepared=DIR`.

  python -m sora_jax.prepare --manifest=videos.csv --output_dir=prepared \
      [--config=configs/demo.py] [--num_processes=8] [--shard_size=256] [--overwrite] \
      [--cache_latents] [--cache_text] [--cache_dtype=float16] [--encode_batch_size=8]

The manifest is indexed exactly as training indexes it (`bucketed.index_manifest`: probe, bucket,
skip bad rows by reason). Examples, in index order, are cut into shards of `shard_size`: shard k
holds examples [k*S, (k+1)*S). Each example becomes ONE clip, decoded deterministically (from its
`start`, centre crop) at its bucket's shape, stored as a `records` record {'video', 'caption',
'path', 'bucket'}. An example that fails to decode now is skipped and counted by reason.

Resumable: a shard is written under a temporary name and renamed when complete, then its JSON
sidecar (records' paths and buckets, skips, a digest of the shard's examples) is written the same
way; the sidecar marks it done. A rerun redoes only shards without a consistent sidecar and discards
temporary files of a killed run. The layout is a function of the manifest and config alone, so a
rerun reproduces it; a folder prepared from another manifest/config (see `fingerprint`) is refused
unless --overwrite.

Cached encodings (training then skips the frozen encoders' forward passes on every step):
  --cache_latents (needs config.autoencoder): a record holds the autoencoder's posterior mean
      'latents' [t, h, w, C], UNnormalised, instead of the pixels; training only normalises it
      (inference/frozen.py: Frozen.encode_batch), so the normalisation stays with the training config.
  --cache_text (needs config.text.encoder='umt5'): a record also holds the frozen text encoder's
      'text_embeddings' [n, D] and 'text_mask' [n] of its caption, tokenized at
      config.text.max_length and cut after the last real token (the rest are zero rows, restored
      when batched): a 60-token caption of a 512-token umT5 sequence is stored as 60 rows.
  --cache_dtype: float16 (default) or float32. Why float16 is safe: it keeps 11 significant bits,
      a relative rounding error of at most 2^-11 = 4.9e-4 (absolute 3e-8 below 6e-5), under the
      bfloat16 rounding (2^-8) of a bfloat16 model's inputs and far under the flow-matching noise
      mixed into every training input; and it halves the bytes read per step. Its range
      (|x| <= 65504) is checked on every batch: a value beyond it stops the run, asking for
      float32, instead of storing inf.
  Clips are encoded in batches of --encode_batch_size clips of one bucket (a partial batch is
  padded, so each bucket compiles once), in this process (which owns the accelerator), with
  --num_processes decoding threads; records keep the example order. The fingerprint (index.json,
  sidecars) records what was cached: the encoders' paths and signatures (config and tokenizer
  files, weight file names and sizes, checkpoint steps), the dtype and the caption length;
  `check_cached` refuses to train on them with a config whose config.autoencoder /
  config.text.path / config.text.max_length differ, naming the key.

Output: DIR/shard-NNNNN.array_record (+ .json sidecars) and DIR/index.json, which
`pipeline.prepared_examples` reads."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from data_pipelines import prepare as prepare_lib
from sora_jax import cli
from sora_jax.config import schema
from sora_jax.inference import frozen as frozen_lib


def define_flags():
  """Defined only when run as a program, so the module imports cleanly next to the other CLIs."""
  config_flags.DEFINE_config_file('config', schema.DEMO_CONFIG,
                                  'Training config: buckets, fps, skip limit, probe threads.',
                                  lock_config=True)
  flags.DEFINE_string('manifest', None, 'CSV/JSONL manifest (default: config.data.manifest).')
  flags.DEFINE_string('output_dir', None, 'Folder for the shards and index.json.')
  flags.DEFINE_integer('num_processes', 1, 'Decoding processes (1: in this process); with'
                       ' --cache_latents/--cache_text, decoding threads of this process.')
  flags.DEFINE_integer('shard_size', 256, 'Examples per shard (before decode-time skips).')
  flags.DEFINE_bool('overwrite', False, 'Replace a folder prepared from another manifest/config.')
  flags.DEFINE_bool('cache_latents', False, "Store config.autoencoder's latent means, not pixels.")
  flags.DEFINE_bool('cache_text', False, 'Also store the frozen text encoder\'s caption embeddings'
                    " (config.text.encoder='umt5').")
  flags.DEFINE_enum('cache_dtype', 'float16', prepare_lib.CACHE_DTYPES, 'Storage dtype of cached encodings.')
  flags.DEFINE_integer('encode_batch_size', 8, 'Clips per encoder call when caching.')


def load_encoders(config, spec: dict):
  """inference.frozen.Frozen with only the encoders whose outputs `spec` caches."""
  sub = config.copy_and_resolve_references()
  if 'latents' not in spec:
    sub.autoencoder = ''
  if 'text' not in spec:
    sub.text.encoder = 'bytes'
  return frozen_lib.Frozen(sub)


def prepare(config, manifest: str, output_dir: str, **kwargs) -> dict:
  """data_pipelines.prepare.prepare with this run's frozen encoders for cached encodings."""
  return prepare_lib.prepare(config, manifest, output_dir, load_encoders=load_encoders, **kwargs)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  manifest = f.manifest or config.data.manifest
  if not manifest:
    raise cli.UserError('--manifest (or --config.data.manifest) is required.')
  with cli.user_errors():
    prepare(config, manifest, f.output_dir, num_processes=f.num_processes, shard_size=f.shard_size,
            overwrite=f.overwrite, cache_latents=f.cache_latents, cache_text=f.cache_text,
            cache_dtype=f.cache_dtype, encode_batch_size=f.encode_batch_size)
  print(f'Train on it with --config.data.prepared={f.output_dir}')


if __name__ == '__main__':
  cli.run(main, define_flags, required=['output_dir'])

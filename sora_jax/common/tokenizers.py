"""Captions to token ids, host side (numpy, sentencepiece; no JAX), so Grain workers can tokenize.

Every text encoder takes (tokens int32 [B, L], mask bool [B, L]):
  - `tokenize`: bytes for the byte-level encoder trained with the model (models/text.py); the empty
    caption still holds BOS/EOS, so cross-attention always has a valid key;
  - `UMT5Tokenizer`: T5/umT5 sentencepiece pieces for the frozen pretrained encoder (models/umt5.py);
  - `Tokenizer(config)`: whichever of the two a run's config.text.encoder names.
"""

import html
import os
import re

import numpy as np

PAD, BOS, EOS, BYTE_OFFSET = 0, 1, 2, 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(captions, max_length: int):
  tokens = np.full((len(captions), max_length), PAD, np.int32)
  for i, caption in enumerate(captions):
    ids = [BOS] + [b + BYTE_OFFSET for b in caption.encode('utf-8')][:max_length - 2] + [EOS]
    tokens[i, :len(ids)] = ids
  return tokens, tokens != PAD


class UMT5Tokenizer:
  """T5's sentencepiece tokenizer: the pieces of the caption, then EOS; padded with PAD to
  `max_length`, truncated to `max_length - 1` pieces + EOS (transformers' `T5Tokenizer(...,
  padding='max_length', truncation=True)` on plain captions).

  Difference from transformers: text that spells a special token ('</s>', '<extra_id_0>') is encoded
  as ordinary characters here, not as that token.
  """

  def __init__(self, path):
    import sentencepiece  # pylint: disable=g-import-not-at-top  (only needed for UMT5 runs)
    self.path = find_spiece(path)
    self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
    self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(f'{self.path}: a T5 tokenizer needs PAD and EOS pieces; this model has '
                       f'pad_id={self.pad_id}, eos_id={self.eos_id}.')

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def tokenize(self, captions, max_length: int):
    if max_length < 1:
      raise ValueError(f'max_length={max_length} must hold at least the EOS token.')
    if isinstance(captions, str):
      raise TypeError('tokenize takes a list of captions, not a single string.')
    ids = np.full((len(captions), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(captions), max_length), bool)
    for i, pieces in enumerate(self.sp.encode(list(captions))):
      row = pieces[:max_length - 1] + [self.eos_id]
      ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


def find_spiece(path) -> str:
  """`spiece.model` given as the file itself, in the folder, or in its `tokenizer/` subfolder (the
  layout of Wan's diffusers repositories)."""
  path = os.fspath(path)
  candidates = [path] if os.path.isfile(path) else [
      os.path.join(path, 'spiece.model'), os.path.join(path, 'tokenizer', 'spiece.model')]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f'No sentencepiece model for the UMT5 tokenizer: looked for '
                          f'{", ".join(candidates)}.')


def load_umt5_tokenizer(path) -> UMT5Tokenizer:
  """The sentencepiece tokenizer of a model folder, its `tokenizer/` subfolder (Wan diffusers) or
  the parent of a `text_encoder/` folder."""
  path = os.fspath(path)
  if os.path.isdir(path) and not any(
      os.path.isfile(os.path.join(path, *p)) for p in (('spiece.model',),
                                                       ('tokenizer', 'spiece.model'))):
    parent = os.path.dirname(os.path.normpath(path))
    if os.path.isfile(os.path.join(parent, 'tokenizer', 'spiece.model')):
      return UMT5Tokenizer(parent)
  return UMT5Tokenizer(path)


def prompt_clean(text: str) -> str:
  """Wan's prompt cleaning minus ftfy: unescape HTML twice, collapse whitespace, strip."""
  return re.sub(r'\s+', ' ', html.unescape(html.unescape(text))).strip()


class Tokenizer:
  """captions -> (tokens [B, L] int32, mask [B, L] bool), L = config.text.max_length, as the config's
  text encoder reads them: byte tokens (text.encoder='bytes') or umT5's sentencepiece pieces ('umt5':
  the frozen encoder must see its own vocabulary, the one sampling uses too). Picklable for Grain
  workers: the sentencepiece model is loaded on first use in each process."""

  def __init__(self, config):
    self.encoder, self.path = config.text.encoder, config.text.path
    self.max_length = config.text.max_length
    self._sentencepiece = None

  def __call__(self, captions):
    if self.encoder != 'umt5':
      return tokenize(captions, self.max_length)
    if self._sentencepiece is None:
      self._sentencepiece = load_umt5_tokenizer(self.path)
    return self._sentencepiece.tokenize(captions, self.max_length)

  def __getstate__(self):
    return dict(self.__dict__, _sentencepiece=None)

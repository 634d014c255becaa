"""Manifests of captioned media: a CSV with a header or a JSONL file, one example per row.

Columns: `path` (absolute, or relative to the manifest's folder) and `caption`; optional `start` / `end`
in seconds (a window of a longer video). A row that cannot become an example carries an `error` (the
skip reason) instead of raising, so a pipeline can count and log it and go on.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Row:
  """A manifest row, parsed. `error` set means the row is skipped with that reason."""
  where: str  # path, or 'manifest:line' when the row has no usable path
  path: str = ''
  caption: object = None
  start: float = 0.0
  end: float | None = None
  error: str | None = None


def read_manifest(manifest: str | os.PathLike) -> Iterator[Row]:
  """Rows of a .csv (with header) or .jsonl manifest, paths resolved against its folder."""
  manifest = os.fspath(manifest)
  ext = os.path.splitext(manifest)[1].lower()
  if ext == '.csv':
    records = _csv_records(manifest)
  elif ext in ('.jsonl', '.json'):
    records = _jsonl_records(manifest)
  else:
    raise ValueError(f'manifest {manifest!r} must be .csv or .jsonl')
  folder = os.path.dirname(os.path.abspath(manifest))
  for line, record in records:
    yield _parse_row(record, f'{manifest}:{line}', folder)


def _csv_records(manifest: str) -> Iterator[tuple[int, dict | None]]:
  with open(manifest, newline='', encoding='utf-8-sig') as f:  # -sig: spreadsheets add a BOM
    reader = csv.DictReader(f)
    missing = {'path', 'caption'} - set(reader.fieldnames or ())
    if missing:
      raise ValueError(f'manifest {manifest!r} header lacks column(s) {sorted(missing)};'
                       f' got {reader.fieldnames}')
    for record in reader:
      yield reader.line_num, record


def _jsonl_records(manifest: str) -> Iterator[tuple[int, dict | None]]:
  with open(manifest, encoding='utf-8') as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError:
        record = None
      yield line, record if isinstance(record, dict) else None


def _parse_row(record: dict | None, where: str, folder: str) -> Row:
  if record is None:
    return Row(where, error='bad_row')
  path = record.get('path')
  if not isinstance(path, str) or not path.strip():
    return Row(where, error='bad_row')
  path = os.path.join(folder, os.path.expanduser(path.strip()))  # absolute paths win
  try:
    start = _seconds(record.get('start'), default=0.0)
    end = _seconds(record.get('end'), default=None)
  except ValueError:
    return Row(path, path, error='bad_row')
  if start < 0 or (end is not None and end <= start):
    return Row(path, path, error='bad_row')
  return Row(path, path, record.get('caption'), start, end)


def _seconds(value, default):
  if value is None or (isinstance(value, str) and not value.strip()):
    return default  # CSV writes a missing value as ''
  if isinstance(value, bool):
    raise ValueError(value)
  seconds = float(value)
  if not math.isfinite(seconds):
    raise ValueError(value)
  return seconds


def check_row(row: Row, num_frames: int, fps: float) -> str | None:
  """Cheap checks before decoding; the skip reason, or None."""
  if not isinstance(row.caption, str):
    return 'caption_not_str'
  if not row.caption.strip():
    return 'empty_caption'
  if row.end is not None and (row.end - row.start) * fps < num_frames - 1e-6:
    return 'too_short'
  return None

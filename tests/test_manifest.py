"""Manifest parsing: CSV/JSONL rows, relative paths, rows that become skip reasons."""

import json

import pytest

from data_pipelines import manifest


def test_jsonl_manifest_rows(tmp_path):
  lines = [
      json.dumps({'path': 'x.mp4', 'caption': 'ok', 'start': 1.5, 'end': 3}),
      '',
      json.dumps({'path': '/abs/y.mp4', 'caption': 7}),
      '{not json',
      json.dumps({'caption': 'no path'}),
      json.dumps({'path': 'z.mp4', 'caption': 'c', 'start': 'soon'}),
      json.dumps({'path': 'w.mp4', 'caption': 'c', 'start': 2, 'end': 1}),
  ]
  path = tmp_path / 'm.jsonl'
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  rows = list(manifest.read_manifest(path))
  assert rows[0] == manifest.Row(str(tmp_path / 'x.mp4'), str(tmp_path / 'x.mp4'), 'ok', 1.5, 3.0)
  assert rows[1].path == '/abs/y.mp4' and rows[1].caption == 7 and rows[1].error is None
  assert [r.error for r in rows[2:]] == ['bad_row'] * 4
  assert rows[2].where == f'{path}:4'
  check = lambda r: manifest.check_row(r, num_frames=16, fps=8)
  assert check(rows[0]) == 'too_short' and check(rows[1]) == 'caption_not_str'


def test_csv_manifest_needs_path_and_caption_columns(tmp_path):
  path = tmp_path / 'm.csv'
  path.write_text('file,text\na.mp4,hello\n', encoding='utf-8')
  with pytest.raises(ValueError, match='path'):
    list(manifest.read_manifest(path))

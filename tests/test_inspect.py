"""The data_pipelines.inspect CLI, run as a user runs it, on a manifest and on the shapes data."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import media_fixtures as mf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inspect(*args):
  return subprocess.run([sys.executable, '-m', 'data_pipelines.inspect', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def _report(tmp_path, *args):
  path = tmp_path / 'report.json'
  run = _inspect(f'--report={path}', *args)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(path) as f:
    return json.load(f), run.stdout


def test_shapes_data(tmp_path):
  report, stdout = _report(tmp_path, '--config=configs/demo.py', '--num_batches=2')
  assert report['batch_shapes'] == [[16, 12, 32, 32, 3]] * 2
  assert report['num_examples'] == 32
  assert report['sources_seen'] == ['shapes'] and report['skipped'] == []
  assert report['examples_per_second'] > 0
  assert '[16, 12, 32, 32, 3]: 2, 32' in stdout


@pytest.fixture
def manifest(tmp_path):
  land = mf.h264_mp4(tmp_path, n=24, audio=False)  # 96x64, 1 s
  square = mf.vfr_mkv(tmp_path)  # 64x64
  bad = {'missing': mf.missing(tmp_path), 'not_media': mf.text_as_mp4(tmp_path)}
  rows = ['path,caption,start,end', f'{os.path.basename(land)},a landscape clip,,',
          f'{land},its second half,0.5,', f'{square},a square clip,,', f'{square},later,0.5,',
          f'{bad["missing"]},gone,,', f'{bad["not_media"]},text,,', f'{square},,,']
  path = tmp_path / 'manifest.csv'
  path.write_text('\n'.join(rows) + '\n')
  return path, {land, square}, {**bad, 'empty_caption': square}


def test_manifest(tmp_path, manifest):
  path, sources, bad = manifest
  config = ['--config=configs/demo.py', f'--config.data.manifest={path}',
            '--config.data.buckets=((4,32,32),(4,32,48))', '--config.batch_size=2',
            '--config.data.max_skip_fraction=0.5', '--config.data.probe_threads=2']
  report, stdout = _report(tmp_path, *config, '--num_batches=3')
  assert len(report['batch_shapes']) == 3
  assert {tuple(s) for s in report['batch_shapes']} == {(2, 4, 32, 32, 3), (2, 4, 32, 48, 3)}
  assert report['num_examples'] == sum(s[0] for s in report['batch_shapes']) == 6
  assert set(report['sources_seen']) == sources
  assert sorted((s['reason'], s['path']) for s in report['skipped']) == sorted(
      (reason, str(p)) for reason, p in bad.items())
  assert report['examples_per_second'] > 0
  assert 'Skipped 3' in stdout
  # A config the job would reject is rejected here too, naming the key.
  run = _inspect(*config, '--config.data.buckets=((4,32,36),)', '--num_batches=1')
  assert run.returncode != 0 and 'config.data.buckets' in run.stderr


def test_buckets_smaller_than_their_batch_are_batched_and_reported(tmp_path, manifest):
  """The demo's batch of 16 and 2 + 2 usable rows: before, `No bucket has enough examples`."""
  path, sources, _ = manifest
  report, stdout = _report(
      tmp_path, '--config=configs/demo.py', f'--config.data.manifest={path}',
      '--config.data.buckets=((4,32,32),(4,32,48))', '--config.data.max_skip_fraction=0.5',
      '--config.data.probe_threads=2', '--num_batches=2')
  assert report['buckets'] == [
      {'shape': [4, 32, 32], 'batch_size': 16, 'rows': 2, 'batches_per_epoch': 1,
       'repeated_rows_per_epoch': 14},
      {'shape': [4, 32, 48], 'batch_size': 16, 'rows': 2, 'batches_per_epoch': 1,
       'repeated_rows_per_epoch': 14}]
  # One epoch is these 2 batches: every usable row is in them.
  assert sorted(report['batch_shapes']) == [[16, 4, 32, 32, 3], [16, 4, 32, 48, 3]]
  assert set(report['sources_seen']) == sources
  assert '[4, 32, 32]: batch 16, 2 rows, 1 batch per epoch (14 repeated rows)' in stdout


def test_too_many_skips_still_writes_the_report(tmp_path, manifest):
  """3 of 7 rows skipped, over max_skip_fraction=0.1: the report is written, then one line, no
  traceback."""
  path, _, bad = manifest
  report_path = tmp_path / 'report.json'
  run = _inspect('--config=configs/demo.py', f'--config.data.manifest={path}',
                 '--config.data.buckets=((4,32,32),(4,32,48))', '--config.batch_size=2',
                 '--config.data.max_skip_fraction=0.1', '--config.data.probe_threads=2',
                 '--num_batches=2', f'--report={report_path}')
  assert run.returncode == 1, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert '3 of 7 examples skipped' in last and 'config.data.max_skip_fraction=0.1' in last
  assert str(report_path) in last
  with open(report_path) as f:
    report = json.load(f)
  assert report['skipped_counts'] == {'missing': 1, 'not_media': 1, 'empty_caption': 1}
  assert sorted(s['reason'] for s in report['skipped']) == sorted(bad)
  assert report['batch_shapes'] == [] and report['error'] in last
  # What the usable rows would train, were the fraction raised.
  assert [(b['shape'], b['batch_size'], b['rows']) for b in report['buckets']] == [
      ([4, 32, 32], 2, 2), ([4, 32, 48], 2, 2)]
  assert 'Skipped 3' in run.stdout

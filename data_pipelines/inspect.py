r"""Pulls batches through the real training input pipeline and reports what came out.

  python -m data_pipelines.inspect --config=configs/demo.py --config.data.manifest=videos.csv \
      --num_batches=20 --report=inspect.json [--data_parallel=1]

Run it before launching a job: it validates the config, indexes the data exactly as training does
(`pipeline.train_iterator`), and shows the rows and batch of each bucket, the batch shapes, the
skipped examples by reason and the input throughput on this machine. The JSON report holds
num_examples, batch_shapes ([B, T, H, W, C] per batch), buckets ([{shape, batch_size, rows,
batches_per_epoch, repeated_rows_per_epoch}] of user data: a bucket's last batch is topped up with
its own rows, bucketed.BatchPlan), sources_seen (paths that produced an example; ["shapes"] for the
built-in generator), skipped ([{path, reason}]), skipped_counts ({reason: n}), examples_per_second
and error.

Data that skips more than config.data.max_skip_fraction of its rows still gets its report (that is
what it is for): the report is printed and written, error holds the reason, and the program ends with
that one line and exit status 1.
"""

import collections
import copy
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from data_pipelines import bucketed, pipeline
from sora_jax.config import buckets as buckets_lib
from sora_jax.config import schema, validation


def define_flags():
  """Defined only when run as a program, so the module imports cleanly next to the other CLIs."""
  config_flags.DEFINE_config_file('config', schema.DEMO_CONFIG, 'Training config.',
                                  lock_config=True)
  flags.DEFINE_integer('num_batches', 10, 'Batches to pull.')
  flags.DEFINE_string('report', None, 'JSON file for the report (optional).')
  flags.DEFINE_integer('data_parallel', 1, 'mesh.data * mesh.fsdp of the planned job: per-bucket'
                       ' batch sizes (tokens_per_batch) are rounded to a multiple of it.')


def validate(config, data_parallel: int):
  """validation.validate without this machine's devices: checks the config as if the job's mesh
  were `data_parallel` devices, all on the data axis (batch divisibility still checked against it)."""
  c = copy.deepcopy(config)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = -1, 1, 1, 1
  validation.validate(c, data_parallel)


def inspect(config, num_batches: int, data_parallel: int = 1) -> dict:
  """The report (see the module docstring); data with too many skipped rows ends it early, with
  'error' set, rather than raising: looking at such data is what this tool is for."""
  validate(config, data_parallel)
  skips = bucketed.SkipLog(config.data.max_skip_fraction)
  shapes, error, indexed = [], None, None
  start = time.perf_counter()
  try:
    it = pipeline.train_iterator(config, data_parallel=data_parallel, skips=skips)
    indexed = time.perf_counter()  # setup: indexing (probing a manifest's files)
    for _ in range(num_batches):
      shapes.append(list(next(it)['video'].shape))
  except bucketed.TooManySkips as e:
    error = str(e)
  end = time.perf_counter()
  seconds = end - indexed if indexed else 0.0
  num_examples = sum(s[0] for s in shapes)
  user = pipeline.uses_user_data(config)
  return {
      'num_examples': num_examples,
      'batch_shapes': shapes,
      'buckets': bucket_rows(config, skips.bucket_rows, data_parallel) if user else [],
      'sources_seen': sorted(skips.sources) if user else ['shapes'],
      'skipped': [{'path': p, 'reason': r} for p, r in skips.skipped],
      'skipped_counts': dict(skips.counts.most_common()),
      'examples_per_second': num_examples / seconds if seconds > 0 else None,
      'setup_seconds': (indexed or end) - start,
      'error': error,
  }


def bucket_rows(config, rows: list[int] | None, data_parallel: int) -> list[dict]:
  """Per bucket: its global batch, its usable rows, and what an epoch makes of them (BatchPlan: the
  last batch is topped up with the bucket's own rows). Empty if the data never got indexed."""
  if rows is None:
    return []
  table = buckets_lib.make(config, bucketed.batch_multiple(config, 1, data_parallel))
  out = []
  for b, n in zip(table, rows):
    batches = -(-n // b.batch_size)
    out.append({'shape': list(b.shape), 'batch_size': b.batch_size, 'rows': n,
                'batches_per_epoch': batches, 'repeated_rows_per_epoch': batches * b.batch_size - n})
  return out


def print_report(report: dict):
  histogram = collections.defaultdict(lambda: [0, 0])  # shape -> [batches, examples]
  for shape in report['batch_shapes']:
    histogram[tuple(shape)][0] += 1
    histogram[tuple(shape)][1] += shape[0]
  print(f'{len(report["batch_shapes"])} batches, {report["num_examples"]} examples from'
        f' {len(report["sources_seen"])} sources;'
        f' {report["examples_per_second"] or 0:.1f} examples/s'
        f' (setup {report["setup_seconds"]:.1f} s).')
  if report['buckets']:
    print('Bucket [T, H, W]: global batch, usable rows, batches per epoch')
  for b in report['buckets']:
    if not b['rows']:
      print(f'  {b["shape"]}: batch {b["batch_size"]}, no rows (compiled, never trained)')
      continue
    plural = 'batch' if b['batches_per_epoch'] == 1 else 'batches'
    repeated = b['repeated_rows_per_epoch']
    print(f'  {b["shape"]}: batch {b["batch_size"]}, {b["rows"]} row{"s" * (b["rows"] > 1)},'
          f' {b["batches_per_epoch"]} {plural} per epoch'
          + (f' ({repeated} repeated rows)' if repeated else ''))
  print('Batch shape [B, T, H, W, C]: batches, examples')
  for shape, (batches, examples) in sorted(histogram.items()):
    print(f'  {list(shape)}: {batches}, {examples}')
  counts = report['skipped_counts']
  print(f'Skipped {len(report["skipped"])}' + (f': {counts}' if counts else '.'))
  for reason in counts:
    paths = [s['path'] for s in report['skipped'] if s['reason'] == reason][:3]
    print(f'  {reason}: e.g. {", ".join(paths)}')


def main(argv):
  del argv
  f = flags.FLAGS
  if f.num_batches < 1:
    raise app.UsageError('--num_batches must be >= 1.')
  report = inspect(f.config, f.num_batches, f.data_parallel)
  print_report(report)
  if f.report:
    os.makedirs(os.path.dirname(os.path.abspath(f.report)), exist_ok=True)
    with open(f.report, 'w') as out:
      json.dump(report, out, indent=1)
    print(f'Wrote {f.report}')
  if report['error']:
    print(report['error'] + (f' Report: {f.report}' if f.report else ''), file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)

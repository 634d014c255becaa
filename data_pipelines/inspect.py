r"""Pulls batches through the real training input pipeline and reports what came out.

  python -m data_pipelines.inspect --config=configs/demo.py --config.data.manifest=videos.csv \
      --num_batches=20 --report=inspect.json [--data_parallel=1]

Run it before launching a job: it validates the config, indexes the data exactly as training does
(`pipeline.train_iterator`), and shows the batch shapes per bucket, the skipped examples by reason
and the input throughput on this machine. The JSON report holds num_examples, batch_shapes
([B, T, H, W, C] per batch), sources_seen (paths that produced an example; ["shapes"] for the
built-in generator), skipped ([{path, reason}]) and examples_per_second.
"""

import collections
import copy
import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from data_pipelines import bucketed, pipeline
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
  validate(config, data_parallel)
  skips = bucketed.SkipLog(config.data.max_skip_fraction)
  start = time.perf_counter()
  it = pipeline.train_iterator(config, data_parallel=data_parallel, skips=skips)
  setup_seconds = time.perf_counter() - start  # indexing (probing a manifest's files)
  start = time.perf_counter()
  shapes = [list(next(it)['video'].shape) for _ in range(num_batches)]
  seconds = time.perf_counter() - start
  num_examples = sum(s[0] for s in shapes)
  user = pipeline.uses_user_data(config)
  return {
      'num_examples': num_examples,
      'batch_shapes': shapes,
      'sources_seen': sorted(skips.sources) if user else ['shapes'],
      'skipped': [{'path': p, 'reason': r} for p, r in skips.skipped],
      'examples_per_second': num_examples / seconds if seconds > 0 else None,
      'setup_seconds': setup_seconds,
  }


def print_report(report: dict):
  histogram = collections.defaultdict(lambda: [0, 0])  # shape -> [batches, examples]
  for shape in report['batch_shapes']:
    histogram[tuple(shape)][0] += 1
    histogram[tuple(shape)][1] += shape[0]
  print(f'{len(report["batch_shapes"])} batches, {report["num_examples"]} examples from'
        f' {len(report["sources_seen"])} sources;'
        f' {report["examples_per_second"] or 0:.1f} examples/s'
        f' (setup {report["setup_seconds"]:.1f} s).')
  print('Batch shape [B, T, H, W, C]: batches, examples')
  for shape, (batches, examples) in sorted(histogram.items()):
    print(f'  {list(shape)}: {batches}, {examples}')
  counts = collections.Counter(s['reason'] for s in report['skipped'])
  print(f'Skipped {len(report["skipped"])}'
        + (f': {dict(counts.most_common())}' if counts else '.'))
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


if __name__ == '__main__':
  define_flags()
  app.run(main)

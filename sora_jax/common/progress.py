"""Progress lines with an ETA for long loops (sampling batches, evaluation stages)."""

import time

from absl import logging


def _minutes(seconds: float) -> str:
  return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'


class Progress:
  """`update(done)` logs `WHAT: done/total, elapsed, ETA` (the ETA assumes the rest goes at the
  average pace so far, compilation included, so early estimates run high)."""

  def __init__(self, total: int, what: str):
    self.total, self.what = total, what
    self.start = time.perf_counter()

  def update(self, done: int, note: str = ''):
    elapsed = time.perf_counter() - self.start
    eta = elapsed / max(done, 1) * (self.total - done)
    logging.info('%s: %d/%d%s, %s elapsed, ETA %s', self.what, done, self.total,
                 f' ({note})' if note else '', _minutes(elapsed), _minutes(eta))

"""metrics.jsonl + TensorBoard scalars (process 0 only), and the console progress line."""

import json
import os
import time

import jax
from absl import logging


class Writer:

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if not self.active:
      return
    # Lines logged after the checkpoint we resume from are logged again; drop the stale copies.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
      with open(self.path, 'w') as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.tb.close()


class Progress:
  """Steps/s over the last logging window and ETA for the rest of the run."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self.last_step, self.last_time = start_step, time.perf_counter()

  def update(self, step: int, loss: float) -> float:
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    logging.info('step %d/%d  loss %.4f  %.2f steps/s  ETA %dm%02ds', step, self.total, loss, rate,
                 eta // 60, eta % 60)
    return rate

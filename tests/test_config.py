import subprocess
import sys

import pytest

from sora_jax.config import validation


def test_demo_config_is_valid():
  sys.path.insert(0, 'configs')
  import demo  # pylint: disable=g-import-not-at-top
  assert validation.validate(demo.get_config(), 1) == dict(data=1, fsdp=1, tensor=1, context=1)


@pytest.mark.parametrize('mesh,devices,expected', [
    (dict(data=-1), 8, dict(data=8, fsdp=1, tensor=1, context=1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, dict(data=2, fsdp=2, tensor=2, context=1)),
    (dict(data=1, fsdp=4, tensor=2), 8, dict(data=1, fsdp=4, tensor=2, context=1)),
])
def test_mesh_resolution(config, mesh, devices, expected):
  config.mesh.update(mesh)
  assert validation.validate(config, devices) == expected


@pytest.mark.parametrize('edit,devices,message', [
    (lambda c: c.mesh.update(dict(data=2, fsdp=2)), 8, 'config.mesh'),
    (lambda c: c.mesh.update(dict(data=3)), 8, 'config.mesh'),
    (lambda c: c.mesh.update(dict(data=-1, fsdp=-1)), 8, 'only one axis'),
    (lambda c: (c.mesh.update(dict(data=1, context=8)), c.data.update(dict(height=12, width=12))), 8,
     'config.mesh.context=8'),
    (lambda c: c.model.update(dict(attention='flash')), 1, 'config.model.attention'),
    (lambda c: c.update(dict(batch_size=12)), 8, 'config.batch_size=12'),
    (lambda c: c.model.update(dict(patch_size=(3, 4, 4))), 1, 'config.data.num_frames=4'),
    (lambda c: c.model.update(dict(patch_size=(2, 5, 4))), 1, 'config.data.height=16'),
    (lambda c: c.model.update(dict(num_heads=5)), 1, 'config.model.width'),
    (lambda c: c.model.update(dict(remat='some')), 1, 'config.model.remat'),
    (lambda c: c.update(dict(total_steps=0)), 1, 'config.total_steps'),
    (lambda c: c.optim.update(dict(warmup_steps=-1)), 1, 'config.optim.warmup_steps=-1'),
    (lambda c: c.data.update(dict(bounce=1.5)), 1, 'config.data.bounce=1.5'),
    (lambda c: c.data.update(dict(bounce=0.5, stop=0.7)), 1, 'config.data.rest = 1.2 exceeds 1'),
    (lambda c: c.data.update(dict(stop=0.5, rest=0.6)), 1, 'config.data.rest = 1.1 exceeds 1'),
    (lambda c: c.data.update(dict(rest=-0.1)), 1, 'config.data.rest=-0.1'),
    (lambda c: c.model.__setitem__('detph', 3), 1, 'config.model.detph'),
    (lambda c: c.__setitem__('sampel', {}), 1, 'config.sampel'),
])
def test_invalid_configs_name_the_key(config, edit, devices, message):
  edit(config)
  with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
    validation.validate(config, devices)


def test_a_warm_up_longer_than_the_run_is_shortened_with_a_warning(config, caplog):
  """A 20-step smoke run of a config tuned for 100 warm-up steps trains: it warms up for a tenth of
  the run (before: refused, `warmup_steps must be below total_steps`)."""
  from sora_jax.training import state  # pylint: disable=g-import-not-at-top
  config.total_steps, config.optim.warmup_steps, config.optim.learning_rate = 20, 100, 1e-3
  validation._warn_short_run.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level('WARNING'):
    validation.validate(config, 1)
    validation.validate(config, 1)  # as sora_jax.train does: still one warning
  warned = [r.getMessage() for r in caplog.records if 'warmup_steps' in r.getMessage()]
  assert len(warned) == 1 and 'config.optim.warmup_steps=100' in warned[0], caplog.text
  assert 'config.total_steps=20' in warned[0] and 'warming up for 2 steps' in warned[0]
  assert validation.warmup_steps(config) == 2
  _, schedule = state.make_optimizer(config)
  # Linear from 0 to the peak over the 2 steps actually used, then the cosine decay to the end.
  assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 5e-4, 1e-3])
  assert float(schedule(20)) == pytest.approx(1e-3 * config.optim.end_lr_fraction)
  # A warm-up that fits is used as given, without a warning.
  config.optim.warmup_steps = 19
  caplog.clear()
  with caplog.at_level('WARNING'):
    validation.validate(config, 1)
  assert validation.warmup_steps(config) == 19 and 'warmup_steps' not in caplog.text
  _, schedule = state.make_optimizer(config)
  assert float(schedule(19)) == pytest.approx(1e-3) and float(schedule(10)) < 1e-3
  # A one-step run: no warm-up at all.
  config.total_steps = 1
  assert validation.warmup_steps(config) == 0


def _train_cli(*overrides, tmp_path):
  return subprocess.run(
      [sys.executable, '-m', 'sora_jax.train', '--config=configs/demo.py',
       f'--workdir={tmp_path}', *overrides], capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_override_key(tmp_path):
  out = _train_cli('--config.model.detph=4', tmp_path=tmp_path)
  assert out.returncode != 0 and 'detph' in out.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_cli_rejects_bad_value_before_compiling(tmp_path):
  out = _train_cli('--config.model.patch_size=(2,5,8)', tmp_path=tmp_path)
  assert out.returncode != 0 and 'config.model.patch_size' in out.stderr
  assert 'config.data.height=32' in out.stderr
  assert not (tmp_path / 'checkpoints').exists()


@pytest.mark.parametrize('flag,message', [('--upscale_noise=1.0', '--upscale_noise=1.0 not in'),
                                          ('--conditioned=long_vidoe', "['long_vidoe']")])
def test_evaluate_cli_rejects_bad_options_before_loading(tmp_path, flag, message):
  # The workdir does not exist: the option is refused first, as a usage error (no traceback).
  out = subprocess.run(
      [sys.executable, '-m', 'sora_jax.evaluate', f'--workdir={tmp_path}/missing',
       f'--output={tmp_path}/eval.json', flag], capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert 'Traceback' not in out.stderr

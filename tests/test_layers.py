"""The layered structure, enforced: no import cycle among the project's modules, and no module imports
a layer above its own (README: "How the code is laid out"). Reads the source with `ast`, so it sees
every import, including ones inside functions."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('sora_jax', 'data_pipelines')

# Bottom up: each layer may import itself and the layers listed for it, nothing else.
LAYERS = {
    'config': (),
    'common': ('config',),
    'data': ('config', 'common'),
    'parallel': ('config', 'common'),
    'diffusion': ('config', 'common', 'parallel'),
    'models': ('config', 'common', 'parallel', 'diffusion'),
    'interop': ('config', 'common', 'parallel', 'diffusion', 'models'),
    'training': ('config', 'common', 'parallel', 'diffusion', 'models', 'interop'),
    'inference': ('config', 'common', 'data', 'parallel', 'diffusion', 'models', 'interop',
                  'training'),
    'evaluation': ('config', 'common', 'data', 'parallel', 'diffusion', 'models', 'interop',
                   'training', 'inference'),
    'cli': ('config', 'common', 'data', 'parallel', 'diffusion', 'models', 'interop', 'training',
            'inference', 'evaluation'),
}
CLIS = ('sora_jax.train', 'sora_jax.sample', 'sora_jax.evaluate', 'sora_jax.prepare',
        'sora_jax.compile', 'sora_jax.export', 'sora_jax.cli')


def layer_of(module: str) -> str:
  if module.startswith('data_pipelines'):
    return 'data'
  if module in CLIS:
    return 'cli'
  if module == 'sora_jax':
    return 'config'  # the package's empty __init__
  layer = module.split('.')[1]
  if layer not in LAYERS:
    raise AssertionError(f'{module} is in no layer: add it to a layer folder (tests/test_layers.py).')
  return layer


def modules(root=ROOT) -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((root / package).rglob('*.py')):
      parts = path.relative_to(root).with_suffix('').parts
      out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def imports(path: pathlib.Path, known) -> set[str]:
  """The project modules `path` imports (`from pkg import name` counts as pkg.name when that is a
  module, else as pkg)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split('.')[0] in PACKAGES)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
        node.module.split('.')[0] in PACKAGES:
      for a in node.names:
        full = f'{node.module}.{a.name}'
        found.add(full if full in known else node.module)
  return found


def graph(root=ROOT) -> dict[str, set[str]]:
  mods = modules(root)
  return {m: imports(p, mods) for m, p in mods.items()}


def upward_imports(g) -> list[str]:
  bad = []
  for m, deps in g.items():
    mine = layer_of(m)
    for d in deps:
      theirs = layer_of(d)
      if theirs != mine and theirs not in LAYERS[mine]:
        bad.append(f'{m} ({mine}) imports {d} ({theirs})')
  return sorted(bad)


def cycles(g) -> list[list[str]]:
  """Every strongly connected component of more than one module (or a module importing itself)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):  # Tarjan
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in g:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in g.get(v, ()):
        out.append(sorted(comp))

  for v in sorted(g):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  assert cycles(graph()) == []


def test_no_upward_imports():
  assert upward_imports(graph()) == []


def test_checks_catch_a_cycle_and_an_upward_import():
  g = graph()
  g['sora_jax.config.geometry'] = g['sora_jax.config.geometry'] | {'sora_jax.config.validation'}
  # Within one component (config.buckets imports geometry, so the cycle may hold it too).
  assert any({'sora_jax.config.geometry', 'sora_jax.config.validation'} <= set(c) for c in cycles(g))
  g['sora_jax.models.dit'] = g['sora_jax.models.dit'] | {'sora_jax.training.state'}
  assert 'sora_jax.models.dit (models) imports sora_jax.training.state (training)' in \
      upward_imports(g)


def test_every_module_has_a_layer():
  for m in modules():
    layer_of(m)


@pytest.mark.parametrize('module', ['data_pipelines.pipeline', 'data_pipelines.bucketed',
                                    'data_pipelines.packing', 'data_pipelines.shapes'])
def test_data_layer_imports_no_flax(module):
  """A Grain worker process imports the data layer: it must not pull in Flax or any model code
  (Grain itself imports JAX, so JAX is not checked)."""
  code = (f'import sys, {module}; bad = [m for m in sys.modules if m == "flax" or'
          ' (m.startswith("sora_jax.") and m.split(".")[1] not in ("config", "common"))];'
          ' print(bad); sys.exit(1 if bad else 0)')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr

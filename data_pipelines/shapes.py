"""Captioned moving shapes: a tiny synthetic text-to-video dataset and its judge.

Each clip is a black background with one filled shape (circle, square or
apex-up isosceles triangle) in one of seven exact palette colours, moving at
constant speed left/right/up/down. The caption is
``a {color} {shape} moving {direction}``: the direction of the clip's net
motion. Optionally a clip's object meets the frame edge it moves towards, so
that videos longer than a clip have something to imitate there: it bounces
once off the edge (``bounce``; first and net motion follow the caption),
stops against it and rests (``stop``; it never moves against the caption), or
is within a short run of it or already resting there (``rest``: the end of a
stop, as a sliding window after the stop sees it).
Some (colour, shape) pairs are held out of the 'train' split to probe
compositional generalisation.

`judge_clip` recovers (colour, shape, direction, stable, size) from pixels only and
is meant to be robust to noisy / blurry generated videos. numpy + grain only.
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'cyan': (0, 255, 255),
    'magenta': (255, 0, 255),
    'white': (255, 255, 255),
}
SHAPES = ('circle', 'square', 'triangle')
DIRECTIONS = ('left', 'right', 'up', 'down')
HELD_OUT_PAIRS = (('red', 'triangle'), ('blue', 'circle'),
                  ('yellow', 'square'), ('white', 'triangle'))
SPLITS = ('train', 'heldout', 'all')  # index = split_id used in record seeds

SIZE_RANGE = (0.36, 0.44)  # the object's side (its bounding box) / min(H, W), drawn per clip

_PALETTE = np.array(list(COLORS.values()), np.float32)  # [7, 3]
_CAPTION_RE = re.compile(r'a (\w+) (\w+) moving (\w+)')


def pairs(split: str) -> list[tuple[str, str]]:
  """(colour, shape) pairs of a split, in COLORS x SHAPES order."""
  every = [(c, s) for c in COLORS for s in SHAPES]
  if split == 'all':
    return every
  if split == 'train':
    return [p for p in every if p not in HELD_OUT_PAIRS]
  if split == 'heldout':
    return [p for p in every if p in HELD_OUT_PAIRS]
  raise ValueError(f'unknown split {split!r}; expected one of {SPLITS}')


def caption(color: str, shape: str, direction: str) -> str:
  _check_names(color, shape, direction)
  return f'a {color} {shape} moving {direction}'


def parse_caption(text: str) -> tuple[str, str, str]:
  """Inverse of `caption`; ValueError on anything not produced by it."""
  m = _CAPTION_RE.fullmatch(text) if isinstance(text, str) else None
  if m is None:
    raise ValueError(f'not a shapes caption: {text!r}')
  _check_names(*m.groups())
  return m.groups()


def _check_names(color, shape, direction):
  for name, value, options in (('color', color, COLORS), ('shape', shape, SHAPES),
                               ('direction', direction, DIRECTIONS)):
    if value not in options:
      raise ValueError(f'unknown {name} {value!r}; expected one of {tuple(options)}')


def _check_dims(num_frames, height, width):
  for name, value, lo in (('num_frames', num_frames, 2), ('height', height, 16),
                          ('width', width, 16)):
    if not isinstance(value, (int, np.integer)) or value < lo:
      raise ValueError(f'{name} must be an int >= {lo}, got {value!r}')


def _shape_mask(shape: str, size: int) -> np.ndarray:
  """Binary [size, size] template, rasterised with the pixel-centre test."""
  c = np.arange(size) + 0.5  # pixel centres
  y, x = c[:, None], c[None, :]
  half = size / 2
  if shape == 'square':
    return np.ones((size, size), bool)
  if shape == 'circle':
    return (x - half) ** 2 + (y - half) ** 2 <= half ** 2
  # Apex-up isosceles triangle: apex (half, 0), base corners (0, size), (size, size).
  return np.abs(x - half) <= y / 2


def render_clip(color: str, shape: str, direction: str, *, num_frames: int,
                height: int, width: int, rng: np.random.Generator,
                bounce: bool = False, stop: bool = False, rest: bool = False) -> np.ndarray:
  """uint8 [T, H, W, 3] clip; all randomness drawn from `rng`.

  Bounding box side L = round(U(0.36, 0.44) * min(H, W)) pixels; travel D is an
  integer in [ceil(0.3 * dim), floor(0.5 * dim)] along the motion axis, so
  L + D <= 0.94 * dim and the shape is fully inside in every frame. The float
  position is linearly interpolated and snapped to whole pixels per frame, so
  the shape is the same template in every frame (constant area, exact colours).

  bounce: the same path length D in two legs with one reflection off a frame
  edge in between: D - s pixels in the caption's direction up to the edge
  ahead, then s back, so the motion starts as captioned and its net D - 2s >=
  ceil(0.15 * dim) is in the caption's direction too; s >= one frame's step,
  so a clip with too few frames for that stays straight.

  stop: the clip's speed (D / (T - 1) pixels per frame) up to the edge ahead,
  reached after r >= ceil(0.15 * dim) pixels and at least one step before the
  last frame, then at rest against it; a clip too short for that stays straight.

  rest: as stop, but the edge ahead is r < ceil(0.15 * dim) pixels away (r = 0:
  at rest against it in every frame). Stop and rest clips together cover every
  phase of the approach, so a window that starts near or at the edge has seen
  its like in training.
  """
  _check_names(color, shape, direction)
  _check_dims(num_frames, height, width)
  if bounce + stop + rest > 1:
    raise ValueError('a clip either bounces, stops or rests at the edge, not several')
  size = int(round(min(height, width) * rng.uniform(*SIZE_RANGE)))
  along = width if direction in ('left', 'right') else height
  other = height if direction in ('left', 'right') else width
  travel = int(rng.integers(math.ceil(0.3 * along), math.floor(0.5 * along) + 1))
  sign = 1 if direction in ('right', 'down') else -1
  longest = (travel - math.ceil(0.15 * along)) // 2
  shortest = math.ceil(travel / (num_frames - 1))  # one frame's step: survives snapping to pixels
  free = along - size  # positions 0 .. free keep the shape inside
  reach = (math.ceil(0.15 * along), travel - shortest)  # stop: distance to the edge ahead
  if bounce and longest >= shortest:  # else too few frames to show a bounce: a straight clip
    short = int(rng.integers(shortest, longest + 1))
    # Unfolded coordinate u in the caption's direction, starting `travel -
    # short` before the edge ahead; the reflection maps it back into [0, free].
    u = free - (travel - short) + travel * np.linspace(0, 1, num_frames)
    p = np.where(u > free, 2 * free - u, u)
    pos = np.rint(p if sign > 0 else free - p).astype(int)
  elif (stop and reach[0] <= reach[1]) or rest:
    r = int(rng.integers(reach[0], reach[1] + 1) if stop else rng.integers(0, reach[0]))
    p = np.minimum(free - r + travel * np.linspace(0, 1, num_frames), free)
    pos = np.rint(p if sign > 0 else free - p).astype(int)
  else:
    lo = int(rng.integers(0, along - size - travel + 1))  # smallest position reached
    start = lo if sign > 0 else lo + travel
    pos = np.rint(start + sign * travel * np.linspace(0, 1, num_frames)).astype(int)
  cross = int(rng.integers(0, other - size + 1))

  mask = _shape_mask(shape, size)
  video = np.zeros((num_frames, height, width, 3), np.uint8)
  for t, p in enumerate(pos):
    y0, x0 = (cross, p) if direction in ('left', 'right') else (p, cross)
    video[t, y0:y0 + size, x0:x0 + size][mask] = COLORS[color]
  return video


class ShapesSource:
  """Grain RandomAccessDataSource of captioned shape clips.

  Record i is a pure function of (seed, split, i): it uses
  np.random.default_rng([seed, split_id, i]). A fraction `bounce` of clips
  bounce once off a frame edge, a fraction `stop` stop against it, a fraction `rest` are within a
  short run of it or resting there (`render_clip`).
  """

  def __init__(self, *, num_frames: int, height: int, width: int,
               split: str = 'train', seed: int = 0, num_records: int = 2**31 - 1,
               bounce: float = 0.0, stop: float = 0.0, rest: float = 0.0):
    _check_dims(num_frames, height, width)
    self._pairs = pairs(split)  # validates split
    for name, value in (('bounce', bounce), ('stop', stop), ('rest', rest)):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be a fraction in [0, 1], got {value!r}')
    if bounce + stop + rest > 1.0:
      raise ValueError(f'bounce + stop + rest must be at most 1, got {bounce} + {stop} + {rest}')
    self.bounce, self.stop, self.rest = float(bounce), float(stop), float(rest)
    self._edge = np.cumsum([self.bounce, self.stop, self.rest])  # u below these: bounce, stop, rest
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f'seed must be a non-negative int, got {seed!r}')
    if not isinstance(num_records, (int, np.integer)) or num_records < 1:
      raise ValueError(f'num_records must be a positive int, got {num_records!r}')
    self.num_frames, self.height, self.width = num_frames, height, width
    self.split, self.seed, self.num_records = split, int(seed), int(num_records)

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index):
    i = int(index)
    if not 0 <= i < self.num_records:
      raise IndexError(f'record {index} out of range [0, {self.num_records})')
    rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
    color, shape = self._pairs[rng.integers(len(self._pairs))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    # Drawn only when an edge behaviour is on, so straight-only records are those of before.
    edge = self._edge
    u = rng.random() if edge[-1] > 0 else 1.0
    video = render_clip(color, shape, direction, num_frames=self.num_frames,
                        height=self.height, width=self.width, rng=rng, bounce=u < edge[0],
                        stop=edge[0] <= u < edge[1], rest=edge[1] <= u < edge[2])
    return {'video': video, 'caption': caption(color, shape, direction)}

  def __repr__(self) -> str:
    return (f'ShapesSource(num_frames={self.num_frames}, height={self.height}, '
            f'width={self.width}, split={self.split!r}, seed={self.seed}, '
            f'num_records={self.num_records}, bounce={self.bounce}, stop={self.stop}, '
            f'rest={self.rest})')


# ------------------------------------------------------------------- judge --
# Thresholds (pixel values in [0, 255], fractions of the frame):
_FG_THRESHOLD = 96       # object pixel: max channel > 96 (Gaussian noise std 20
                         # on black exceeds it with prob ~1e-6; a 3x3 blur keeps
                         # the edge of a 255 shape above it only at ~1/3 coverage)
_CORE_LEVEL = 0.5       # shape features use pixels >= 50% of object brightness
_MIN_AREA_FRAC = 0.02    # present: area >= 0.02 * min(H,W)^2, i.e. 25% of the
                         # smallest clean triangle ~ 0.5 * (0.4 * min(H,W))^2
_AREA_FACTOR = 1.6       # stable: each frame's area within x/÷ 1.6 of the median
_MIN_TRAVEL = 0.10       # direction: centroid moves >= 10% of the frame axis
_STRAY_LEVEL = 48       # stray: a background pixel with max channel > 48 (visible
                         # on black), farther than min(H, W) / 32 px from the object
# size: every frame's bounding box (longest side / min(H, W)) within SIZE_RANGE widened by x/÷ 1.3,
# [0.28, 0.57]. 150 of the data's own clips, through mp4 at 32x32, measure 0.375-0.50 (compression
# ringing above the 96 threshold adds up to two pixels, 6% of the frame); a box 30% larger than the
# data's largest object, or smaller than its smallest / 1.3, is not the data's object (the demo's
# ballooned squares: 0.7-0.9).
_SIZE_FACTOR = 1.3
_MAX_JUMP = 0.25         # stable: consecutive centroid steps <= max(25% of the
                         # frame, 2x the largest clean step 0.5 / (T - 1))
# Shape rules on (fill = area / bbox area, taper = mean row width of the top
# quarter of the bbox / that of the bottom quarter). Clean values: square
# (1.0, 1.0), circle (~0.78, ~1.0), apex-up triangle (~0.5, ~0.15).
_TRIANGLE_TAPER, _TRIANGLE_FILL = 0.5, 0.7   # taper < 0.5 and fill < 0.7
_ROUND_TAPER = 0.7                           # circle/square need taper >= 0.7
_CIRCLE_FILL, _SQUARE_FILL = 0.65, 0.9       # circle in [0.65, 0.9), square >=


def _largest_components(mask: np.ndarray) -> np.ndarray:
  """Per frame, the largest 4-connected component of a bool [T, H, W] mask.

  Label propagation with pointer jumping: each pixel's label is the flat index
  of some pixel of its component, repeatedly lowered to the min over its
  4-neighbours and then to its label's label; at the fixed point each component
  carries one label (its smallest index).
  """
  t, h, w = mask.shape
  big = mask.size
  lab = np.where(mask, np.arange(big).reshape(mask.shape), big)
  while True:
    new = lab.copy()
    np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
    np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
    np.minimum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
    np.minimum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
    new = np.where(mask, new, big)
    flat = new.reshape(-1)
    fg = flat < big
    for _ in range(4):  # pointer jumping: lab <- lab[lab]
      flat[fg] = flat[flat[fg]]
    if np.array_equal(new, lab):
      break
    lab = new
  out = np.zeros_like(mask)
  labels, counts = np.unique(lab[mask], return_counts=True)
  frames = labels // (h * w)
  for f in np.unique(frames):
    sel = frames == f
    out[f] = lab[f] == labels[sel][np.argmax(counts[sel])]
  return out


def _classify_shape(m: np.ndarray) -> str | None:
  rows, cols = np.nonzero(m)
  r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
  fill = len(rows) / ((r1 - r0 + 1) * (c1 - c0 + 1))
  widths = m[r0:r1 + 1].sum(axis=1)
  k = max(1, len(widths) // 4)
  taper = widths[:k].mean() / widths[-k:].mean()
  if taper < _TRIANGLE_TAPER and fill < _TRIANGLE_FILL:
    return 'triangle'
  if taper >= _ROUND_TAPER and fill >= _SQUARE_FILL:
    return 'square'
  if taper >= _ROUND_TAPER and fill >= _CIRCLE_FILL:
    return 'circle'
  return None


def _vote(values):
  return collections.Counter(values).most_common(1)[0][0] if values else None


def track(video: np.ndarray) -> dict:
  """Per-frame object measurements of a [T, H, W, 3] clip (uint8 or float in [0, 255]).

  Returns 'present' [T] bool, 'area' [T] pixels, 'color' / 'shape' [T] names (None where absent or
  unclassified), 'centroid' [T, 2] (y, x) in frame fractions (NaN where absent), 'extent' [T]: the
  bounding box's longest side / min(H, W) (NaN where absent) and 'stray' [T]: the
  fraction of the frame's pixels that are visibly lit (max channel > 48) away from the object
  (speckles; farther than min(H, W) / 32 pixels, so blur at the object's edge does not count)."""
  video = np.asarray(video, np.float32)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f'expected [T, H, W, 3] video, got shape {video.shape}')
  t, h, w, _ = video.shape
  obj = _largest_components(video.max(axis=-1) > _FG_THRESHOLD)
  areas = obj.sum(axis=(1, 2))
  present = areas >= _MIN_AREA_FRAC * min(h, w) ** 2
  colors, shapes, cents = [None] * t, [None] * t, np.full((t, 2), np.nan)
  extent = np.full(t, np.nan)
  for f in np.flatnonzero(present):
    rgb = np.median(video[f][obj[f]], axis=0)
    colors[f] = list(COLORS)[np.argmin(((_PALETTE - rgb) ** 2).sum(-1))]
    # Shape from the object's "half-brightness" core: blur spreads a bright
    # edge into neighbours at <= 1/3 of its brightness, and noise then makes a
    # ragged 96-threshold border; the 50% level follows the true edge.
    bright = video[f].max(axis=-1)
    core = obj[f] & (bright >= _CORE_LEVEL * np.median(bright[obj[f]]))
    shapes[f] = _classify_shape(core)
    ys, xs = np.nonzero(obj[f])
    cents[f] = (ys.mean() / h, xs.mean() / w)
    extent[f] = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / min(h, w)
  near = obj.copy()
  r = max(1, round(min(h, w) / 32))
  for dy in range(-r, r + 1):  # square dilation by r pixels
    for dx in range(-r, r + 1):
      near[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= (
          obj[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  stray = ((video.max(axis=-1) > _STRAY_LEVEL) & ~near).mean(axis=(1, 2))
  return {'present': present, 'area': areas, 'color': colors, 'shape': shapes, 'centroid': cents,
          'extent': extent, 'stray': stray}


def judge_clip(video: np.ndarray, tracked: dict | None = None) -> dict:
  """Judges a [T, H, W, 3] clip (uint8 or float in [0, 255]) from pixels only.

  Returns {'color', 'shape', 'direction'} (a name or None), 'stable' (bool: present in every frame,
  steady area, colour and motion) and 'size' (bool: in every frame, the object's bounding box is the
  data's size, SIZE_RANGE within x/÷ 1.3). tracked: `track(video)` when the caller already has it.
  """
  tr = track(video) if tracked is None else tracked
  t = len(tr['present'])
  present, areas = tr['present'], tr['area']
  colors = [tr['color'][f] for f in np.flatnonzero(present)]
  shapes = [tr['shape'][f] for f in np.flatnonzero(present)]
  cents = [tuple(tr['centroid'][f]) for f in np.flatnonzero(present)]
  color = _vote(colors)
  direction = None
  if len(cents) >= 2:
    dy, dx = np.subtract(cents[-1], cents[0])
    if max(abs(dx), abs(dy)) >= _MIN_TRAVEL:
      if abs(dx) >= abs(dy):
        direction = 'right' if dx > 0 else 'left'
      else:
        direction = 'down' if dy > 0 else 'up'
  stable = bool(present.all())
  if stable:
    med = np.median(areas)
    steps = np.abs(np.diff(np.array(cents), axis=0)).max(axis=1)
    stable = bool(np.all(areas <= med * _AREA_FACTOR)
                  and np.all(areas >= med / _AREA_FACTOR)
                  and all(c == color for c in colors)
                  and np.all(steps <= max(_MAX_JUMP, 1.0 / (t - 1))))
  lo, hi = SIZE_RANGE[0] / _SIZE_FACTOR, SIZE_RANGE[1] * _SIZE_FACTOR
  extent = tr['extent']
  size = bool(present.all() and np.all((extent >= lo) & (extent <= hi)))
  return {'color': color, 'shape': _vote(shapes), 'direction': direction,
          'stable': stable, 'size': size}


def score(video: np.ndarray, prompt: str, tracked: dict | None = None) -> dict[str, bool]:
  """Per-attribute agreement of `judge_clip(video, tracked)` with a caption prompt."""
  color, shape, direction = parse_caption(prompt)
  j = judge_clip(video, tracked)
  return {'color': j['color'] == color, 'shape': j['shape'] == shape,
          'direction': j['direction'] == direction, 'stable': j['stable'], 'size': j['size']}

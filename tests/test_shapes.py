"""Tests for data_pipelines/shapes.py (captioned moving shapes + judge)."""

import collections
import hashlib

import grain
import numpy as np
import pytest

from data_pipelines import shapes as S

KEYS = ('color', 'shape', 'direction', 'stable', 'size')


def _source(t=12, h=32, w=32, **kw):
  return S.ShapesSource(num_frames=t, height=h, width=w, **kw)


def _motion_lo(rec):
  """[T] the object's lowest pixel index per frame along its caption's axis of motion."""
  horizontal = S.parse_caption(rec['caption'])[2] in ('left', 'right')
  return np.array([np.nonzero(m.any(0 if horizontal else 1))[0].min()
                   for m in (rec['video'] > 0).any(-1)])


def _digest(src, n=20):
  """sha256 of a source's first n records (videos and captions), to pin them across changes."""
  return hashlib.sha256(b''.join(src[i]['video'].tobytes() + src[i]['caption'].encode()
                                 for i in range(n))).hexdigest()


def _degrade(video, rng):
  """Gaussian noise (std 20, clipped to [0, 255]) then a 3x3 box blur."""
  x = np.clip(video.astype(np.float32) + rng.normal(0, 20, video.shape), 0, 255)
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  h, w = video.shape[1:3]
  return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _accuracy(src, n, rng=None):
  hits = dict.fromkeys(KEYS, 0)
  for i in range(n):
    rec = src[i]
    video = rec['video'] if rng is None else _degrade(rec['video'], rng)
    for k, ok in S.score(video, rec['caption']).items():
      hits[k] += ok
  return {k: v / n for k, v in hits.items()}


def test_caption_format_and_parse_roundtrip():
  assert S.caption('red', 'circle', 'left') == 'a red circle moving left'
  for c in S.COLORS:
    for s in S.SHAPES:
      for d in S.DIRECTIONS:
        assert S.parse_caption(S.caption(c, s, d)) == (c, s, d)


@pytest.mark.parametrize('text', [
    'a red circle moving', 'a red circle moving sideways', 'a pink circle moving up',
    'a red oval moving up', 'A red circle moving up', 'a red circle moving up.',
    ' a red circle moving up', 'a  red circle moving up', '', None])
def test_parse_caption_errors(text):
  with pytest.raises(ValueError):
    S.parse_caption(text)


def test_caption_rejects_unknown_names():
  with pytest.raises(ValueError, match='color'):
    S.caption('pink', 'circle', 'up')


def test_pairs():
  assert list(S.COLORS) == ['red', 'green', 'blue', 'yellow', 'cyan', 'magenta', 'white']
  assert S.COLORS['yellow'] == (255, 255, 0)
  every = S.pairs('all')
  assert len(every) == 21 and len(set(every)) == 21
  assert set(S.pairs('heldout')) == set(S.HELD_OUT_PAIRS)
  assert set(S.pairs('train')) == set(every) - set(S.HELD_OUT_PAIRS)
  with pytest.raises(ValueError, match='valid'):
    S.pairs('valid')


def test_split_correctness():
  held = set(S.HELD_OUT_PAIRS)
  seen = {}
  for split in ('train', 'heldout', 'all'):
    src = _source(2, 16, 16, split=split)
    seen[split] = {S.parse_caption(src[i]['caption']) for i in range(2000)}
  assert not {(c, s) for c, s, _ in seen['train']} & held
  assert {(c, s) for c, s, _ in seen['heldout']} == held
  assert {(c, s) for c, s, _ in seen['train']} == set(S.pairs('train'))
  assert {(c, s) for c, s, _ in seen['all']} == set(S.pairs('all'))
  assert {d for *_, d in seen['all']} == set(S.DIRECTIONS)


def test_determinism():
  a, b = _source(seed=3), _source(seed=3)
  for i in (0, 1, 12345, 2**31 - 2):
    ra, rb = a[i], b[np.int64(i)]
    assert ra['caption'] == rb['caption']
    np.testing.assert_array_equal(ra['video'], rb['video'])
  other_seed = _source(seed=4)
  assert any(not np.array_equal(a[i]['video'], other_seed[i]['video']) for i in range(5))
  assert any(not np.array_equal(a[i]['video'], a[i + 1]['video']) for i in range(5))


def test_source_protocol_and_validation():
  src = _source(4, 16, 16, split='heldout', seed=1, num_records=10)
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  assert len(src) == 10
  assert repr(src) == ('ShapesSource(num_frames=4, height=16, width=16, '
                       "split='heldout', seed=1, num_records=10, bounce=0.0, stop=0.0, rest=0.0)")
  rec = grain.MapDataset.source(src)[3]
  assert rec['video'].shape == (4, 16, 16, 3) and rec['video'].dtype == np.uint8
  with pytest.raises(IndexError):
    src[10]
  for kw, name in (({'t': 1}, 'num_frames'), ({'h': 15}, 'height'),
                   ({'w': 8}, 'width'), ({'split': 'test'}, 'test'),
                   ({'seed': -1}, 'seed'), ({'num_records': 0}, 'num_records'),
                   ({'bounce': 1.5}, 'bounce'), ({'stop': -0.1}, 'stop'),
                   ({'rest': 2.0}, 'rest'), ({'bounce': 0.6, 'stop': 0.6}, 'bounce \\+ stop'),
                   ({'stop': 0.6, 'rest': 0.6}, 'stop \\+ rest')):
    with pytest.raises(ValueError, match=name):
      _source(**kw)


@pytest.mark.parametrize('t,h,w', [(12, 32, 32), (8, 24, 48), (5, 40, 20), (2, 16, 16)])
def test_render_geometry(t, h, w):
  src = _source(t, h, w, split='all')
  for i in range(60):
    rec = src[i]
    video = rec['video']
    color, shape, direction = S.parse_caption(rec['caption'])
    assert video.shape == (t, h, w, 3) and video.dtype == np.uint8
    # Exact palette: every pixel is black or the caption colour.
    px = video.reshape(-1, 3)
    is_black = (px == 0).all(-1)
    assert ((px == S.COLORS[color]).all(-1) | is_black).all()
    mask = ~is_black.reshape(t, h, w)
    areas = mask.sum((1, 2))
    # Fully inside: the same (unclipped) object is drawn in every frame.
    assert areas.min() > 0 and areas.max() <= 1.1 * areas.min()
    boxes, cents = [], []
    for m in mask:
      ys, xs = np.nonzero(m)
      boxes.append((ys.max() - ys.min() + 1, xs.max() - xs.min() + 1))
      cents.append((ys.mean(), xs.mean()))
    assert len(set(boxes)) == 1
    # Bounding box ~40% of the short side (triangle may lose its apex row).
    assert 0.33 <= max(boxes[0]) / min(h, w) <= 0.47
    # Travel 30-50% of the frame along the motion axis, none across it.
    dy, dx = np.subtract(cents[-1], cents[0])
    along, across = (dx / w, dy / h) if direction in ('left', 'right') else (dy / h, dx / w)
    sign = 1 if direction in ('right', 'down') else -1
    assert 0.3 - 1e-9 <= sign * along <= 0.5 + 1e-9 and abs(across) < 1e-9
    if shape == 'triangle':  # apex up: top row narrower than bottom row
      rows = mask[0].sum(1)
      rows = rows[rows > 0]
      assert rows[0] <= 2 and rows[-1] == max(boxes[0])


@pytest.mark.parametrize('t,h,w', [(12, 32, 32), (16, 64, 64)])
def test_judge_clean_and_noisy(t, h, w):
  src = _source(t, h, w, split='all', seed=7)
  assert _accuracy(src, 200) == dict.fromkeys(KEYS, 1.0)
  noisy = _accuracy(src, 100, np.random.default_rng(0))
  assert min(noisy.values()) >= 0.95, noisy


def test_judge_unstable_clips():
  rng = np.random.default_rng(0)
  video = S.render_clip('green', 'circle', 'right', num_frames=12, height=32,
                        width=32, rng=rng)
  assert S.judge_clip(video)['stable']
  vanish = video.copy()
  vanish[6] = 0
  judged = S.judge_clip(vanish)
  assert not judged['stable'] and judged['color'] == 'green'
  recolor = video.copy()
  obj = recolor[6:].max(-1) > 0
  recolor[6:][obj] = S.COLORS['magenta']
  assert not S.judge_clip(recolor)['stable']
  empty = S.judge_clip(np.zeros((4, 16, 16, 3), np.float32))
  assert empty == {'color': None, 'shape': None, 'direction': None, 'stable': False,
                   'size': False}


def test_judge_size_is_the_datas():
  """'size': the object's bounding box in every frame is the data's (SIZE_RANGE x/÷ 1.3): a square
  grown to 75% of the frame, or shrunk to a fifth of it, is not, however stable."""
  rng = np.random.default_rng(0)
  video = S.render_clip('red', 'square', 'left', num_frames=12, height=32, width=32, rng=rng)
  assert S.judge_clip(video)['size']
  for side in (24, 6):
    other = np.zeros_like(video)
    for t in range(12):
      other[t, 4:4 + side, 2 + t // 2:2 + t // 2 + side] = S.COLORS['red']
    judged = S.judge_clip(other)
    assert judged['stable'] and judged['shape'] == 'square' and not judged['size'], side
  one_frame = video.copy()  # one ballooned frame is enough
  one_frame[5] = 0
  one_frame[5, 2:26, 2:26] = S.COLORS['red']
  assert not S.judge_clip(one_frame)['size']


@pytest.mark.parametrize('h,w', [(32, 32), (64, 64)])
def test_track_counts_stray_pixels_away_from_the_object(h, w):
  """'stray': the fraction of pixels lit (max channel > 48) farther than min(H, W) / 32 px from the
  object; rendered clips have none, and the blur halo at the object's edge is not counted."""
  src = _source(8, h, w, split='all')
  assert all(S.track(src[i]['video'])['stray'].max() == 0 for i in range(20))
  video = src[0]['video'].astype(np.float32)
  halo = (video + np.roll(video, 1, axis=1) + np.roll(video, -1, axis=2)) / 3  # 1-px smear
  assert S.track(halo)['stray'].max() == 0
  obj = S.track(video)['centroid'][0]
  far = (0, w - 1) if obj[1] < 0.5 else (0, 0)  # a corner away from the object
  speck = video.copy()
  speck[2, far[0], far[1]] = (0, 60, 0)  # dim but visible
  speck[3, far[0], far[1]] = (0, 40, 0)  # below the level
  stray = S.track(speck)['stray']
  assert stray[2] == 1 / (h * w) and stray[3] == 0 and stray.sum() == stray[2]


def test_score_mismatch():
  video = S.render_clip('cyan', 'square', 'up', num_frames=8, height=32, width=32,
                        rng=np.random.default_rng(1))
  assert S.score(video, 'a cyan square moving up') == dict.fromkeys(KEYS, True)
  assert S.score(video, 'a red triangle moving down') == {
      'color': False, 'shape': False, 'direction': False, 'stable': True, 'size': True}
  with pytest.raises(ValueError):
    S.score(video, 'a cyan square')


def test_largest_component_is_4_connected():
  m = np.zeros((2, 6, 6), bool)
  m[0, :2, :2] = True                      # 4 pixels
  m[0, 2, 2] = m[0, 3, 3] = m[0, 4, 4] = True  # diagonal: 3 separate pixels
  m[0, 5, :] = True                        # 6 pixels, joined to (4, 4) from below
  m[1, 0, 0] = True
  out = S._largest_components(m)
  assert out[0].sum() == 7 and out[0, 4, 4] and not out[0, 0, 0]
  assert out[1].sum() == 1


@pytest.mark.parametrize('t,h,w', [(12, 32, 32), (24, 32, 32), (8, 24, 48), (16, 40, 20)])
def test_bounce_geometry(t, h, w):
  """A bouncing clip: the whole object in every frame, one reversal where it touches a frame edge,
  the path length of a straight clip, first and net motion in the caption's direction (so the judge
  reads it as the caption)."""
  src = _source(t, h, w, split='all', bounce=1.0)
  for i in range(60):
    rec = src[i]
    color, shape, direction = S.parse_caption(rec['caption'])
    mask = (rec['video'] > 0).any(-1)
    areas = mask.sum((1, 2))
    assert areas.min() > 0 and areas.max() <= 1.1 * areas.min()
    horizontal = direction in ('left', 'right')
    axis_len = w if horizontal else h
    lo = np.array([np.nonzero(m.any(0 if horizontal else 1))[0].min() for m in mask])
    hi = np.array([np.nonzero(m.any(0 if horizontal else 1))[0].max() for m in mask])
    across = [np.nonzero(m.any(1 if horizontal else 0))[0].min() for m in mask]
    assert len(set(across)) == 1  # no motion across the axis
    steps = np.diff(lo)
    signs = np.sign(steps[steps != 0])
    assert (np.diff(signs) != 0).sum() == 1, (i, lo)  # exactly one reversal
    # The reflection falls between frames: the nearest frame is within one step of the edge.
    gap = min(lo.min(), axis_len - 1 - hi.max())
    assert gap <= np.abs(steps).max(), (i, lo, hi)
    path = np.abs(steps).sum()
    # A straight clip's travel; frames cut the corner at the turn by up to one step.
    step = np.floor(0.5 * axis_len) / (t - 1)
    assert np.ceil(0.3 * axis_len) - step - 1 <= path <= np.floor(0.5 * axis_len) + 1, (i, path)
    sign = 1 if direction in ('right', 'down') else -1
    assert sign * (lo[-1] - lo[0]) >= np.ceil(0.15 * axis_len) - 1
    assert np.sign(steps[steps != 0][0]) == sign  # the long leg first, as captioned
    assert S.score(rec['video'], rec['caption']) == dict.fromkeys(KEYS, True), (i, rec['caption'])


def test_bounce_fraction_and_straight_records_unchanged():
  def reverses(rec):
    steps = np.diff(_motion_lo(rec))
    return bool((np.diff(np.sign(steps[steps != 0])) != 0).any())

  mixed = _source(split='all', bounce=0.5)
  assert 75 <= sum(reverses(mixed[i]) for i in range(200)) <= 125
  # Two frames cannot show a bounce: such clips stay straight (and judged as captioned).
  two = _source(2, 16, 16, split='all', bounce=1.0)
  assert all(S.score(two[i]['video'], two[i]['caption'])['direction'] for i in range(50))
  # bounce=0 draws nothing extra: the records are those generated before bouncing existed (hash of
  # 20 records taken from the generator before the change).
  straight = _source(split='all', bounce=0.0)
  assert not any(reverses(straight[i]) for i in range(200))
  assert _digest(straight) == '0afed9a707d239a8aca992cee6a985c6becc82322821815247355713f86cdd7d'


@pytest.mark.parametrize('kind', ['stop', 'rest'])
@pytest.mark.parametrize('t,h,w', [(12, 32, 32), (24, 32, 32), (8, 24, 48), (16, 40, 20)])
def test_stop_and_rest_geometry(kind, t, h, w):
  """Stopping and resting clips: the whole object in every frame, never a step against the caption,
  a run at the straight clip's speed up to the edge ahead, then at rest against it to the last frame.
  stop: the run is at least 15% of the frame and at least one step of rest follows; judged as its
  caption. rest: the run is shorter than that, and a good share are at rest in every frame."""
  src = _source(t, h, w, split='all', **{kind: 1.0})
  still = 0
  for i in range(60):
    rec = src[i]
    direction = S.parse_caption(rec['caption'])[2]
    mask = (rec['video'] > 0).any(-1)
    areas = mask.sum((1, 2))
    assert areas.min() > 0 and areas.max() <= 1.1 * areas.min()
    horizontal = direction in ('left', 'right')
    axis_len = w if horizontal else h
    sign = 1 if direction in ('right', 'down') else -1
    lo = np.array([np.nonzero(m.any(0 if horizontal else 1))[0].min() for m in mask])
    hi = np.array([np.nonzero(m.any(0 if horizontal else 1))[0].max() for m in mask])
    across = [np.nonzero(m.any(1 if horizontal else 0))[0].min() for m in mask]
    assert len(set(across)) == 1
    steps = sign * np.diff(lo)
    assert (steps >= 0).all(), (i, lo)  # never against the caption
    moving = np.flatnonzero(steps > 0)
    rests_from = moving[-1] + 1 if moving.size else 0
    assert steps[-1] == 0 and (steps[rests_from:] == 0).all()  # at rest after the last move
    edge = axis_len - 1 - hi[-1] if sign > 0 else lo[-1]
    assert edge <= 1, (i, lo, hi)  # against the edge ahead (a triangle may lose its apex row)
    assert steps.max() <= np.floor(0.5 * axis_len) / (t - 1) + 1  # a straight clip's speed
    run = sign * (lo[-1] - lo[0])
    if kind == 'stop':
      assert run >= np.ceil(0.15 * axis_len) - 1
      assert S.score(rec['video'], rec['caption']) == dict.fromkeys(KEYS, True), (i, rec['caption'])
    else:
      assert run < np.ceil(0.15 * axis_len)
      still += not moving.size
  if kind == 'rest':
    assert 3 <= still <= 40, still  # r = 0 among [0, ceil(0.15 dim)) pixels to go


def test_edge_mix_fractions_and_bounce_records_unchanged():
  """bounce and stop fractions of one source; stop=0 keeps bouncing records as they were (hash of 20
  records taken before stopping clips existed)."""
  def kind(rec):
    steps = np.diff(_motion_lo(rec))
    if (np.diff(np.sign(steps[steps != 0])) != 0).any():
      return 'bounce'
    return 'stop' if steps[-1] == 0 else 'straight'

  mixed = _source(split='all', bounce=0.25, stop=0.25)
  counts = collections.Counter(kind(mixed[i]) for i in range(400))
  for name in ('bounce', 'stop', 'straight'):
    want = 200 if name == 'straight' else 100
    assert abs(counts[name] - want) <= 30, counts
  bouncing = _source(split='all', bounce=0.5)
  assert _digest(bouncing) == '55376f28332519623c1cb6f094e14fd8bdd0dda5d90dce7e4abde29a2d95b258'
  # rest=0 keeps stopping records (and the bounce+stop mix) as they were (taken before resting clips).
  for kw, want in (({'stop': 0.5}, 'a038edc9c1ed567610a9c41b90865c4a9f9694c2cbd2ee2b6de0a97ee9ee4479'),
                   ({'bounce': 0.25, 'stop': 0.25},
                    '82e52e15deb187324a8cd4e5c85f7675a169a012dcf3a2e60db6baa73522571b')):
    assert _digest(_source(split='all', **kw)) == want, kw
  for kw in ({'bounce': True, 'stop': True}, {'stop': True, 'rest': True}):
    with pytest.raises(ValueError, match='bounces, stops or rests'):
      S.render_clip('red', 'square', 'left', num_frames=12, height=32, width=32,
                    rng=np.random.default_rng(0), **kw)


def test_edge_mix_with_rest():
  """bounce, stop and rest fractions of one source: resting clips are those with a short run."""
  t, h, w = 12, 32, 48
  mixed = _source(t, h, w, split='all', bounce=0.2, stop=0.2, rest=0.2)

  def short_run(rec):  # net travel under 15% of the frame, less a pixel of snapping
    lo = _motion_lo(rec)
    horizontal = S.parse_caption(rec['caption'])[2] in ('left', 'right')
    return abs(lo[-1] - lo[0]) < np.ceil(0.15 * (w if horizontal else h)) - 1

  # 60 expected, less the resting clips whose run is just under 15% (up to a quarter of them).
  assert 30 <= sum(short_run(mixed[i]) for i in range(300)) <= 85

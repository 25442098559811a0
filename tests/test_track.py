"""Tracker behaviour on synthetic detections: identities, births and deaths, box accuracy."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.capture import Frame
from edge_agent.config import TrackConfig
from edge_agent.detect import Detection
from edge_agent.track import Track, Tracker, _hungarian, _median

FPS = 25.0
EVERY = 5
BLANK = np.zeros((360, 640, 3), np.uint8)
WIDE = np.zeros((360, 1280, 3), np.uint8)


def ts(i: int) -> float:
    return 1000.0 + i / FPS


def det(x: float, y: float, w: float = 60, h: float = 72, score: float = 0.9) -> Detection:
    return Detection((x, y, w, h), score, None)


def step(tr: Tracker, i: int, dets: list[Detection], image: np.ndarray = BLANK) -> list[Track]:
    """One frame; the detector only runs on every EVERY-th frame."""
    return tr.update(Frame(image, i, ts(i), ts(i)), dets if i % EVERY == 0 else None)


def centre(box: tuple[float, float, float, float]) -> np.ndarray:
    return np.array([box[0] + box[2] / 2, box[1] + box[3] / 2])


def nearest(tr: Tracker, box: tuple[float, float, float, float]) -> Track:
    return min(tr.tracks, key=lambda t: float(np.linalg.norm(centre(t.box) - centre(box))))


@pytest.fixture(scope="module")
def scene(faces_dir: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured background and two real face patches from a group photo."""
    img = cv2.imread(str(faces_dir / "scenes" / "ulfd_18.jpg"))
    assert img is not None
    return img[300:660, 0:640].copy(), [img[42:114, 215:275].copy(), img[51:123, 409:469].copy()]


def render(bg: np.ndarray, patches: list[np.ndarray], xys: list[tuple[float, float]]) -> np.ndarray:
    """Later patches occlude earlier ones, as a nearer face would."""
    out = bg.copy()
    for p, (x, y) in zip(patches, xys, strict=True):
        h, w = p.shape[:2]
        out[round(y):round(y) + h, round(x):round(x) + w] = p
    return out


@pytest.mark.parametrize("flow", [False, True])
def test_crossing_faces_keep_ids(flow: bool, scene: tuple[np.ndarray, list[np.ndarray]]) -> None:
    # At detection frame 25 A is 40 px left of B, at frame 30 40 px right: a tracker that matches
    # detections to where faces were (not where they are heading) swaps them.
    tr = Tracker(TrackConfig(optical_flow=flow))
    bg, patches = scene
    ids: dict[str, int] = {}
    overlapped = False
    for i in range(61):
        xa, xb = 80 + 8 * i, 520 - 8 * i
        boxes = {"A": (xa, 100, 60, 72), "B": (xb, 110, 60, 72)}
        overlapped |= abs(xa - xb) < 60
        image = render(bg, patches, [(xa, 100), (xb, 110)]) if flow else BLANK
        assert step(tr, i, [det(*b[:2]) for b in boxes.values()], image) == []
        if i == 10:
            ids = {k: nearest(tr, b).id for k, b in boxes.items()}
            assert len(set(ids.values())) == 2
        if i > 10:
            for k, b in boxes.items():
                t = nearest(tr, b)
                assert t.id == ids[k], f"frame {i}: face {k} took track {t.id}"
                assert np.abs(centre(t.box) - centre(b)).max() < 12
    assert overlapped
    assert sorted(t.id for t in tr.flush()) == sorted(ids.values())


@pytest.mark.parametrize("flow", [False, True])
def test_hidden_face_keeps_its_id_while_crossing(
    flow: bool, scene: tuple[np.ndarray, list[np.ndarray]],
) -> None:
    # B walks in just before it passes in front of A, so it has a single detection and no
    # known speed when the detector sees only B; that detection must not drag A's track along.
    tr = Tracker(TrackConfig(optical_flow=flow))
    bg, patches = scene
    hidden = 0
    for i in range(46):
        xa, xb = 80 + 8 * i, 440 - 6 * i
        boxes = {"A": (xa, 100, 60, 72)} | ({"B": (xb, 110, 60, 72)} if i >= 20 else {})
        image = render(bg, patches[:len(boxes)], [b[:2] for b in boxes.values()]) if flow \
            else BLANK
        dets = [det(*b[:2]) for k, b in boxes.items() if k == "B" or abs(xa - xb) >= 50]
        hidden += i % EVERY == 0 and "B" in boxes and len(dets) == 1
        assert step(tr, i, dets, image) == []
    assert hidden >= 1
    ids = {k: nearest(tr, b).id for k, b in boxes.items()}
    assert ids == {"A": 1, "B": 2} and len(tr.tracks) == 2


def test_a_false_detection_beside_a_face_does_not_freeze_its_track() -> None:
    tr = Tracker(TrackConfig(optical_flow=False))
    matched = []
    for i in range(200):
        dets = [det(200, 100)] + ([det(250, 100)] if i == 20 else [])
        step(tr, i, dets)
        if i % EVERY == 0 and i > 40:
            matched.append(tr.tracks[0].detection is not None)
    assert [t.id for t in tr.tracks] == [1]
    assert all(matched)


def test_face_leaving_the_view_ends_at_once() -> None:
    tr = Tracker(TrackConfig(optical_flow=False, max_unseen_s=5.0))
    ended: list[tuple[int, Track]] = []
    for i in range(40):
        x = 501 + 8 * i  # the centre crosses the right edge (640) at frame 14
        ended += [(i, t) for t in step(tr, i, [det(x, 100)] if x + 30 < 640 else [])]
    assert [i for i, _ in ended] == [14]


def test_fast_new_face_is_confirmed_and_kept() -> None:
    # 9 px/frame: consecutive detections overlap less than match_iou before any velocity is known.
    tr = Tracker(TrackConfig(optical_flow=False, match_iou=0.2))
    for i in range(41):
        step(tr, i, [det(20 + 9 * i, 100)])
        assert [t.id for t in tr.tracks] == [1]
        assert tr.tracks[0].confirmed == (i >= EVERY)


def test_missed_detections_keep_id() -> None:
    tr = Tracker(TrackConfig(optical_flow=False))
    first = None
    for i in range(61):
        x = 100 + 2 * i
        dets = [] if i in (25, 30) else [det(x, 80)]
        assert step(tr, i, dets) == []
        [t] = tr.tracks
        first = first or t.id
        assert t.id == first
        if i == 30:
            assert t.last_frame == 20 and t.detection is None
    assert t.hits == 13 - 2 and t.last_frame == 60 and t.detection is not None


def test_gone_face_ends_exactly_once() -> None:
    cfg = TrackConfig(optical_flow=False, max_unseen_s=0.5)
    tr = Tracker(cfg)
    ended: list[tuple[int, Track]] = []
    for i in range(80):
        ended += [(i, t) for t in step(tr, i, [det(200, 100, score=0.8)] if i <= 20 else [])]
    expected = next(i for i in range(21, 80) if ts(i) - ts(20) > cfg.max_unseen_s)
    assert [i for i, _ in ended] == [expected]
    t = ended[0][1]
    assert (t.confirmed, t.hits, t.first_frame, t.last_frame) == (True, 5, 0, 20)
    assert t.last_seen_ts == ts(20) and t.det_score == pytest.approx(0.8)
    assert tr.tracks == [] and tr.flush() == []


def test_spurious_detection_is_never_confirmed() -> None:
    tr = Tracker(TrackConfig(optical_flow=False))
    returned: list[Track] = []
    for i in range(60):
        dets = [det(100 + i, 80)] + ([det(400, 200)] if i == 10 else [])
        returned += step(tr, i, dets)
        if i == 10:
            assert len(tr.tracks) == 2 and sum(t.confirmed for t in tr.tracks) == 1
        if i == 15:  # missed its next detection
            assert len(tr.tracks) == 1
    assert len(tr.tracks) == 1
    returned += tr.flush()
    assert len(returned) == 1 and returned[0].first_frame == 0


def test_lone_detection_leaves_nothing() -> None:
    tr = Tracker(TrackConfig(optical_flow=False))
    assert step(tr, 0, [det(100, 80)]) == []
    assert [t.confirmed for t in tr.tracks] == [False]
    for i in range(1, 40):
        assert step(tr, i, []) == []
        assert len(tr.tracks) == (i < EVERY)
    assert tr.tracks == [] and tr.flush() == []


def test_new_face_after_end_gets_new_id() -> None:
    tr = Tracker(TrackConfig(optical_flow=False, max_unseen_s=0.3))
    ended: list[Track] = []
    for i in range(80):
        ended += step(tr, i, [det(200, 100)] if i <= 20 or i >= 50 else [])
    [old] = ended
    [new] = tr.flush()
    assert new.id != old.id and new.first_frame == 50 and new.confirmed


def test_flush_ends_confirmed_tracks_only() -> None:
    tr = Tracker(TrackConfig(optical_flow=False))
    for i in range(11):
        dets = [det(50, 50), det(300, 50)] + ([det(500, 200)] if i == 10 else [])
        assert step(tr, i, dets) == []
    assert len(tr.tracks) == 3
    assert sorted(t.box[0] for t in tr.flush()) == [50, 300]
    assert tr.tracks == [] and tr.flush() == []


def test_box_follows_moving_face_between_detections() -> None:
    tr = Tracker(TrackConfig(optical_flow=False))
    errors = []
    for i in range(61):
        box = (50 + 5 * i, 40 + 2 * i, 60 + 0.2 * i, 72 + 0.24 * i)
        step(tr, i, [det(*box)])
        [t] = tr.tracks
        if i >= 20:
            errors.append(np.abs(np.subtract(t.box, box)).max())
    assert max(errors) < 2.0  # holding the last detection would be up to 20 px off


def test_prediction_uses_timestamps_when_frames_drop() -> None:
    # A live source delivers frames irregularly; the face moves at a constant 150 px/s.
    tr = Tracker(TrackConfig(optical_flow=False))
    rng = random.Random(1)
    t_s, errors = 0.0, []
    for i in range(60):
        t_s += 0.04 * rng.choice([1, 1, 2, 3])
        box = (20 + 150 * t_s, 100.0, 60.0, 72.0)
        tr.update(Frame(WIDE, i, 1000.0 + t_s, t_s), [det(*box)] if i % 3 == 0 else None)
        if i >= 15:
            errors.append(abs(tr.tracks[0].box[0] - box[0]))
    assert max(errors) < 2.0


def test_flow_keeps_a_face_through_a_sharp_turn(
    scene: tuple[np.ndarray, list[np.ndarray]],
) -> None:
    # Right at 6 px/frame, then abruptly down-left from frame 27: the constant-velocity model
    # alone overshoots past its gate and loses the face; flow between detections follows it.
    bg, patches = scene

    def xy(i: int) -> tuple[float, float]:
        return (100 + 6 * i, 60.0) if i <= 27 else (262 - 5 * (i - 27), 60 + 4 * (i - 27))

    ids = {}
    for flow in (False, True):
        tr = Tracker(TrackConfig(optical_flow=flow))
        seen = set()
        for i in range(51):
            x, y = xy(i)
            step(tr, i, [det(x, y)], render(bg, patches[:1], [(x, y)]))
            seen |= {t.id for t in tr.tracks}
        ids[flow] = seen
    assert ids[True] == {1}
    assert len(ids[False]) > 1


def test_flow_does_not_keep_a_lost_face_alive(
    scene: tuple[np.ndarray, list[np.ndarray]],
) -> None:
    # The face turns away (no detections) but its texture stays put: flow keeps measuring it,
    # yet the track ends on max_unseen_s since its last detection.
    bg, patches = scene
    image = render(bg, patches[:1], [(200, 100)])
    cfg = TrackConfig(optical_flow=True, max_unseen_s=0.5)
    tr = Tracker(cfg)
    ended: list[tuple[int, Track]] = []
    for i in range(60):
        ended += [(i, t) for t in step(tr, i, [det(200, 100)] if i <= 10 else [], image)]
    expected = next(i for i in range(11, 60) if ts(i) - ts(10) > cfg.max_unseen_s)
    assert [i for i, _ in ended] == [expected]
    assert ended[0][1].last_frame == expected - 1


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 4)])
def test_hungarian_is_optimal(shape: tuple[int, int]) -> None:
    rng = random.Random(shape[0] * 10 + shape[1])
    n, m = shape
    for _ in range(30):
        cost = [[rng.choice([rng.random(), 1e6]) for _ in range(m)] for _ in range(n)]
        pairs = _hungarian(cost)
        assert len(pairs) == min(n, m)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)
        if n <= m:
            best = min(sum(cost[i][j] for i, j in enumerate(p))
                       for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[i][j] for j, i in enumerate(p))
                       for p in itertools.permutations(range(n), m))
        assert sum(cost[i][j] for i, j in pairs) == pytest.approx(best)


def test_setting_the_wall_clock_does_not_end_tracks() -> None:
    # A Pi without a clock battery gets its time from NTP minutes after boot.
    tr = Tracker(TrackConfig(optical_flow=False, max_unseen_s=1.0))
    ended = []
    for i in range(60):
        wall = ts(i) + (3600.0 if i >= 30 else 0.0)
        ended += tr.update(Frame(BLANK, i, wall, ts(i)), [det(200, 100)] if i % EVERY == 0
                           else None)
    assert ended == [] and [t.id for t in tr.tracks] == [1]


def test_face_leaving_by_the_edge_ends_when_the_detector_loses_it() -> None:
    # The detector stops finding the face once the border cuts it; its centre is still inside,
    # so only the exit rule ends it, at that run, not max_unseen_s later.
    tr = Tracker(TrackConfig(optical_flow=False, max_unseen_s=5.0))
    ended: list[tuple[int, Track]] = []
    for i in range(60):
        x = 400 + 8 * i
        dets = [det(x, 100)] if x + 60 <= 640 else []
        if i >= 40:  # the next person enters by that edge, walking back
            dets.append(det(640 - 60 - 8 * (i - 40), 110))
        ended += [(i, t) for t in step(tr, i, dets)]
    assert [(i, t.id) for i, t in ended] == [(25, 1)]
    assert [t.id for t in tr.tracks] == [2]


def test_a_coasting_face_does_not_come_back_going_the_other_way() -> None:
    # A strolls right and is lost for a run; B appears a little behind where A was last seen,
    # near enough to A's prediction to match, and strolls left. Same size, same colours: only
    # the motion rules tell them apart.
    tr = Tracker(TrackConfig(optical_flow=False, max_unseen_s=2.0))
    ids = set()
    for i in range(60):
        dets = [det(100 + 1.5 * i, 100)] if i <= 20 else []  # last seen at x 130
        if i >= 30:
            dets = [det(110 - 1.5 * (i - 30), 100)]
        step(tr, i, dets)
        if i % EVERY == 0 and i >= 30:
            ids |= {t.id for t in tr.tracks if t.detection is not None}
    assert ids == {2}


def test_another_face_where_one_vanished_gets_its_own_track(
    scene: tuple[np.ndarray, list[np.ndarray]],
) -> None:
    # A walks right and vanishes (through a doorway) at x 300; B, another face of the same size,
    # appears there half a second later and walks on the same way: motion and size agree, the
    # colours do not.
    bg, patches = scene
    tr = Tracker(TrackConfig(optical_flow=True, max_unseen_s=1.0))
    owner: dict[int, set[str]] = {}
    for i in range(60):
        faces = {"A": (140 + 8 * i, 100)} if i <= 20 else {}
        if i >= 27:
            faces = {"B": (300 + 8 * (i - 27), 100)}
        image = render(bg, [patches[0] if k == "A" else patches[1] for k in faces],
                       list(faces.values()))
        step(tr, i, [det(*xy) for xy in faces.values()], image)
        for k, xy in faces.items():
            for t in tr.tracks:
                if t.detection is not None and np.abs(centre(t.box) - centre((*xy, 60, 72))
                                                      ).max() < 20:
                    owner.setdefault(t.id, set()).add(k)
    assert all(len(v) == 1 for v in owner.values()), owner
    assert {k for v in owner.values() for k in v} == {"A", "B"}


def test_door_scene_keeps_one_person_per_track(faces_dir: Path, models_dir: Path,
                                              tmp_path: Path) -> None:
    """Generated door scene, every kind of episode once: followers out and in by the same edge,
    vanishing and appearing at the same spot (same way and back), crossing, close following.
    Every person gets exactly one track, none holds two, and the lines count the truth."""
    from devtools import counting, scenario

    scn = scenario.plan_followers(faces_dir, episodes=5, seed=21)
    clip = scenario.render(scn, faces_dir, tmp_path / "door.mp4", h264=True)
    score, _, _ = counting.run_scene(clip, scn, models_dir, {"classify": {"enabled": False}})
    assert score.mixed == 0 and score.found == len(scn.people), score.summary()
    assert score.duplicates == 0 and score.false_tracks == 0, score.summary()
    assert score.line_error == 0, score.summary()


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_flow_median_is_numpys(n: int) -> None:
    rows = np.random.default_rng(n).normal(0, 3, (n, 2)).astype(np.float32)
    assert np.allclose(_median(rows), np.median(rows, 0))

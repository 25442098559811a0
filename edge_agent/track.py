"""Multi-face tracking between detector runs.

Each face has a constant-velocity Kalman filter over (cx, cy, w, h) and their rates, with time in
seconds from ``Frame.mono`` so that live sources that drop frames still predict the right distance.
It is predicted every frame, corrected by the detection matched to it (optimal assignment on IoU,
gated by centre distance) and, between detections, by sparse optical flow inside its box.

One person per track: a track ends where its face leaves the picture, and a detection joins a
track only if it fits the track's motion, size and colours (`Tracker._gates`), so the next person
entering where the last one left does not inherit the track.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from edge_agent.capture import Frame
from edge_agent.config import TrackConfig
from edge_agent.detect import Detection

Box = tuple[float, float, float, float]

# Noise as fractions of the face height (rates per second): a near face moves more pixels.
_DET_STD = (0.04, 0.04, 0.06, 0.06)  # detector box jitter in cx, cy, w, h
_FLOW_STD = (0.03, 0.03, 1.0, 1.0)  # flow measures the shift only: its size is the prediction's
_ACCEL_STD = (3.0, 3.0, 1.0, 1.0)  # how fast heads change speed, per s^2
_VEL0_STD = (1.5, 1.5, 0.3, 0.3)  # a new face's unknown speed, per s

# A centre this close (in face sizes) matches even at low IoU. Tight once a track's velocity is
# known (a wide gate lets a passing face steal the track); wide for a new face moving off fast.
_GATE_DIST = 0.6
_GATE_NEW = 1.0
_MAX_DT = 1.0  # a longer gap (reconnect) would fling boxes; tracks end on max_unseen_s anyway
_DEFAULT_DT = 0.04  # until two frames with distinct timestamps give the interval
_MIN_PX = 2.0  # smallest box side: a shrinking prediction must not turn inside out
_INVALID = 1e6
_MAX_HIDDEN_RUNS = 2  # a crossing hides a face for a run or two; longer, it is a ghost

# Identity gates (one person per track). A detection joins a track only if it fits:
_MOTION_GATE = 13.8  # chi-square (2 dof, 99.9%) on the centre's Kalman innovation
_BACKTRACK = 0.25  # face sizes a coasting face may appear behind its last sighting (jitter)
_SIZE_COAST = 1.35  # size ratio a face may change by while unseen for a detector run or more
# Colours: on the generated door scenes (2 x 24 people, YuNet boxes every 5th frame, pairs up
# to 20 frames apart) the same face scored at most 0.255, two faces at least 0.29 (p1 0.34);
# hue x saturation histograms overlapped (same up to 0.54, others from 0.16). Between two runs
# a face on the real clip changed by up to 0.18, one in a generated crossing by 0.355.
_LOOK_GATE = 0.28  # Bhattacharyya distance between a track's colours and a detection's ...
_LOOK_GATE_SEEN = 0.45  # ... or, for a track seen at the last run, between two runs
_LOOK_SPAN = 0.5  # central part of the box whose colours identify the face
_LOOK_BINS = 8  # per B, G, R channel
_CROWD_DIST = 1.5  # face sizes: closer faces mix their colours into each other's boxes
_EXIT_SPEED = 0.3  # face sizes per second: slower than this, a face at the edge is not leaving

_FLOW_WIDTH = 320  # flow runs on a grey copy this wide: faces stay >= ~10 px, pyramids stay cheap
_FLOW_GRID = 4  # 4x4 points ...
_FLOW_SPAN = 0.6  # ... over the central part of the box, where the face is rather than background
_FLOW_FB_PX = 1.0  # forward-backward error allowed, in flow pixels
_FLOW_MIN_PTS = 6
_FLOW_GATE = 5.99  # chi-square, 2 degrees of freedom, 95%
_LK = {
    "winSize": (11, 11),
    "maxLevel": 2,
    "criteria": (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 10, 0.03),
}


def _new_kf() -> cv2.KalmanFilter:
    kf = cv2.KalmanFilter(8, 4)
    kf.measurementMatrix = np.eye(4, 8, dtype=np.float32)
    return kf


@dataclass(slots=True, eq=False)
class Track:
    id: int  # local counter, unique within this Tracker
    box: tuple[float, float, float, float]  # current estimate x, y, w, h (frame pixels)
    first_frame: int
    last_frame: int  # last frame with a measurement (detection or optical flow)
    last_seen_ts: float
    hits: int  # detections matched so far
    confirmed: bool
    det_score: float  # score of the last matched detection
    detection: Detection | None  # the detection matched in the current frame, else None
    last_det_ts: float = 0.0  # Frame.mono of the last detection: flow alone keeps no face alive
    occluded: bool = False  # hidden behind another face at the last detector run
    hidden_runs: int = 0  # detector runs in a row spent so: a false detection is no face
    misses: int = 0  # detector runs in a row without its face (coasting), occlusions aside
    first_seen_ts: float = 0.0  # Frame.ts of the first detection (wall clock), for dwell time
    last_centre: tuple[float, float] = (0.0, 0.0)  # centre of the last matched detection
    look: np.ndarray | None = field(default=None, repr=False)  # colours at the last match
    kf: cv2.KalmanFilter = field(default_factory=_new_kf, repr=False)


class Tracker:
    """Keeps face identities between detector runs and across short misses."""

    def __init__(self, cfg: TrackConfig) -> None:
        self._cfg = cfg
        self._live: list[Track] = []
        self._next_id = 1
        self._ts: float | None = None
        self._dt = 0.0
        self._f = np.eye(8, dtype=np.float32)
        self._q = np.zeros((8, 8), np.float32)
        self._r_det = np.diag(np.square(_DET_STD)).astype(np.float32)
        self._r_flow = np.diag(np.square(_FLOW_STD)).astype(np.float32)
        self._p0 = np.diag(np.square(_DET_STD + _VEL0_STD)).astype(np.float32)
        self._flow = _Flow() if cfg.optical_flow else None

    @property
    def tracks(self) -> list[Track]:
        """Live tracks, tentative and confirmed."""
        return list(self._live)

    @property
    def tracking(self) -> bool:
        """Whether any track is live; asked on every frame, so without copying the list."""
        return bool(self._live)

    def update(self, frame: Frame, detections: list[Detection] | None) -> list[Track]:
        """Advance one frame (`detections` is None on frames the detector skipped).
        Returns the confirmed tracks that ended in this step.

        Each rule is one step below."""
        self._advance(frame.mono)
        self._predict_all()
        gone = self._end_left_view(frame)
        new: list[tuple[Detection, np.ndarray | None]] = []
        if detections is not None:
            new = self._associate(detections, frame)
            gone += self._end_coasting_out(frame)
        gone += self._end_unseen(frame, detections is not None)
        self._follow_flow(frame, bool(new))
        self._refresh_boxes()
        self._birth_all(new, frame)
        return [t for t in gone if t.confirmed]

    def _predict_all(self) -> None:
        for t in self._live:
            t.detection = None
            t.occluded = False
            self._predict(t)

    def _drop(self, gone: list[Track]) -> list[Track]:
        if gone:
            self._live = [t for t in self._live if t not in gone]
        return gone

    def _end_left_view(self, frame: Frame) -> list[Track]:
        """Its centre left the view: the face is gone, whoever appears there next."""
        h, w = frame.image.shape[:2]
        return self._drop([t for t in self._live if not (
            0 <= t.kf.statePost[0, 0] < w and 0 <= t.kf.statePost[1, 0] < h)])

    def _end_coasting_out(self, frame: Frame) -> list[Track]:
        """A face the detector no longer finds while its box reaches past an edge it is heading
        for has left by that edge (detectors miss faces cut off by the border). Ending it now
        keeps the next person entering at the same spot from inheriting it."""
        h, w = frame.image.shape[:2]
        out = []
        for t in self._live:
            if t.detection is not None or t.occluded or t.hits < 2:
                continue
            cx, cy, bw, bh, vx, vy = t.kf.statePost[:6, 0].tolist()
            speed = _EXIT_SPEED * bh
            if ((cx - bw / 2 < 0 and vx < -speed) or (cx + bw / 2 > w and vx > speed)
                    or (cy - bh / 2 < 0 and vy < -speed) or (cy + bh / 2 > h and vy > speed)):
                out.append(t)
        return self._drop(out)

    def _end_unseen(self, frame: Frame, detector_ran: bool) -> list[Track]:
        """Unseen by the detector for `max_unseen_s`, or tentative and missed once."""
        limit = frame.mono - self._cfg.max_unseen_s
        return self._drop([t for t in self._live if t.last_det_ts < limit or (
            detector_ran and not t.confirmed and t.detection is None and not t.occluded)])

    def _follow_flow(self, frame: Frame, births: bool) -> None:
        if self._flow is not None and (self._live or births):
            self._flow.next_frame(frame.image)
            self._apply_flow(frame)

    def _refresh_boxes(self) -> None:
        for t in self._live:
            state = t.kf.statePost
            cx, cy, w, h = state[:4, 0].tolist()
            if min(w, h) < _MIN_PX:
                w, h = max(w, _MIN_PX), max(h, _MIN_PX)
                state[2:4, 0], state[6:, 0] = (w, h), 0
                t.kf.statePost = state
            t.box = (cx - w / 2, cy - h / 2, w, h)

    def _birth_all(self, dets: list[tuple[Detection, np.ndarray | None]], frame: Frame) -> None:
        for d, look in dets:
            self._live.append(self._birth(d, frame, look))

    def expire(self, mono: float) -> list[Track]:
        """End tracks unseen since `mono - max_unseen_s` (monotonic seconds) while no frames
        arrive (a stalled or reconnecting stream); returns the confirmed ones."""
        limit = mono - self._cfg.max_unseen_s
        gone = [t for t in self._live if t.last_det_ts < limit]
        if gone:
            self._live = [t for t in self._live if t not in gone]
        return [t for t in gone if t.confirmed]

    def flush(self) -> list[Track]:
        """End every confirmed track (the stream ended); returns them."""
        ended = [t for t in self._live if t.confirmed]
        self._live = []
        return ended

    def _advance(self, ts: float) -> None:
        """Rebuild the motion model only when the frame interval changes."""
        dt = self._dt if self._ts is None else ts - self._ts
        self._ts = ts
        dt = min(dt, _MAX_DT) if dt > 0 else self._dt or _DEFAULT_DT
        if abs(dt - self._dt) < 5e-4:
            return
        self._dt = dt
        self._f = np.eye(8, dtype=np.float32)
        self._f[range(4), range(4, 8)] = dt
        q = np.zeros((8, 8), np.float32)
        for i, a in enumerate(_ACCEL_STD):
            var = a * a
            q[i, i], q[i + 4, i + 4] = var * dt**4 / 4, var * dt * dt
            q[i, i + 4] = q[i + 4, i] = var * dt**3 / 2
        self._q = q

    def _predict(self, t: Track) -> None:
        kf = t.kf
        h = max(float(kf.statePost[3, 0]), 1.0)
        kf.transitionMatrix = self._f
        kf.processNoiseCov = self._q * (h * h)
        kf.predict()

    @staticmethod
    def _correct(t: Track, z: Box, r: np.ndarray) -> None:
        """`z` is cx, cy, w, h."""
        h = max(z[3], 1.0)
        t.kf.measurementNoiseCov = r * (h * h)
        t.kf.correct(np.array(z, np.float32).reshape(4, 1))

    def _birth(self, d: Detection, frame: Frame, look: np.ndarray | None) -> Track:
        x, y, w, h = d.box
        t = Track(id=self._next_id, box=d.box, first_frame=frame.index, last_frame=frame.index,
                  last_seen_ts=frame.ts, hits=1, confirmed=self._cfg.confirm_hits <= 1,
                  det_score=d.score, detection=d, last_det_ts=frame.mono,
                  first_seen_ts=frame.ts, last_centre=(x + w / 2, y + h / 2), look=look)
        self._next_id += 1
        state = np.array([x + w / 2, y + h / 2, w, h, 0, 0, 0, 0], np.float32)
        t.kf.statePost = state.reshape(8, 1)
        t.kf.errorCovPost = self._p0 * max(h * h, 1.0)
        return t

    def _associate(self, dets: list[Detection], frame: Frame
                   ) -> list[tuple[Detection, np.ndarray | None]]:
        """Corrects tracks with their optimally assigned detections; returns the unmatched ones
        with their colour histograms.

        When a detection could belong to two tracks and only one of them gets a detection, one
        face is hidden behind the other and the detection may be either's: neither learns from
        it (no correction, no chip to classify), both coast on their own motion and stay alive.
        Otherwise the occluder drags the hidden face's track along and identities swap."""
        looks = [colour_histogram(frame.image, d.box) for d in dets]
        live = self._live
        if not live or not dets:
            for t in live:
                t.misses += 1
            return list(zip(dets, looks, strict=True))
        valid, cost, ious = self._gates(live, dets, looks)
        pairs = [(i, j) for i, j in _hungarian(cost.tolist()) if valid[i, j]]
        matched = {i for i, _ in pairs}
        taken = [False] * len(dets)
        for i, j in pairs:
            taken[j] = True
            hidden = [k for k in range(len(live)) if k not in matched and valid[k, j]
                      and live[k].hidden_runs < _MAX_HIDDEN_RUNS]
            if hidden and live[i].hidden_runs < _MAX_HIDDEN_RUNS:
                for k in (i, *hidden):
                    live[k].last_det_ts = frame.mono
                    live[k].occluded = True
                    live[k].hidden_runs += 1
                continue
            others = np.delete(ious[:, j], i)  # another face overlapping taints the colours
            self._match(live[i], dets[j], None if (others > 0).any() else looks[j], frame)
        for i, t in enumerate(live):
            if i not in matched and not t.occluded:
                t.misses += 1
        return [(d, look) for d, look, k in zip(dets, looks, taken, strict=True) if not k]

    def _gates(self, live: list[Track], dets: list[Detection], looks: list[np.ndarray | None]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which (track, detection) pairs may match, their cost, and the IoU of each track's
        prediction with each detection. Rules, each on its own:
        - near: IoU with the prediction, or the centre within `_GATE_DIST` face sizes;
        - motion: the face is not found behind where it was last seen (a track heading right
          cannot continue as a face heading left); after a miss, also the centre's Kalman
          innovation within `_MOTION_GATE` (chi-square);
        - size: within a factor 2, or `_SIZE_COAST` after a miss;
        - looks: the colours of the face box must match those at the track's last match (a
          person who vanishes and another who appears at that spot between two detector runs
          differ here only); where other faces overlap the detection their colours mix in, so
          there only a track that missed a run is held to it (the occlusion rule above and
          motion decide for faces passing each other)."""
        pred = np.array([t.kf.statePost[:4, 0] for t in live], np.float64)
        db = np.array([d.box for d in dets], np.float64)
        tc, tsz = pred[:, :2], np.maximum(pred[:, 2:], _MIN_PX)
        tb = np.hstack([tc - tsz / 2, tsz])
        dc = db[:, :2] + db[:, 2:] / 2
        ious = iou(tb, db)
        dist = np.linalg.norm(tc[:, None] - dc[None], axis=2) / tsz.mean(1)[:, None]
        gate = np.array([_GATE_NEW if t.hits < 2 else _GATE_DIST for t in live])[:, None]
        near = (ious >= self._cfg.match_iou) | (dist <= gate)
        area = np.sqrt(np.prod(db[:, 2:], 1)[None] / np.prod(tsz, 1)[:, None])
        coasting = np.array([t.misses > 0 or t.hidden_runs > 0 for t in live])[:, None]
        size_max = np.where(coasting, _SIZE_COAST, 2.0)
        size = (area > 1 / size_max) & (area < size_max)
        valid = near & size
        crowded = _crowded(ious, db)
        for i, t in enumerate(live):
            for j in np.flatnonzero(valid[i]):
                valid[i, j] = self._fits_motion(t, dc[j]) and (
                    (crowded[j] and t.misses == 0)
                    or _same_look(t.look, looks[j], _LOOK_GATE if t.misses else _LOOK_GATE_SEEN))
        return valid, np.where(valid, 1 - ious + dist, _INVALID), ious

    def _fits_motion(self, t: Track, c: np.ndarray) -> bool:
        if t.hits < 2:
            return True  # no speed known yet
        kf = t.kf
        h = max(float(kf.statePost[3, 0]), 1.0)
        if t.misses or t.hidden_runs:  # seen at the last run: `near` is as tight
            s = kf.errorCovPost[:2, :2] + self._r_det[:2, :2] * (h * h)
            r = c.astype(np.float32) - kf.statePost[:2, 0]
            if float(r @ np.linalg.solve(s, r)) > _MOTION_GATE:
                return False
        v = kf.statePost[4:6, 0]
        speed = float(np.linalg.norm(v))
        if speed < _EXIT_SPEED * h:
            return True
        back = float((c - np.array(t.last_centre)) @ v) / speed
        return back >= -_BACKTRACK * h

    def _match(self, t: Track, d: Detection, look: np.ndarray | None, frame: Frame) -> None:
        t.hidden_runs = t.misses = 0
        x, y, w, h = d.box
        self._correct(t, _leaving_box(t, d.box, frame.image.shape), self._r_det)
        t.detection, t.det_score = d, d.score
        t.hits += 1
        t.confirmed = t.confirmed or t.hits >= self._cfg.confirm_hits
        t.last_frame, t.last_seen_ts = frame.index, frame.ts
        t.last_det_ts = frame.mono
        t.last_centre = (x + w / 2, y + h / 2)
        if look is not None:
            t.look = look  # the latest: a face changes slowly (turning, light), people abruptly

    def _apply_flow(self, frame: Frame) -> None:
        """Corrects unmatched tracks by flow, except where faces overlap and flow cannot tell
        which face the points belong to."""
        assert self._flow is not None
        todo = [t for t in self._live if t.detection is None]
        if len(self._live) > 1 and todo:
            boxes = np.array([t.box for t in self._live])
            overlap = iou(boxes, boxes)
            np.fill_diagonal(overlap, 0)
            todo = [t for t, o in zip(self._live, overlap.max(1), strict=True)
                    if o <= 0 and t.detection is None]
        if not todo:
            return
        for t, c in zip(todo, self._flow.measure([t.box for t in todo]), strict=True):
            if c is not None and self._plausible(t, c):
                _, _, w, h = t.kf.statePost[:4, 0].tolist()
                self._correct(t, (*c, w, h), self._r_flow)
                t.last_frame, t.last_seen_ts = frame.index, frame.ts

    def _plausible(self, t: Track, c: tuple[float, float]) -> bool:
        """Flow that disagrees with the track's own motion has latched onto something else,
        typically a face passing in front: chi-square gate on the predicted centre."""
        kf = t.kf
        h = max(float(kf.statePost[3, 0]), 1.0)
        s = kf.errorCovPost[:2, :2] + self._r_flow[:2, :2] * (h * h)
        r = np.array(c, np.float32) - kf.statePost[:2, 0]
        return float(r @ np.linalg.solve(s, r)) <= _FLOW_GATE


class _Flow:
    """Lucas-Kanade on a grid inside each box, forward-backward checked; the median displacement
    is the box's. (Estimating scale too made boxes worse on the real clip.)"""

    def __init__(self) -> None:
        self._prev: np.ndarray | None = None
        self._cur: np.ndarray | None = None
        self._small: np.ndarray | None = None
        self._scale = 1.0
        g = np.linspace(-_FLOW_SPAN / 2, _FLOW_SPAN / 2, _FLOW_GRID, dtype=np.float32)
        self._grid = np.stack(np.meshgrid(g, g), -1).reshape(1, -1, 2)

    def next_frame(self, image: np.ndarray) -> None:
        """Grey, downscaled copy of the frame, into reused buffers."""
        h, w = image.shape[:2]
        self._scale = s = min(1.0, _FLOW_WIDTH / w)
        if s < 1:
            size = (round(w * s), round(h * s))
            image = self._small = cv2.resize(image, size, dst=self._small,
                                             interpolation=cv2.INTER_LINEAR)
        self._prev, self._cur = self._cur, self._prev
        self._cur = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY, dst=self._cur)

    def measure(self, boxes: list[Box]) -> list[tuple[float, float] | None]:
        """The centre of each box moved from the previous frame to this one; None where the
        points got lost."""
        prev, cur, s = self._prev, self._cur, self._scale
        if prev is None or cur is None or prev.shape != cur.shape:
            return [None] * len(boxes)
        b = np.array(boxes, np.float32) * s
        c = b[:, None, :2] + b[:, None, 2:] / 2
        p0 = (c + self._grid * b[:, None, 2:]).reshape(-1, 1, 2)
        # nextPts=None: OpenCV allocates it (its stubs omit that overload)
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(prev, cur, p0, None, **_LK)  # type: ignore[call-overload]
        back, st2, _ = cv2.calcOpticalFlowPyrLK(cur, prev, p1, None, **_LK)  # type: ignore[call-overload]
        fb = np.abs(back - p0).max(2)[:, 0]
        good = ((st1[:, 0] & st2[:, 0]) > 0) & (fb < _FLOW_FB_PX)
        n = self._grid.shape[1]
        good = good.reshape(-1, n)
        p0, p1 = p0.reshape(-1, n, 2), p1.reshape(-1, n, 2)
        out: list[tuple[float, float] | None] = []
        for k, (x, y, w, h) in enumerate(boxes):
            g = good[k]
            if g.sum() < _FLOW_MIN_PTS:
                out.append(None)
                continue
            dx, dy = (_median(p1[k, g] - p0[k, g]) / s).tolist()
            out.append((x + w / 2 + dx, y + h / 2 + dy))
        return out


def _median(rows: np.ndarray) -> np.ndarray:
    """Per-column median, as np.median gives it: np.median imports numpy.ma on first use (1.3 MB
    of RSS) and costs 0.15 ms a call."""
    s = np.sort(rows, 0)
    n = len(s)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def _leaving_box(t: Track, box: Box, shape: tuple[int, ...]) -> Box:
    """The measurement (cx, cy, w, h) of a detection. Where the border cuts the box of a face
    heading out (the detector clips it there), the box holds only the part in view, its centre
    lags behind the face's and would turn the track round: along that axis the prediction
    stands."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    px, py, pw, ph, vx, vy = t.kf.statePost[:6, 0].tolist()
    fh, fw = shape[:2]
    if (abs(x) < 1 and vx < 0) or (abs(x + w - fw) < 1 and vx > 0):
        cx, w = px, pw
    if (abs(y) < 1 and vy < 0) or (abs(y + h - fh) < 1 and vy > 0):
        cy, h = py, ph
    return cx, cy, w, h


def colour_histogram(image: np.ndarray, box: Box) -> np.ndarray | None:
    """Colour histogram (normalised to sum 1) of the central part of a face box, a cheap
    signature that tells two people apart; None for a face cut off by the border (the box
    covers only the part in view, so its centre is elsewhere on the face)."""
    x, y, w, h = box
    m = (1 - _LOOK_SPAN) / 2
    fh, fw = image.shape[:2]
    if x < 1 or y < 1 or x + w > fw - 1 or y + h > fh - 1:
        return None
    x0, y0 = max(int(x + m * w), 0), max(int(y + m * h), 0)
    x1, y1 = min(int(x + (1 - m) * w), fw), min(int(y + (1 - m) * h), fh)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return None
    hist = cv2.calcHist([image[y0:y1, x0:x1]], [0, 1, 2], None, [_LOOK_BINS] * 3, [0, 256] * 3)
    return hist / max(float(hist.sum()), 1.0)


def _crowded(ious: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Per detection: another face is close (another track's prediction overlaps it, or
    another detection is within `_CROWD_DIST` face sizes), so colours may mix."""
    c = db[:, :2] + db[:, 2:] / 2
    d = np.linalg.norm(c[:, None] - c[None], axis=2) / db[:, 2:].mean(1)[:, None]
    np.fill_diagonal(d, np.inf)
    return ((ious > 0).sum(0) > 1) | (d.min(1, initial=np.inf) < _CROWD_DIST)


def _same_look(a: np.ndarray | None, b: np.ndarray | None, gate: float) -> bool:
    if a is None or b is None:
        return True
    return cv2.compareHist(a, b, cv2.HISTCMP_BHATTACHARYYA) <= gate


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of x, y, w, h boxes, shape (len(a), len(b))."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, :2] + a[:, None, 2:], b[None, :, :2] + b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), 2)
    union = np.prod(a[:, 2:], 1)[:, None] + np.prod(b[:, 2:], 1)[None] - inter
    return inter / np.maximum(union, 1e-9)


def _hungarian(cost: list[list[float]]) -> list[tuple[int, int]]:
    """Minimum-cost assignment (Kuhn-Munkres, O(n^2 m)); pairs (row, column)."""
    n, m = len(cost), len(cost[0])
    if n > m:
        return [(i, j) for j, i in _hungarian([list(c) for c in zip(*cost, strict=True)])]
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    p, way = [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while p[j0]:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    c = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if c < minv[j]:
                        minv[j], way[j] = c, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return [(p[j] - 1, j - 1) for j in range(1, m + 1) if p[j]]

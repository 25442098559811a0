"""Face events (docs/contract.md): `new` once per confirmed and classified track, `update` when its
gender or age bucket changes, `cross` when it crosses a counting line, `end` once (with the
dwell time) when it is lost or the stream ends."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from edge_agent.capture import Frame
from edge_agent.classify import Attributes
from edge_agent.track import Track


class Sighting(NamedTuple):
    """The frame an event describes: the last one in which the detector saw the face."""

    ts: float
    frame: int
    box: tuple[float, float, float, float]


@dataclass(slots=True)
class Face:
    """What the event stream remembers of one track."""

    announced: bool = False
    published: tuple[str | None, str | None] = (None, None)  # gender, age bucket last sent
    since_confirm: int = 0  # detector matches after confirmation, to bound the wait for chips
    last: Sighting | None = None


class EventBuilder:
    """Decides when a track deserves an event and builds its payload (without `seq`, which the
    spool assigns)."""

    def __init__(self, device: str, camera: str, run_id: str, classify: bool,
                 max_wait: int = 2) -> None:
        self.device = device
        self.camera = camera
        self.run_id = run_id
        self.classify = classify
        self.max_wait = max_wait
        self.faces: dict[int, Face] = {}
        self.frame_size = (0, 0)

    def face(self, track: Track) -> Face:
        f = self.faces.get(track.id)
        if f is None:
            f = self.faces[track.id] = Face()
        return f

    def announced(self, track: Track) -> bool:
        f = self.faces.get(track.id)
        return f is not None and f.announced

    def seen(self, track: Track, frame: Frame, attrs: Attributes | None,
             changed: bool) -> dict[str, Any] | None:
        """Call once per detector run for each confirmed track with its answer so far;
        `changed` says a chip was added."""
        face = self.face(track)
        if track.detection is not None:
            face.last = Sighting(frame.ts, frame.index, track.detection.box)
            self.frame_size = frame.image.shape[1::-1]
        if not face.announced:
            if track.detection is not None:
                face.since_confirm += 1
            ready = not self.classify or attrs is not None or face.since_confirm > self.max_wait
            return self._emit("new", track, face, attrs) if ready else None
        if changed and attrs is not None and (attrs.gender, attrs.age_bucket) != face.published:
            return self._emit("update", track, face, attrs)
        return None

    def ended(self, track: Track, attrs: Attributes | None,
              crossings: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
        """`end` for a confirmed track, preceded by its `new` if it never got one and by the
        (line, direction) crossings that waited for that `new`."""
        face = self.face(track)
        del self.faces[track.id]
        out = []
        if not face.announced:
            out.append(self._emit("new", track, face, attrs))
        out += [self.crossed(track, None, attrs, line, d) for line, d in crossings]
        end = self._emit("end", track, face, attrs)
        last_ts = face.last.ts if face.last else track.last_seen_ts
        end["dwell_s"] = round(max(last_ts - track.first_seen_ts, 0.0), 3)
        out.append(end)
        return out

    def crossed(self, track: Track, frame: Frame | None, attrs: Attributes | None, line: str,
                direction: str) -> dict[str, Any]:
        """`cross`: the track's face (in `frame`, else at its last sighting) crossed `line`."""
        face = self.face(track)
        if frame is not None:
            self.frame_size = frame.image.shape[1::-1]
        at = None if frame is None else Sighting(frame.ts, frame.index, track.box)
        ev = self._emit("cross", track, face, attrs, at)
        ev["line"], ev["direction"] = line, direction
        return ev

    def forget_missing(self, live: set[int]) -> None:
        """Drop state of tracks that died tentative, so nothing accumulates."""
        for tid in [t for t in self.faces if t not in live]:
            del self.faces[tid]

    def track_id(self, track: Track) -> str:
        return f"{self.run_id}-{track.id}"

    def _emit(self, kind: str, track: Track, face: Face, attrs: Attributes | None,
              at: Sighting | None = None) -> dict[str, Any]:
        if kind != "cross":
            face.announced = True
            if attrs is not None:
                face.published = (attrs.gender, attrs.age_bucket)
        last = at or face.last or Sighting(track.last_seen_ts, track.last_frame, track.box)
        return {
            "type": kind,
            "track_id": self.track_id(track),
            "device": self.device,
            "camera": self.camera,
            "ts": round(last.ts, 3),
            "frame": last.frame,
            "frame_size": list(self.frame_size),
            "box": _clip(last.box, self.frame_size),
            "first_frame": track.first_frame,
            "last_frame": track.last_frame,
            "gender": attrs.gender if attrs else None,
            "gender_score": round(attrs.gender_score, 3) if attrs else 0.0,
            "age": round(attrs.age, 1) if attrs and attrs.age is not None else None,
            "age_bucket": attrs.age_bucket if attrs else None,
            "det_score": round(track.det_score, 3),
        }


def _clip(box: tuple[float, float, float, float], size: tuple[int, int]) -> list[int]:
    """Whole pixels inside the frame: a tracked box may reach past the edge."""
    x, y, w, h = box
    fw, fh = size
    x0, y0 = max(round(x), 0), max(round(y), 0)
    x1, y1 = round(x + w), round(y + h)
    if fw and fh:
        x1, y1 = min(x1, fw), min(y1, fh)
    return [x0, y0, max(x1 - x0, 0), max(y1 - y0, 0)]

"""Counting: line crossings per track, and the day's totals published on ``T/counts``.

Direction (docs/contract.md, "Counting"): standing on `a` and facing `b`, a face whose centre
crosses the segment from the left-hand side to the right-hand side is `in`; the other way `out`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from edge_agent.classify import AGE_BUCKETS
from edge_agent.config import LineConfig
from edge_agent.track import Track

log = logging.getLogger(__name__)

# A centre must be this far (face heights) from the line to be on a side: jitter on the line
# never flips the side back and forth, so it never counts twice.
_HYSTERESIS = 0.15
_MIN_BAND_PX = 2.0


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


@dataclass(frozen=True, slots=True)
class Crossing:
    track: Track
    line: str
    direction: Direction


@dataclass(slots=True)
class _Side:
    """One track against one line: the side it was last firmly on, and where."""

    side: int  # -1 left of a->b, +1 right
    x: float
    y: float
    last: Direction | None = None  # the last direction counted


@dataclass(slots=True)
class _TrackState:
    sides: dict[str, _Side] = field(default_factory=dict)
    pending: list[Crossing] = field(default_factory=list)  # crossed before it was announced


class LineCounter:
    """Owns the per-track line state: which side of each line a face is on, and which
    crossings it has been counted for."""

    def __init__(self, lines: Iterable[LineConfig] = ()) -> None:
        self._lines: tuple[LineConfig, ...] = ()
        self._px: list[tuple[str, float, float, float, float, float]] = []
        self._size = (0, 0)
        self._tracks: dict[int, _TrackState] = {}
        self.configure(lines)

    @property
    def lines(self) -> tuple[LineConfig, ...]:
        return self._lines

    def configure(self, lines: Iterable[LineConfig]) -> None:
        """New lines (a reload): what tracks knew of the old ones is forgotten."""
        self._lines = tuple(lines)
        self._size = (0, 0)
        for st in self._tracks.values():
            st.sides.clear()

    def _geometry(self, width: int, height: int) -> None:
        """Lines in pixels for this frame size: (name, ax, ay, dx, dy, length)."""
        self._size = (width, height)
        self._px = []
        for ln in self._lines:
            ax, ay = ln.a[0] * width, ln.a[1] * height
            dx, dy = ln.b[0] * width - ax, ln.b[1] * height - ay
            self._px.append((ln.name, ax, ay, dx, dy, max((dx * dx + dy * dy) ** 0.5, 1e-9)))

    def update(self, tracks: Iterable[Track], frame_index: int, width: int, height: int,
               announced: Callable[[Track], bool]) -> list[Crossing]:
        """Follow every track measured in this frame (by detection or flow: a coasting track's
        prediction may run on past where its face vanished); returns the crossings of announced
        tracks (those of a track not yet announced wait for it)."""
        if not self._lines:
            return []
        if (width, height) != self._size:
            self._geometry(width, height)
        out: list[Crossing] = []
        for t in tracks:
            if t.last_frame != frame_index:
                continue
            st = self._tracks.get(t.id)
            if st is None:
                st = self._tracks[t.id] = _TrackState()
            x, y, w, h = t.box
            cx, cy = x + w / 2, y + h / 2
            band = max(_HYSTERESIS * h, _MIN_BAND_PX)
            for name, ax, ay, dx, dy, length in self._px:
                dist = (dx * (cy - ay) - dy * (cx - ax)) / length  # > 0: right-hand side
                if abs(dist) < band:
                    continue
                side = 1 if dist > 0 else -1
                prev = st.sides.get(name)
                if prev is None:
                    st.sides[name] = _Side(side, cx, cy)
                    continue
                if side != prev.side and _through_segment(prev.x, prev.y, cx, cy,
                                                          ax, ay, dx, dy):
                    d = Direction.IN if side > 0 else Direction.OUT
                    if d != prev.last:
                        prev.last = d
                        st.pending.append(Crossing(t, name, d))
                prev.side, prev.x, prev.y = side, cx, cy
            if st.pending and announced(t):
                out += st.pending
                st.pending = []
        return out

    def ended(self, track: Track) -> list[Crossing]:
        """Forget a track; returns its crossings still waiting for its announcement."""
        st = self._tracks.pop(track.id, None)
        return st.pending if st else []

    def forget_missing(self, live: set[int]) -> None:
        for tid in [t for t in self._tracks if t not in live]:
            del self._tracks[tid]


def _through_segment(x0: float, y0: float, x1: float, y1: float,
                     ax: float, ay: float, dx: float, dy: float) -> bool:
    """Whether the path (x0, y0) -> (x1, y1), which changes side, meets the segment itself
    rather than the infinite line beyond its ends."""
    px, py = x1 - x0, y1 - y0
    den = px * dy - py * dx
    if den == 0:
        return False
    u = ((ax - x0) * py - (ay - y0) * px) / den  # along a -> b
    return 0.0 <= u <= 1.0


class KeyValue(Protocol):
    def get_value(self, key: str) -> str | None: ...

    def put_value(self, key: str, value: str) -> None: ...


_STORE_KEY = "counts"


class DailyTotals:
    """The current local day's totals (``T/counts``), and the last face seen (``T/state``).

    `people` counts `new` events; each person's gender and age bucket count once, moved by
    `update` and `end` when the answer changes. Kept in `store` (the spool database) on every
    change, so a restart on the same day carries on. The day is the local calendar date of the
    wall clock, so the reset falls on local midnight whatever DST does to the day's length.
    """

    def __init__(self, store: KeyValue | None = None,
                 publish: Callable[[str], object] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        self._store = store
        self._publish = publish
        self._wall = wall
        self._persons: dict[str, tuple[str, str]] = {}  # track_id -> (gender, bucket) counted
        self.last_face: dict[str, Any] = {}
        self._next_check = 0.0
        self.counts = self._empty(_day(wall()))
        saved = self._load()
        if saved is not None and saved.get("day") == self.counts["day"]:
            self.counts = saved

    def _load(self) -> dict[str, Any] | None:
        if self._store is None:
            return None
        try:
            raw = self._store.get_value(_STORE_KEY)
            return json.loads(raw) if raw else None
        except (OSError, ValueError, sqlite3.Error) as e:
            log.warning("could not read the saved counts, starting from zero: %s", e)
            return None

    @staticmethod
    def _empty(day: str) -> dict[str, Any]:
        return {"ts": 0.0, "day": day, "people": 0,
                "gender": {"male": 0, "female": 0, "unknown": 0},
                "age_bucket": dict.fromkeys((*AGE_BUCKETS, "unknown"), 0), "lines": {}}

    @property
    def people(self) -> int:
        return int(self.counts["people"])

    def set_lines(self, names: Iterable[str]) -> None:
        """Lines show in the totals from the start, at zero."""
        lines = self.counts["lines"]
        added = [n for n in names if n not in lines]
        for n in added:
            lines[n] = {"in": 0, "out": 0}
        if added:
            self._changed()

    def record(self, event: dict[str, Any]) -> None:
        """Account one event (any type) just published."""
        self.tick()
        kind = event["type"]
        if kind != "end" and event.get("gender") is not None:
            self.last_face = {"gender": event["gender"], "age": event["age"],
                              "age_bucket": event["age_bucket"]}
        tid = event["track_id"]
        attrs = (event.get("gender") or "unknown", event.get("age_bucket") or "unknown")
        if kind == "new":
            self.counts["people"] += 1
            self._count(attrs, +1)
            self._persons[tid] = attrs
        elif kind in ("update", "end") and tid in self._persons:
            before = self._persons[tid]
            if attrs != before:
                self._count(before, -1)
                self._count(attrs, +1)
                self._persons[tid] = attrs
            if kind == "end":
                del self._persons[tid]
            if attrs == before:
                return
        elif kind == "cross":
            line = self.counts["lines"].setdefault(event["line"], {"in": 0, "out": 0})
            line[event["direction"]] += 1
        else:
            return
        self._changed()

    def _count(self, attrs: tuple[str, str], n: int) -> None:
        gender, bucket = attrs
        g, a = self.counts["gender"], self.counts["age_bucket"]
        g[gender] = g.get(gender, 0) + n
        a[bucket] = a.get(bucket, 0) + n

    def tick(self) -> None:
        """Start a new day at local midnight (checked at most once a second)."""
        now = self._wall()
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        day = _day(now)
        if day != self.counts["day"]:
            lines = {n: {"in": 0, "out": 0} for n in self.counts["lines"]}
            self.counts = self._empty(day)
            self.counts["lines"] = lines
            self._persons.clear()
            self._changed()

    def payload(self) -> str:
        return json.dumps(self.counts, separators=(",", ":"))

    def _changed(self) -> None:
        self.counts["ts"] = round(self._wall(), 3)
        payload = self.payload()
        if self._store is not None:
            try:
                self._store.put_value(_STORE_KEY, payload)
            except (OSError, ValueError, sqlite3.Error) as e:
                log.warning("could not save the counts: %s", e)
        self.publish()

    def publish(self) -> None:
        """Send the totals now (also after a new publisher was built)."""
        if self._publish is not None:
            self._publish(self.payload())


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(ts))

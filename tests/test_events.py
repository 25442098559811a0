"""Event building: when `new`, `update` and `end` are emitted and what they carry."""

from __future__ import annotations

import numpy as np

from edge_agent.capture import Frame
from edge_agent.classify import Attributes, TrackAttributes
from edge_agent.detect import Detection
from edge_agent.events import EventBuilder
from edge_agent.track import Track

IMAGE = np.zeros((480, 640, 3), np.uint8)
FIELDS = {"type", "track_id", "device", "camera", "ts", "frame", "frame_size", "box",
          "first_frame", "last_frame", "gender", "gender_score", "age", "age_bucket", "det_score"}


def ages_at(age: int) -> np.ndarray:
    p = np.full(81, 1e-6, np.float32)
    p[age] = 1.0
    return p / p.sum()


def track(confirmed: bool = True, frame: int = 10) -> Track:
    det = Detection((100.4, 50.6, 80.0, 96.0), 0.93, None)
    return Track(id=7, box=(100.0, 50.0, 80.0, 96.0), first_frame=5, last_frame=frame,
                 last_seen_ts=1000.0 + frame / 15, hits=2, confirmed=confirmed, det_score=0.93,
                 detection=det)


def frame(i: int) -> Frame:
    return Frame(IMAGE, i, 1000.0 + i / 15, i / 15)


def builder(classify: bool = True) -> EventBuilder:
    return EventBuilder("pi-1", "door", "run1", classify=classify)


def votes() -> TrackAttributes:
    return TrackAttributes(samples=3, window=8)


def none() -> Attributes | None:
    return None


def test_new_waits_for_a_chip_then_carries_every_contract_field() -> None:
    b, t = builder(), track()
    assert b.seen(t, frame(10), none(), changed=False) is None  # confirmed, not classified
    v = votes()
    v.add(0.9, 0.95, ages_at(30))
    ev = b.seen(t, frame(10), v.result(), changed=True)
    assert ev is not None and set(ev) == FIELDS
    assert ev["type"] == "new" and ev["track_id"] == "run1-7"
    assert (ev["device"], ev["camera"]) == ("pi-1", "door")
    assert ev["frame"] == 10 and ev["frame_size"] == [640, 480]
    assert ev["box"] == [100, 51, 80, 96] and all(isinstance(v, int) for v in ev["box"])
    assert (ev["first_frame"], ev["last_frame"]) == (5, 10)
    assert ev["gender"] == "male" and 0.9 < ev["gender_score"] <= 1.0
    assert abs(ev["age"] - 30) < 0.5 and ev["age_bucket"] == "25-34"
    assert ev["det_score"] == 0.93 and abs(ev["ts"] - (1000 + 10 / 15)) < 1e-3


def test_box_is_clipped_to_the_frame() -> None:
    b, t = builder(classify=False), track()
    assert t.detection is not None
    t.detection.box = (-6.0, 430.0, 80.0, 96.0)
    ev = b.seen(t, frame(10), none(), changed=False)
    assert ev is not None and ev["box"] == [0, 430, 74, 50]


def test_update_only_when_gender_or_bucket_changes() -> None:
    b, t = builder(), track()
    v = votes()
    v.add(0.9, 0.9, ages_at(30))
    assert b.seen(t, frame(10), v.result(), changed=True)["type"] == "new"
    v.add(0.8, 0.9, ages_at(31))
    assert b.seen(t, frame(15), v.result(), changed=True) is None  # same gender and bucket
    assert b.seen(t, frame(16), v.result(), changed=False) is None
    v.add(1.0, 0.9, ages_at(60))
    v.add(1.0, 0.9, ages_at(60))
    ev = b.seen(t, frame(20), v.result(), changed=True)
    assert ev is not None and ev["type"] == "update" and ev["age_bucket"] != "25-34"


def test_end_once_and_new_first_if_it_never_had_one() -> None:
    b, t = builder(), track()
    assert b.seen(t, frame(10), none(), changed=False) is None
    evs = b.ended(t, None)
    assert [e["type"] for e in evs] == ["new", "end"]
    assert evs[0]["gender"] is None and evs[0]["age"] is None
    assert b.faces == {}
    b2, t2 = builder(), track()
    v = votes()
    v.add(0.9, 0.1, ages_at(40))
    assert b2.seen(t2, frame(10), v.result(), changed=True)["type"] == "new"
    [end] = b2.ended(t2, v.result())
    assert end["type"] == "end" and end["gender"] == "female" and end["age_bucket"] == "35-44"
    assert set(end) == FIELDS | {"dwell_s"}


def test_end_carries_the_dwell_time_from_first_to_last_sighting() -> None:
    b, t = builder(classify=False), track()
    t.first_seen_ts = frame(5).ts
    b.seen(t, frame(10), none(), changed=False)
    [end] = b.ended(t, None)
    assert end["dwell_s"] == round(5 / 15, 3)


def test_crossings_waiting_for_new_come_between_new_and_end() -> None:
    b, t = builder(), track()
    evs = b.ended(t, None, [("door", "in")])
    assert [e["type"] for e in evs] == ["new", "cross", "end"]
    cross = evs[1]
    assert set(cross) == FIELDS | {"line", "direction"}
    assert (cross["line"], cross["direction"]) == ("door", "in")


def test_cross_describes_the_frame_it_happened_in() -> None:
    b, t = builder(classify=False), track()
    b.seen(t, frame(10), none(), changed=False)
    ev = b.crossed(t, frame(12), None, "door", "out")
    assert ev["type"] == "cross" and ev["frame"] == 12 and ev["box"] == [100, 50, 80, 96]
    assert b.announced(t)


def test_without_classification_new_comes_at_confirmation() -> None:
    b, t = builder(classify=False), track()
    ev = b.seen(t, frame(10), none(), changed=False)
    assert ev is not None and ev["type"] == "new" and ev["gender"] is None


def test_a_face_that_cannot_be_classified_is_announced_after_a_bounded_wait() -> None:
    b, t = builder(), track()
    out = [b.seen(t, frame(10 + 5 * k), none(), changed=False) for k in range(3)]
    assert out[:2] == [None, None]
    assert out[2] is not None and out[2]["type"] == "new" and out[2]["age"] is None


def test_state_of_vanished_tentative_tracks_is_dropped() -> None:
    b = builder()
    b.face(track(confirmed=False))
    b.forget_missing(set())
    assert b.faces == {}

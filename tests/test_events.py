"""Event building: when `new`, `update` and `end` are emitted and what they carry."""

from __future__ import annotations

import numpy as np

from edge_agent.capture import Frame
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
    return EventBuilder("pi-1", "door", "run1", samples=3, window=8, classify=classify)


def test_new_waits_for_a_chip_then_carries_every_contract_field() -> None:
    b, t = builder(), track()
    assert b.seen(t, frame(10), changed=False) is None  # confirmed, not yet classified
    b.face(t).votes.add(0.9, 0.95, ages_at(30))
    ev = b.seen(t, frame(10), changed=True)
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
    ev = b.seen(t, frame(10), changed=False)
    assert ev is not None and ev["box"] == [0, 430, 74, 50]


def test_update_only_when_gender_or_bucket_changes() -> None:
    b, t = builder(), track()
    votes = b.face(t).votes
    votes.add(0.9, 0.9, ages_at(30))
    assert b.seen(t, frame(10), changed=True)["type"] == "new"
    votes.add(0.8, 0.9, ages_at(31))
    assert b.seen(t, frame(15), changed=True) is None  # same gender, same bucket
    assert b.seen(t, frame(16), changed=False) is None
    votes.add(1.0, 0.9, ages_at(60))
    votes.add(1.0, 0.9, ages_at(60))
    ev = b.seen(t, frame(20), changed=True)
    assert ev is not None and ev["type"] == "update" and ev["age_bucket"] != "25-34"


def test_end_once_and_new_first_if_it_never_had_one() -> None:
    b, t = builder(), track()
    assert b.seen(t, frame(10), changed=False) is None
    evs = b.ended(t)
    assert [e["type"] for e in evs] == ["new", "end"]
    assert evs[0]["gender"] is None and evs[0]["age"] is None
    assert b.faces == {}
    b2, t2 = builder(), track()
    b2.face(t2).votes.add(0.9, 0.1, ages_at(40))
    assert b2.seen(t2, frame(10), changed=True)["type"] == "new"
    [end] = b2.ended(t2)
    assert end["type"] == "end" and end["gender"] == "female" and end["age_bucket"] == "35-44"


def test_without_classification_new_comes_at_confirmation() -> None:
    b, t = builder(classify=False), track()
    ev = b.seen(t, frame(10), changed=False)
    assert ev is not None and ev["type"] == "new" and ev["gender"] is None


def test_a_face_that_cannot_be_classified_is_announced_after_a_bounded_wait() -> None:
    b, t = builder(), track()
    out = [b.seen(t, frame(10 + 5 * k), changed=False) for k in range(3)]
    assert out[:2] == [None, None]
    assert out[2] is not None and out[2]["type"] == "new" and out[2]["age"] is None


def test_state_of_vanished_tentative_tracks_is_dropped() -> None:
    b = builder()
    b.face(track(confirmed=False))
    b.forget_missing(set())
    assert b.faces == {}

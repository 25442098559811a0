"""Counting lines (direction, segment only, hysteresis, once per direction) and daily totals
(kept in the spool, reset at local midnight across DST, T/counts retained and resent)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import LineConfig, MqttConfig, SpoolConfig
from edge_agent.count import DailyTotals, Direction, LineCounter
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool
from edge_agent.track import Track

W, H = 640, 480
DOOR = LineConfig("door", (0.5, 1.0), (0.5, 0.0))  # the contract's example: left -> right is in


def track(tid: int = 1) -> Track:
    return Track(id=tid, box=(0, 0, 60, 60), first_frame=0, last_frame=0, last_seen_ts=0.0,
                 hits=2, confirmed=True, det_score=0.9, detection=None)


def walk(counter: LineCounter, xs: list[float], y: float = 200.0, t: Track | None = None,
         announced: bool = True) -> list[tuple[str, Direction]]:
    t = t or track()
    out = []
    for x in xs:
        t.box = (x - 30, y - 30, 60, 60)
        t.last_frame += 1
        out += [(c.line, c.direction)
                for c in counter.update([t], t.last_frame, W, H, lambda _: announced)]
    return out


def test_direction_follows_the_contract() -> None:
    c = LineCounter([DOOR])
    assert walk(c, [float(x) for x in range(100, 500, 10)]) == [("door", Direction.IN)]
    c = LineCounter([DOOR])
    assert walk(c, [float(x) for x in range(500, 100, -10)]) == [("door", Direction.OUT)]
    # The same line drawn from top to bottom: the sides swap.
    c = LineCounter([LineConfig("up", (0.5, 0.0), (0.5, 1.0))])
    assert walk(c, [float(x) for x in range(100, 500, 10)]) == [("up", Direction.OUT)]


def test_only_the_segment_counts() -> None:
    lower = LineConfig("lower", (0.5, 1.0), (0.5, 0.6))  # y from 288 to 480
    counter = LineCounter([lower])
    assert walk(counter, [float(x) for x in range(100, 500, 10)], y=100.0) == []
    assert walk(counter, [float(x) for x in range(100, 500, 10)], y=400.0, t=track(2)) == [
        ("lower", Direction.IN)]


def test_jitter_on_the_line_counts_once() -> None:
    c = LineCounter([DOOR])
    xs = [250.0, 300.0, 318.0, 323.0, 316.0, 324.0, 317.0, 322.0, 330.0, 380.0, 400.0]
    assert walk(c, xs) == [("door", Direction.IN)]


def test_once_per_direction_until_it_crosses_back() -> None:
    c = LineCounter([DOOR])
    t = track()
    assert walk(c, [250.0, 400.0], t=t) == [("door", Direction.IN)]
    assert walk(c, [250.0], t=t) == [("door", Direction.OUT)]
    assert walk(c, [400.0], t=t) == [("door", Direction.IN)]
    # Back round the end of a short line and across again: not a second `in`.
    c = LineCounter([LineConfig("short", (0.5, 0.5), (0.5, 0.3))])  # y 144..240
    assert walk(c, [250.0, 400.0], y=200.0, t=t) == [("short", Direction.IN)]
    assert walk(c, [400.0, 250.0], y=400.0, t=t) == []
    assert walk(c, [250.0, 400.0], y=200.0, t=t) == []


def test_crossings_wait_for_the_announcement() -> None:
    c = LineCounter([DOOR])
    t = track()
    assert walk(c, [250.0, 400.0], t=t, announced=False) == []
    assert walk(c, [410.0], t=t) == [("door", Direction.IN)]
    t2 = track(2)
    walk(c, [250.0, 400.0], t=t2, announced=False)
    assert [(x.line, x.direction) for x in c.ended(t2)] == [("door", Direction.IN)]


def test_a_coasting_track_does_not_count() -> None:
    c = LineCounter([DOOR])
    t = track()
    walk(c, [250.0], t=t)
    t.box = (370, 170, 60, 60)
    assert c.update([t], t.last_frame + 1, W, H, lambda _: True) == []  # not measured
    assert walk(c, [400.0], t=t) == [("door", Direction.IN)]


def test_new_lines_apply_at_once() -> None:
    c = LineCounter()
    t = track()
    assert walk(c, [250.0, 400.0], t=t) == []
    c.configure([DOOR])
    assert walk(c, [400.0, 250.0], t=t) == [("door", Direction.OUT)]


def event(kind: str, tid: str = "r-1", gender: str | None = "male",
          bucket: str | None = "25-34", **kw: object) -> dict[str, object]:
    return {"type": kind, "track_id": tid, "gender": gender, "age": 30.0 if bucket else None,
            "age_bucket": bucket, **kw}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(SpoolConfig(path=str(tmp_path / "spool.db")))
    yield s
    s.close()


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[ZoneInfo]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield ZoneInfo("Europe/Berlin")
    monkeypatch.undo()
    time.tzset()


def at(zone: ZoneInfo, *args: int) -> float:
    return datetime(*args, tzinfo=zone).timestamp()


def test_totals_count_each_person_once_by_final_attributes(spool: Spool, berlin: ZoneInfo
                                                           ) -> None:
    sent: list[str] = []
    tot = DailyTotals(spool, sent.append, Clock(at(berlin, 2026, 11, 28, 10, 0)))
    tot.set_lines(["door"])
    tot.record(event("new"))
    tot.record(event("update", bucket="35-44"))
    tot.record(event("cross", bucket="35-44", line="door", direction="in"))
    tot.record(event("new", "r-2", None, None))
    tot.record(event("end", "r-2", "female", "18-24"))
    tot.record(event("end", bucket="35-44"))
    c = json.loads(sent[-1])
    assert c["day"] == "2026-11-28" and c["people"] == 2
    assert c["gender"] == {"male": 1, "female": 1, "unknown": 0}
    assert c["age_bucket"]["35-44"] == 1 and c["age_bucket"]["18-24"] == 1
    assert sum(c["age_bucket"].values()) == 2
    assert c["lines"] == {"door": {"in": 1, "out": 0}}
    assert tot.last_face == {"gender": "male", "age": 30.0, "age_bucket": "35-44"}


def test_a_restart_on_the_same_day_carries_on_and_the_next_day_starts_at_zero(
        tmp_path: Path, berlin: ZoneInfo) -> None:
    path = str(tmp_path / "spool.db")
    s = Spool(SpoolConfig(path=path))
    tot = DailyTotals(s, None, Clock(at(berlin, 2026, 11, 28, 10, 0)))
    tot.record(event("new"))
    s.close()
    s = Spool(SpoolConfig(path=path))
    assert DailyTotals(s, None, Clock(at(berlin, 2026, 11, 28, 23, 59))).people == 1
    assert DailyTotals(s, None, Clock(at(berlin, 2026, 11, 29, 0, 0, 1))).people == 0
    s.close()


@pytest.mark.parametrize(("day", "before_utc"), [
    ((2026, 3, 29), (2026, 3, 29, 21, 59, 59)),  # 23 h day: midnight is 22:00 UTC
    ((2026, 10, 25), (2026, 10, 25, 22, 59, 59)),  # 25 h day: midnight is 23:00 UTC
])
def test_reset_at_local_midnight_across_dst(berlin: ZoneInfo, day: tuple[int, int, int],
                                            before_utc: tuple[int, ...]) -> None:
    utc = ZoneInfo("UTC")
    clock = Clock(at(berlin, *day, 0, 30))
    sent: list[str] = []
    tot = DailyTotals(None, sent.append, clock)
    tot.set_lines(["door"])
    tot.record(event("new"))
    tot.record(event("cross", line="door", direction="out"))
    clock.t = at(utc, *before_utc)
    tot.tick()
    assert tot.people == 1
    clock.t += 2.0
    tot.tick()
    c = json.loads(sent[-1])
    assert tot.people == 0 and c["people"] == 0
    assert c["day"] == datetime(*day, tzinfo=berlin).date().replace(day=day[2] + 1).isoformat()
    assert c["lines"] == {"door": {"in": 0, "out": 0}}
    tot.record(event("end"))  # yesterday's person ends today: today's totals stay as they are
    assert json.loads(sent[-1])["gender"]["male"] == 0



def subscribe(port: int, topic: str) -> tuple[mqtt.Client, list[str]]:
    got: list[str] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2)
    c.on_message = lambda _c, _u, m: got.append(m.payload.decode())
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    return c, got


def test_counts_are_retained_and_sent_again_on_every_connect(broker: Broker, spool: Spool
                                                             ) -> None:
    topic = "test/dev1/counts"
    pub = Publisher(MqttConfig(port=broker.port), "test/dev1", spool)
    try:
        pub.publish_counts('{"people":1}')  # before the connection is up
        assert wait_for(lambda: pub.connected)
        c, got = subscribe(broker.port, topic)  # retained: a late subscriber gets it
        assert wait_for(lambda: got == ['{"people":1}'])
        pub.publish_counts('{"people":2}')
        assert wait_for(lambda: got[-1:] == ['{"people":2}'])
        c.disconnect()
        c.loop_stop()
        broker.stop()
        broker.start()  # no persistence: the broker forgot the retained message
        assert wait_for(lambda: not pub.connected or pub.reconnects == 1)
        assert wait_for(lambda: pub.connected and pub.reconnects == 1, 10)
        c, got = subscribe(broker.port, topic)
        assert wait_for(lambda: got == ['{"people":2}'])
        c.disconnect()
        c.loop_stop()
    finally:
        pub.stop()


def test_a_reload_applies_new_lines_and_keeps_tracks_and_totals(
        tmp_path: Path, faces_dir: Path, models_dir: Path) -> None:
    import contextlib

    import yaml

    from devtools import scenario
    from devtools.broker import free_port
    from edge_agent import agent, config

    clip = scenario.render(scenario.plan(faces_dir, people=1, seed=5), faces_dir,
                           tmp_path / "scene.mp4")
    path = tmp_path / "agent.yaml"
    raw: dict[str, Any] = {"source": {"uri": str(clip), "loop": True},
                           "models": {"dir": str(models_dir)},
                           "mqtt": {"port": free_port(), "discovery": False},
                           "spool": {"path": str(tmp_path / "spool.db")}}
    path.write_text(yaml.safe_dump(raw))
    with contextlib.ExitStack() as cleanup:
        a = agent.Agent(config.load(path), cleanup)
        pipe = a.pipe
        assert pipe.lines.lines == () and a.totals.counts["lines"] == {}
        raw["count"] = {"lines": [{"name": "door", "a": [0.5, 1.0], "b": [0.5, 0.0]}]}
        path.write_text(yaml.safe_dump(raw))
        a.reload(str(path))
        assert a.pipe is pipe and [ln.name for ln in pipe.lines.lines] == ["door"]
        assert a.totals.counts["lines"] == {"door": {"in": 0, "out": 0}}
        raw["track"] = {"max_unseen_s": 2.0}  # a new pipeline: the day's totals carry on
        path.write_text(yaml.safe_dump(raw))
        a.reload(str(path))
        assert a.pipe is not pipe and a.pipe.totals is a.totals
        assert [ln.name for ln in a.pipe.lines.lines] == ["door"]

"""Keeping up with the camera: a camera or stream too big for this machine's CPU is named, with
what to do, instead of the agent silently working on a fraction of the frames."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from edge_agent.capture import Frame
from edge_agent.health import PACE_WINDOW_S, Pace, PaceWatch

IMAGE = np.zeros((4, 4, 3), np.uint8)


def source(paced_fps: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(state="open", reconnects=0, paced_fps=paced_fps, size=(640, 480))


def feed(watch: PaceWatch, src: SimpleNamespace, seconds: float, processed_fps: float,
         index_fps: float, clock_rate: float | None = None, t0: float = 0.0,
         reconnect_every_s: float | None = None) -> float:
    """The loop processing `processed_fps` frames a second of a source whose frame indices
    advance at `index_fps` (handed over, taken or skipped) and, for a live stream, whose own
    clock advances `clock_rate` stream seconds per second; returns the end time."""
    t, next_reconnect = t0, t0 + (reconnect_every_s or 0.0)
    while t < t0 + seconds:
        if reconnect_every_s is not None and t >= next_reconnect:
            src.reconnects += 1
            next_reconnect += reconnect_every_s
        clock = None if clock_rate is None else 100.0 + t * clock_rate
        watch.check(t, Frame(IMAGE, round(t * index_fps), t, t, clock), src)
        t += 1 / processed_fps
    return t


def warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_agent_that_keeps_up_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()
    feed(watch, source(), 3 * PACE_WINDOW_S, 15, 15, clock_rate=1.0)
    assert watch.state is Pace.OK and watch.share == pytest.approx(1.0, abs=0.02)
    assert watch.source_fps == pytest.approx(15, abs=0.3)
    assert not warned(caplog)


def test_an_agent_behind_the_camera_says_so_once_and_when_it_caught_up(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    watch, src = PaceWatch(), source()
    t = feed(watch, src, 3.5 * PACE_WINDOW_S, 5, 15, clock_rate=1.0)  # the rest are skipped
    assert watch.state is Pace.BEHIND and watch.share == pytest.approx(1 / 3, abs=0.02)
    [said] = warned(caplog)
    assert "processes 5.0 of the 15.0 fps the source sends 640x480" in said
    assert "sub-stream" in said and "frame rate" in said
    assert caplog.records[-1].ERROR_KIND == "cpu"  # type: ignore[attr-defined]
    t = feed(watch, src, 0.6 * PACE_WINDOW_S, 12, 15, clock_rate=1.0, t0=t)  # no window closed
    assert watch.state is Pace.BEHIND
    feed(watch, src, 2 * PACE_WINDOW_S, 12, 15, clock_rate=1.0, t0=t)  # 80 %
    assert watch.state is Pace.OK
    assert "keeping up again" in caplog.records[-1].getMessage()
    assert len(warned(caplog)) == 1


def test_a_decoder_slower_than_the_camera_is_named(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()  # every frame taken, but 8 a second of a stream whose clock says 25
    feed(watch, source(), 2 * PACE_WINDOW_S, 8, 8, clock_rate=8 / 25)
    assert watch.state is Pace.BEHIND
    [said] = warned(caplog)
    assert "sends 640x480 at 25.0 fps, but only 8.0 fps could be decoded" in said


def test_a_camera_sending_fewer_frames_than_it_states_is_not_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()  # a webcam in low light: 7 fps on a clock that keeps time
    feed(watch, source(), 3 * PACE_WINDOW_S, 7, 7, clock_rate=1.0)
    assert watch.state is Pace.OK and watch.source_fps == pytest.approx(7, abs=0.2)
    assert not warned(caplog)


def test_a_realtime_file_is_judged_by_its_own_rate(caplog: pytest.LogCaptureFixture) -> None:
    slow = PaceWatch()  # decoding 8 of its 25 fps: the file source resumes late, no skips
    feed(slow, source(paced_fps=25.0), 2 * PACE_WINDOW_S, 8, 8)
    fast = PaceWatch()  # read as fast as the agent can: nothing to fall behind
    feed(fast, source(paced_fps=None), 3 * PACE_WINDOW_S, 3, 3)
    assert slow.state is Pace.BEHIND and fast.state is Pace.OK
    [said] = warned(caplog)
    assert "at 25.0 fps, but only 8.0 fps could be decoded" in said


def test_between_halves_nothing_is_behind(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()
    feed(watch, source(), 3 * PACE_WINDOW_S, 9, 15, clock_rate=1.0)  # 60 %
    assert watch.state is Pace.OK
    assert not warned(caplog)


def test_windows_with_a_reconnect_are_not_judged(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()  # frames come in bursts after reconnects: not the CPU's doing
    feed(watch, source(), 5 * PACE_WINDOW_S, 4, 15, clock_rate=1.0,
         reconnect_every_s=PACE_WINDOW_S / 3)
    assert watch.state is Pace.OK and watch.share is None
    assert not warned(caplog)

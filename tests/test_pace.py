"""Keeping up with the camera: a camera or stream too big for this machine's CPU is named, with
what to do, instead of the agent silently working on a fraction of the frames."""

from __future__ import annotations

import logging

import pytest

from edge_agent.health import PACE_WINDOW_S, Pace, PaceWatch


def feed(watch: PaceWatch, seconds: float, processed_fps: float, index_fps: float,
         paced_fps: float | None, t0: float = 0.0, stall_every_s: float | None = None) -> float:
    """The loop processing `processed_fps` frames a second of a source whose frame indices
    advance at `index_fps` (frames handed over, taken or skipped); returns the end time."""
    t, next_stall = t0, t0 + (stall_every_s or 0.0)
    while t < t0 + seconds:
        if stall_every_s is not None and t >= next_stall:
            watch.check(t, None, paced_fps, (640, 480))
            next_stall += stall_every_s
        watch.check(t, int(t * index_fps), paced_fps, (640, 480))
        t += 1 / processed_fps
    return t


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_an_agent_that_keeps_up_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()
    feed(watch, 3 * PACE_WINDOW_S, 15, 15, 15.0)
    assert watch.state is Pace.OK and watch.share == pytest.approx(1.0, abs=0.02)
    assert not warnings(caplog)


def test_an_agent_behind_the_camera_says_so_once_and_when_it_caught_up(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    watch = PaceWatch()
    t = feed(watch, 3.5 * PACE_WINDOW_S, 5, 15, 15.0)  # a live source: the rest are skipped
    assert watch.state is Pace.BEHIND and watch.share == pytest.approx(1 / 3, abs=0.02)
    [said] = warnings(caplog)
    assert "processes 5.0 of the 15.0 fps the source sends 640x480" in said
    assert "sub-stream" in said and "frame rate" in said
    assert caplog.records[-1].ERROR_KIND == "cpu"  # type: ignore[attr-defined]
    feed(watch, 0.6 * PACE_WINDOW_S, 12, 15, 15.0, t0=t)  # 80 %, but no window closed yet
    assert watch.state is Pace.BEHIND
    feed(watch, 2 * PACE_WINDOW_S, 12, 15, 15.0, t0=t + 0.6 * PACE_WINDOW_S)
    assert watch.state is Pace.OK
    assert "keeping up again" in caplog.records[-1].getMessage()
    assert len(warnings(caplog)) == 1


def test_a_decoder_slower_than_the_camera_is_named(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()
    feed(watch, 2 * PACE_WINDOW_S, 8, 8, 25.0)  # every frame taken, but 8 of the 25 per second
    assert watch.state is Pace.BEHIND
    [said] = warnings(caplog)
    assert "sends 640x480 at 25.0 fps, but only 8.0 fps could be decoded" in said


def test_between_halves_and_without_a_pace_nothing_is_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    slower = PaceWatch()
    feed(slower, 3 * PACE_WINDOW_S, 9, 15, 15.0)  # 60 %: not behind
    fast_file = PaceWatch()
    feed(fast_file, 3 * PACE_WINDOW_S, 3, 3, None)  # a file read as fast as the agent can
    assert slower.state is fast_file.state is Pace.OK
    assert not warnings(caplog)


def test_windows_with_a_stalled_source_are_not_judged(caplog: pytest.LogCaptureFixture) -> None:
    watch = PaceWatch()  # frames come in bursts after reconnects: not the CPU's doing
    feed(watch, 5 * PACE_WINDOW_S, 4, 15, 15.0, stall_every_s=PACE_WINDOW_S / 3)
    assert watch.state is Pace.OK and watch.share is None
    assert not warnings(caplog)

"""Frame sources against real codecs, a real RTSP server and a real MJPEG-over-HTTP server.

Every test frame carries its own number as a 4x3 grid of black/white cells that survives
lossy coding, so a test can tell which frame of the clip or stream it got.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import RtspServer, free_port, wait_port

from edge_agent.capture import Blank, Frame, FrameSource, open_source
from edge_agent.config import SourceConfig

W, H, CELL = 320, 240, 80

LIVE = SourceConfig(
    open_timeout_s=3.0, read_timeout_s=0.5, reconnect_min_s=0.1, reconnect_max_s=0.5
)


def stamp(n: int) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    for bit in range(12):
        if n >> bit & 1:
            y, x = divmod(bit, 4)
            img[y * CELL : (y + 1) * CELL, x * CELL : (x + 1) * CELL] = 255
    return img


def code(img: np.ndarray) -> int:
    n = 0
    for bit in range(12):
        y, x = divmod(bit, 4)
        cell = img[y * CELL + 20 : (y + 1) * CELL - 20, x * CELL + 20 : (x + 1) * CELL - 20]
        n |= int(cell.mean() > 128) << bit
    return n


def mp4v_clip(path: Path, frames: int, fps: float) -> Path:
    out = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (W, H))
    assert out.isOpened()
    for n in range(frames):
        out.write(stamp(n))
    out.release()
    return path


def h264_clip(path: Path, frames: int, fps: int) -> Path:
    ffmpeg = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24",
         "-s", f"{W}x{H}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "ultrafast",
         "-g", str(fps), "-pix_fmt", "yuv420p", str(path)],
        stdin=subprocess.PIPE,
    )
    assert ffmpeg.stdin is not None
    for n in range(frames):
        ffmpeg.stdin.write(stamp(n).tobytes())
    ffmpeg.stdin.close()
    assert ffmpeg.wait(30) == 0
    return path


def read_all(src: FrameSource, limit: int = 1000) -> list[Frame]:
    frames = []
    for _ in range(limit):
        if src.finished:
            break
        if (f := src.read(1.0)) is not None:
            frames.append(f)
    return frames


def collect(src: FrameSource, seconds: float) -> list[Frame]:
    frames, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (f := src.read(0.2)) is not None:
            frames.append(f)
    return frames


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def drain(src: FrameSource) -> None:
    while src.read(0) is not None:
        pass


# --- files ---------------------------------------------------------------------------------


def test_file_as_fast_as_possible_delivers_every_frame_then_finishes(tmp_path: Path) -> None:
    clip = mp4v_clip(tmp_path / "clip.mp4", frames=40, fps=10)
    src = open_source(SourceConfig(uri=f"file://{clip}", realtime=False))
    assert src.state == "open" and not src.finished
    started, t0 = time.time(), time.monotonic()
    frames = read_all(src)
    elapsed = time.monotonic() - t0

    assert [f.index for f in frames] == list(range(40))
    assert [code(f.image) for f in frames] == list(range(40))
    assert frames[0].image.shape == (H, W, 3) and frames[0].image.dtype == np.uint8
    assert frames[0].ts == pytest.approx(started, abs=0.5)
    assert [f.ts - frames[0].ts for f in frames] == pytest.approx([i / 10 for i in range(40)])
    assert elapsed < 2.0, f"not paced, yet took {elapsed:.2f} s for a 4 s clip"
    assert src.finished and src.state == "finished"
    assert src.read(0.1) is None
    src.close()


def test_file_frames_not_asked_for_in_colour_come_blank_and_the_rest_unchanged(
        tmp_path: Path) -> None:
    clip = mp4v_clip(tmp_path / "clip.mp4", frames=20, fps=10)
    src = open_source(SourceConfig(uri=str(clip), realtime=False))
    frames = [src.read(1.0, image=n % 3 == 0) for n in range(20)]
    src.close()

    assert [type(f) for f in frames] == [Frame if n % 3 == 0 else Blank for n in range(20)]
    assert [f.index for f in frames if f] == list(range(20))
    assert [code(f.image) for f in frames if isinstance(f, Frame)] == list(range(0, 20, 3))
    assert [f.ts - frames[0].ts for f in frames if f and frames[0]] == pytest.approx(
        [i / 10 for i in range(20)])


def test_file_loop_counts_on_across_loops(tmp_path: Path) -> None:
    clip = mp4v_clip(tmp_path / "clip.mp4", frames=10, fps=25)
    src = open_source(SourceConfig(uri=str(clip), realtime=False, loop=True))
    frames = [src.read(1.0) for _ in range(25)]
    src.close()

    assert all(frames)
    assert [f.index for f in frames if f] == list(range(25))
    assert [code(f.image) for f in frames if f] == [i % 10 for i in range(25)]
    assert [f.ts - frames[0].ts for f in frames if f and frames[0]] == pytest.approx(
        [i / 25 for i in range(25)]
    )
    assert not src.finished


def test_file_realtime_is_paced_at_the_file_fps(tmp_path: Path) -> None:
    clip = mp4v_clip(tmp_path / "clip.mp4", frames=12, fps=10)
    src = open_source(SourceConfig(uri=str(clip), realtime=True))
    first = src.read(1.0)
    t0 = time.monotonic()
    assert first is not None and first.index == 0
    assert src.read(0.01) is None, "frame 1 is due 100 ms after frame 0"
    assert time.monotonic() - t0 < 0.04, "read() overstayed its timeout"

    arrivals = []
    while (f := src.read(1.0)) is not None:
        arrivals.append((time.monotonic() - t0, f))
    span = arrivals[-1][0]

    assert [f.index for _, f in arrivals] == list(range(1, 12)), "a fast consumer misses nothing"
    assert all(at >= f.index / 10 - 0.01 for at, f in arrivals), "a frame came before it was due"
    assert 1.0 < span < 1.5, f"11 frames at 10 fps took {span:.2f} s"
    assert src.finished
    src.close()


def test_file_realtime_skips_what_a_slow_consumer_missed(tmp_path: Path) -> None:
    clip = mp4v_clip(tmp_path / "clip.mp4", frames=30, fps=25)
    src = open_source(SourceConfig(uri=str(clip), realtime=True))
    frames = []
    while (f := src.read(1.0)) is not None:
        assert abs(f.ts - time.time()) < 0.1, "a paced file's ts follows the wall clock"
        frames.append(f)
        time.sleep(0.12)
    src.close()

    indices = [f.index for f in frames]
    assert 6 <= len(frames) <= 14, indices
    assert all(b - a >= 2 for a, b in itertools.pairwise(indices)), indices
    assert [code(f.image) for f in frames] == indices
    assert src.finished


def test_file_realtime_resumes_after_a_long_pause_instead_of_decoding_the_gap(
    tmp_path: Path,
) -> None:
    clip = mp4v_clip(tmp_path / "clip.mp4", frames=40, fps=10)
    src = open_source(SourceConfig(uri=str(clip), realtime=True))
    assert (first := src.read(1.0)) is not None and first.index == 0
    time.sleep(2.3)
    t0 = time.monotonic()
    resumed, then = src.read(1.0), src.read(1.0)
    src.close()
    assert resumed is not None and then is not None
    assert (resumed.index, then.index) == (1, 2)
    assert 0.07 < time.monotonic() - t0 < 0.3, "pacing goes on from the resumed frame"


def test_missing_or_unreadable_file_fails_at_open_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match=r"nope\.mp4"):
        open_source(SourceConfig(uri=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"nope\.mp4"):
        open_source(SourceConfig(uri=f"file://{missing}"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video\n" * 100)
    with pytest.raises(ValueError, match=r"junk\.mp4"):
        open_source(SourceConfig(uri=str(junk)))
    with pytest.raises(ValueError, match="ftp://cam"):
        open_source(SourceConfig(uri="ftp://cam/video"))


# --- V4L2 --------------------------------------------------------------------------------


def test_missing_camera_keeps_retrying_without_raising() -> None:
    src = open_source(replace(LIVE, uri="/dev/video9", reconnect_min_s=0.05, reconnect_max_s=0.1))
    t0 = time.monotonic()
    assert src.read(0.3) is None
    waited = time.monotonic() - t0
    assert 0.25 < waited < 0.6, f"read(0.3) returned after {waited:.2f} s"
    assert src.state == "connecting" and not src.finished
    assert src.last_error == "no such device"
    assert any(t.name == "capture:/dev/video9" for t in threading.enumerate())

    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 0.5
    assert not any(t.name == "capture:/dev/video9" for t in threading.enumerate())
    assert src.read(0.5) is None


# --- RTSP --------------------------------------------------------------------------------


def test_rtsp_stream_recovers_after_the_server_restarts(tmp_path: Path) -> None:
    server = RtspServer(free_port(), h264_clip(tmp_path / "clip.mp4", frames=300, fps=15))
    server.start()
    src = open_source(replace(LIVE, uri=server.url, read_timeout_s=2.0, reconnect_max_s=1.0))
    try:
        before = collect(src, 2.0)
        assert len(before) >= 15, f"{len(before)} frames in 2 s of a 15 fps stream"
        assert src.state == "open"
        assert all(b.index > a.index for a, b in itertools.pairwise(before))
        codes = [code(f.image) for f in before]
        assert all(b > a for a, b in itertools.pairwise(codes)), codes
        assert abs(before[-1].ts - time.time()) < 0.5
        clock = [f.stream_s for f in before]  # the stream's own time: 1/15 s a frame
        assert None not in clock
        assert clock[-1] - clock[0] == pytest.approx((before[-1].index - before[0].index) / 15,
                                                     rel=0.1), clock

        assert server.stop() == 0, "rtsp_server.py should exit 0 on SIGTERM"
        assert wait_until(lambda: src.state == "reconnecting", 5.0), src.state
        assert src.reconnects == 1 and src.last_error
        drain(src)
        assert src.read(0.3) is None

        server.start()
        t0 = time.monotonic()
        frame = None
        while frame is None and time.monotonic() - t0 < 10:
            frame = src.read(0.5)
        recovery = time.monotonic() - t0
        assert frame is not None and recovery < 10, f"recovered in {recovery:.2f} s"
        assert frame.index > before[-1].index
        assert code(frame.image) < codes[-1], "frames come from the new session, clip start"
        assert src.state == "open" and src.reconnects == 1
    finally:
        t0 = time.monotonic()
        src.close()
        assert time.monotonic() - t0 < 1.5
        server.stop()


# --- HTTP MJPEG ---------------------------------------------------------------------------


class MjpegServer(ThreadingHTTPServer):
    """multipart/x-mixed-replace at 25 fps; each connection counts frames from 0. With
    `stall_after`, the first connection goes silent after that many frames, socket left open."""

    daemon_threads = True

    def __init__(self, port: int, stall_after: int | None = None) -> None:
        super().__init__(("127.0.0.1", port), MjpegHandler)
        self.stall_after = stall_after
        self.connections = 0
        self.last_sent = -1
        self.done = threading.Event()


class MjpegHandler(BaseHTTPRequestHandler):
    server: MjpegServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.connections += 1
        stall = srv.stall_after if srv.connections == 1 else None
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        for n in itertools.count():
            if n == stall:
                srv.done.wait()
            if srv.done.is_set():
                return
            jpeg = cv2.imencode(".jpg", stamp(n))[1].tobytes()
            head = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg)
            try:
                self.wfile.write(head + jpeg + b"\r\n")
            except OSError:
                return
            srv.last_sent = n
            time.sleep(0.04)


@pytest.fixture
def mjpeg(request: pytest.FixtureRequest) -> Iterator[MjpegServer]:
    srv = MjpegServer(free_port(), getattr(request, "param", None))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    wait_port(srv.server_address[1])
    yield srv
    srv.done.set()
    srv.shutdown()
    srv.server_close()


def test_mjpeg_over_http_delivers_only_the_newest_frame(mjpeg: MjpegServer) -> None:
    src = open_source(replace(LIVE, uri=f"http://127.0.0.1:{mjpeg.server_address[1]}/video"))
    try:
        frames = collect(src, 1.0)
        assert len(frames) >= 10, f"{len(frames)} frames in 1 s of a 25 fps stream"
        assert src.state == "open"
        assert frames[0].image.shape == (H, W, 3)
        assert {f.stream_s for f in frames} == {None}, "MJPEG has no clock of its own"
        codes = [code(f.image) for f in frames]
        assert all(b > a for a, b in itertools.pairwise(codes)), codes

        time.sleep(0.5)
        latest = src.read(1.0)
        assert latest is not None
        assert latest.index - frames[-1].index >= 8, "the reader kept reading while we slept"
        assert mjpeg.last_sent - code(latest.image) <= 3, "got a stale frame, not the newest"
        assert src.reconnects == 0 and mjpeg.connections == 1
    finally:
        src.close()


def test_a_live_stream_converts_only_the_frames_asked_for(mjpeg: MjpegServer) -> None:
    """Blank frames (MJPG: the JPEG not decoded) while no image is wanted; asked for again,
    the next frame has its own pixels, not a stale frame's."""
    src = open_source(replace(LIVE, uri=f"http://127.0.0.1:{mjpeg.server_address[1]}/video"))
    try:
        assert isinstance(src.read(3.0), Frame) and src.size == (W, H)
        for _ in range(2):  # the reader may be converting one frame as the request changes
            src.read(1.0, image=False)
        blanks = [f for _ in range(10) if (f := src.read(1.0, image=False)) is not None]
        assert len(blanks) == 10 and all(isinstance(f, Blank) for f in blanks), blanks
        frames = [f for _ in range(10) if (f := src.read(1.0)) is not None]
        assert len(frames) == 10 and all(isinstance(f, Frame) for f in frames)
        assert frames[0].index > blanks[-1].index
        assert [code(f.image) for f in frames] == [f.index for f in frames]
    finally:
        src.close()


@pytest.mark.parametrize("mjpeg", [10], indirect=True)
def test_a_stalled_stream_is_reopened(mjpeg: MjpegServer) -> None:
    src = open_source(replace(LIVE, uri=f"http://127.0.0.1:{mjpeg.server_address[1]}/video"))
    try:
        assert wait_until(lambda: src.state == "reconnecting", 6.0), src.state
        assert src.reconnects == 1 and "no frame" in (src.last_error or ""), src.last_error
        drain(src)
        t0 = time.monotonic()
        frames = []
        while len(frames) < 5 and time.monotonic() - t0 < 5:
            if (f := src.read(0.5)) is not None:
                frames.append(f)
        assert len(frames) == 5, f"{len(frames)} frames after the stall"
        assert code(frames[0].image) < 10, "the new connection starts counting from 0 again"
        assert frames[0].index >= 9, "the live counter does not restart with the connection"
        assert src.state == "open" and mjpeg.connections == 2
    finally:
        src.close()


def _upscaled_code(img: np.ndarray) -> int:
    return code(cv2.resize(img, (W, H), interpolation=cv2.INTER_NEAREST))


def test_wider_frames_are_scaled_once_at_capture_each_frame_its_own(
        mjpeg: MjpegServer, tmp_path: Path) -> None:
    """source.max_width: a file and a live stream deliver frames at that width; the full-size
    decode buffer is reused, so frames already handed over must keep their own content."""
    clip = mp4v_clip(tmp_path / "c.mp4", 20, 25.0)
    src = open_source(SourceConfig(uri=str(clip), realtime=False, max_width=W // 2))
    frames = []
    while (f := src.read(1.0)) is not None:
        frames.append(f)
    assert [f.image.shape for f in frames[:1]] == [(H // 2, W // 2, 3)]
    assert [_upscaled_code(f.image) for f in frames] == list(range(20))

    live = open_source(replace(LIVE, uri=f"http://127.0.0.1:{mjpeg.server_address[1]}/video",
                               max_width=W // 2))
    try:
        got = collect(live, 1.0)
    finally:
        live.close()
    assert len(got) >= 10 and got[0].image.shape == (H // 2, W // 2, 3)
    codes = [_upscaled_code(f.image) for f in got]
    assert all(b > a for a, b in itertools.pairwise(codes)), codes

"""Frame sources: V4L2 cameras, RTSP/HTTP streams and video files."""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import cv2
import numpy as np

from edge_agent.config import SourceConfig
from edge_agent.redact import redact

log = logging.getLogger(__name__)

# TCP because RTP over UDP smears frames on lossy Wi-Fi; the small probe cuts opening ~2 s -> 0.4 s.
FFMPEG_CAPTURE_OPTIONS = "rtsp_transport;tcp|analyzeduration;200000|probesize;32768"
_STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")
_CLOSE_JOIN_S = 1.0
_T = TypeVar("_T")
_MAX_STUCK_READERS = 3  # abandoned reader threads still inside a capture call, at most
_ABANDON_GRACE_S = 0.5  # past a call's own timeout, before it is given up on
_MAX_SKIP_S = 2.0
# FFmpeg decodes with one thread: its default (one per core, plus one) cost more CPU per frame
# (synchronisation) and holds a frame per thread; see docs/performance.md.
DECODER_THREADS = 1
_BIG_PIXELS = 1920 * 1080  # above this, full-size frames strain a 200 MB ceiling on a Pi


@dataclass(slots=True)
class Frame:
    image: np.ndarray  # BGR uint8, HxWx3
    index: int  # docs/contract.md `frame`: file position (counting on across loops) or live counter
    ts: float  # Unix time of the frame, for events
    mono: float  # monotonic seconds, for durations: immune to the wall clock being set
    # A live stream's own timestamp, seconds (None for files): it falls behind the wall clock
    # when decoding is slower than the camera.
    stream_s: float | None = None


@dataclass(slots=True)
class Blank:
    """A frame decoded but not converted to colour, because the loop said it would not look at
    it (nobody tracked, the detector not due): the conversion costs a fifth of decoding, and a
    codec must decode every frame anyway. The fields mean what they mean in `Frame`."""

    index: int
    ts: float
    mono: float
    stream_s: float | None = None


class FrameSource(Protocol):
    def read(self, timeout: float, image: bool = True) -> Frame | Blank | None:
        """The next frame, or None if none came within `timeout` seconds (stream stalled or
        reconnecting). Never blocks longer than `timeout`. With `image` False the frame may
        come as a `Blank`; with `image` True it never does."""

    @property
    def finished(self) -> bool:
        """True once a finite source (a file without loop) has delivered its last frame."""

    reconnects: int  # times a stream was lost after delivering frames
    last_error: str | None  # why it was last lost, for health reports
    size: tuple[int, int] | None  # what the source sends (before source.max_width), once known
    paced_fps: float | None  # a realtime file's rate, exact; None: live, or as fast as read

    @property
    def state(self) -> str:
        """'open', 'connecting', 'reconnecting', 'hung' (live reads stuck beyond recovery) or
        'finished' ('closed' after close()), for health reports."""

    @property
    def next_index(self) -> int:
        """The `index` the next frame gets; a live source that replaces this one starts there."""

    def close(self) -> None: ...


def open_source(cfg: SourceConfig, first_index: int = 0) -> FrameSource:
    """The source for `cfg.uri`: /dev/... is a V4L2 camera, rtsp/http(s) a stream, else a file.

    Files are checked here (FileNotFoundError / ValueError naming the path); live sources never
    raise for a missing device or server, they keep retrying in the background. A live source
    numbers its frames from `first_index` (files number theirs by position in the file).
    """
    uri = cfg.uri
    scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
    if uri.startswith("/dev/"):
        return CameraSource(cfg, first_index)
    if scheme in _STREAM_SCHEMES:
        return StreamSource(cfg, first_index)
    if scheme == "file":
        return FileSource(cfg, unquote(uri[len("file://"):]))
    if scheme:
        raise ValueError(f"{uri}: unsupported scheme (expected /dev/..., rtsp, http(s), a file)")
    return FileSource(cfg, uri)


class FileSource:
    """A video file read on the caller's thread.

    `realtime` emulates a camera: frames are due at the file's fps on the wall clock and, like a
    camera, frames a slow consumer missed by more than one frame interval are skipped (their
    index is kept, so gaps show). Otherwise every frame is delivered as fast as it is read.
    """

    reconnects = 0
    last_error: str | None = None

    def __init__(self, cfg: SourceConfig, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, "video file not found", path)
        self._path = path
        self._realtime = cfg.realtime
        self._loop = cfg.loop
        self._max_width = cfg.max_width
        self._cap: cv2.VideoCapture | None = self._open()
        if not self._cap.grab():
            self._cap.release()
            raise ValueError(f"{path}: no decodable video frame")
        self._grabbed = True
        fps = self._cap.get(cv2.CAP_PROP_FPS)
        self.fps = fps if math.isfinite(fps) and 0 < fps <= 1000 else cfg.fps or 25.0
        self.paced_fps = self.fps if cfg.realtime else None
        self._index = 0
        self._finished = False
        self._start_wall = 0.0
        self._start_mono: float | None = None
        log.info(
            "%s: open (%.2f fps, realtime %s, loop %s)", path, self.fps, cfg.realtime, cfg.loop
        )
        self._buf: np.ndarray | None = None
        width, height = (int(self._cap.get(p)) for p in (cv2.CAP_PROP_FRAME_WIDTH,
                                                         cv2.CAP_PROP_FRAME_HEIGHT))
        self.size: tuple[int, int] | None = (width, height)
        log_size(path, width, height, cfg.max_width)

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self._path, cv2.CAP_FFMPEG,
                               [cv2.CAP_PROP_N_THREADS, DECODER_THREADS])
        if not cap.isOpened():
            cap.release()
            raise ValueError(f"{self._path}: not a readable video file")
        return cap

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def state(self) -> str:
        if self._cap is None and not self._finished:
            return "closed"
        return "finished" if self._finished else "open"

    @property
    def next_index(self) -> int:
        return self._index

    def read(self, timeout: float, image: bool = True) -> Frame | Blank | None:
        if self._finished or self._cap is None:
            return None
        if self._start_mono is None:
            self._start_mono, self._start_wall = time.monotonic(), time.time()
        if self._realtime:
            lag = time.monotonic() - (self._start_mono + self._index / self.fps)
            if lag < -timeout:
                time.sleep(max(timeout, 0.0))
                return None
            if lag < 0:
                time.sleep(-lag)
            elif lag > _MAX_SKIP_S:
                # A consumer that paused resumes from here instead of decoding the whole gap.
                self._start_mono += lag
                lag = 0.0
            for _ in range(int(lag * self.fps) - 1):
                if not self._advance():
                    self._finish()
                    return None
                self._grabbed = False
                self._index += 1
        if not self._advance():
            self._finish()
            return None
        self._grabbed = False
        index, offset = self._index, self._index / self.fps
        ts, mono = self._start_wall + offset, self._start_mono + offset
        self._index += 1
        if not image:
            return Blank(index, ts, mono)
        # A frame that is scaled down at once is decoded into one reused buffer: at 4K that
        # saves a 25 MB allocation per frame and the old frame lingering beside the new one.
        ok, bgr = self._cap.retrieve(self._buf)
        if not ok:
            self._finish()
            return None
        small = fit_width(bgr, self._max_width)
        self._buf = bgr if small is not bgr else None
        return Frame(small, index, ts, mono)

    def _advance(self) -> bool:
        """Make sure a frame is grabbed, restarting the file at its end when looping."""
        assert self._cap is not None
        if self._grabbed:
            return True
        self._grabbed = self._cap.grab()
        if not self._grabbed and self._loop:
            self._cap.release()
            self._cap = self._open()
            self._grabbed = self._cap.grab()
        return self._grabbed

    def _finish(self) -> None:
        self._finished = True
        log.info("%s: finished after %d frames", self._path, self._index)
        self.close()

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class _LiveSource:
    """Reads a live device on a daemon thread and keeps only its newest frame, so a consumer
    slower than the camera always works on current video; reopens a lost device with back-off.

    A capture call that blocks past its timeout (a driver or server that never answers, a
    codec that ignores its own timeout) is not waited for: read() abandons that reader, whose
    thread releases its capture if the call ever returns, and starts a fresh one. With
    _MAX_STUCK_READERS threads still stuck the state is 'hung' until one of them comes back.
    """

    has_clock = True  # frames carry the device's or stream's own timestamps

    def __init__(self, cfg: SourceConfig, first_index: int = 0) -> None:
        self.cfg = cfg
        self.uri = redact(cfg.uri)
        self.reconnects = 0  # times the stream was lost after it had delivered frames
        self.last_error: str | None = None
        self.size: tuple[int, int] | None = None
        self.paced_fps: float | None = None
        self._state = "connecting"
        self._slot: Frame | Blank | None = None
        # What the consumer last asked for; the reader reads it unlocked, and a frame it
        # converts or not a moment too late costs one conversion or one frame, nothing else.
        self._want_image = True
        self._count = first_index
        self._failures = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._gen = 0  # the current reader's generation; older readers only clean up
        self._blocked: tuple[float, float] | None = None  # current capture call: since, limit
        self._stuck: list[threading.Thread] = []
        self._thread: threading.Thread | None = self._start_reader()

    def _open(self) -> cv2.VideoCapture:
        """An opened capture, or OSError saying why not."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return False

    @property
    def state(self) -> str:
        return self._state

    @property
    def next_index(self) -> int:
        return self._count

    def read(self, timeout: float, image: bool = True) -> Frame | Blank | None:
        self._supervise(time.monotonic())
        until = time.monotonic() + timeout
        with self._cond:
            self._want_image = image
            while self._cond.wait_for(lambda: self._slot is not None or self._stop.is_set(),
                                      until - time.monotonic()):
                frame, self._slot = self._slot, None
                # A Blank read before pixels were asked for again is dropped, as a slow
                # consumer drops frames: the next one will have them.
                if frame is None or isinstance(frame, Frame) or not image:
                    return frame
        return None

    def close(self) -> None:
        """Stop the reader; a read blocked in the codec ends within its read timeout and then
        releases the capture on its own thread, so close() itself stays quick."""
        self._stop.set()
        with self._cond:
            self._state, self._slot = "closed", None
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(_CLOSE_JOIN_S)

    def _start_reader(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(self._gen,), name=f"capture:{self.uri}",
                                  daemon=True)
        thread.start()
        return thread

    def _supervise(self, now: float) -> None:
        """On the consumer's thread: abandon a reader stuck in a capture call, start another."""
        error = None
        with self._cond:
            if self._stop.is_set():
                return
            blocked = self._blocked
            if self._thread is not None and blocked and now - blocked[0] > blocked[1]:
                self._gen += 1
                self._blocked = None
                self._stuck.append(self._thread)
                self._thread = None
                error = f"capture call blocked for more than {blocked[1]:.1f} s"
        if error:
            self._failed(error)
        if self._thread is not None and self._thread.is_alive():
            return
        if self._thread is not None:  # died of an error nobody expected: a silent dead camera
            log.error("%s: capture thread died; starting another", self.uri)
            self._thread = None
        self._stuck = [t for t in self._stuck if t.is_alive()]
        if len(self._stuck) < _MAX_STUCK_READERS:
            with self._cond:
                if self._state == "hung":
                    self._state = "reconnecting"
            self._thread = self._start_reader()
        elif self._state != "hung":
            with self._cond:
                self._state = "hung"
            log.error("%s: %d capture threads stuck in the driver or codec; not opening "
                      "another until one returns", self.uri, len(self._stuck))

    def _current(self, gen: int) -> bool:
        return gen == self._gen and not self._stop.is_set()

    def _call(self, gen: int, limit: float, fn: Callable[[], _T]) -> _T:
        """fn(), with its start and time limit published for _supervise."""
        with self._cond:
            if gen == self._gen:
                self._blocked = (time.monotonic(), limit)
        try:
            return fn()
        finally:
            with self._cond:
                if gen == self._gen:
                    self._blocked = None

    def _run(self, gen: int) -> None:
        cfg = self.cfg
        while self._current(gen):
            try:
                cap = self._call(gen, cfg.open_timeout_s + cfg.read_timeout_s, self._open)
            except (OSError, cv2.error) as e:
                error = str(e)
            else:
                try:
                    delivered, error = self._pump(gen, cap)
                finally:
                    cap.release()
                if delivered:
                    self._failures = 0
            if not self._current(gen):
                break
            self._failed(error)
            delay = min(cfg.reconnect_max_s, cfg.reconnect_min_s * 2 ** min(self._failures, 30))
            self._failures += 1
            self._stop.wait(random.uniform(max(cfg.reconnect_min_s, delay / 2), delay))

    def _pump(self, gen: int, cap: cv2.VideoCapture) -> tuple[bool, str]:
        """Hand frames over until the device fails; returns (any frame delivered, why it ended)."""
        delivered = False
        buf: np.ndarray | None = None

        def read() -> tuple[bool, np.ndarray | None]:
            """Decode; convert (for MJPG cameras: decode the JPEG) only what will be looked at,
            and always the first frame, which tells the size."""
            if not cap.grab():
                return False, None
            if delivered and not self._want_image:
                return True, None
            ok, bgr = cap.retrieve(buf)
            return ok and bgr is not None, bgr

        while self._current(gen):
            started = time.monotonic()
            try:
                ok, image = self._call(gen, self.cfg.read_timeout_s + _ABANDON_GRACE_S, read)
            except cv2.error as e:
                return delivered, f"read failed: {e}"
            waited = time.monotonic() - started
            if waited >= self.cfg.read_timeout_s:  # FFmpeg may still hand back a stale frame
                return delivered, f"no frame for {waited:.1f} s"
            if not ok:
                return delivered, "stream ended or read failed"
            pos = cap.get(cv2.CAP_PROP_POS_MSEC) if self.has_clock else -1.0
            clock = pos / 1000 if math.isfinite(pos) and pos >= 0 else None
            ts, mono = time.time(), time.monotonic()
            frame: Frame | Blank
            if image is None:
                frame = Blank(self._count, ts, mono, clock)
            else:
                size = (image.shape[1], image.shape[0])
                small = fit_width(image, self.cfg.max_width)
                buf = image if small is not image else None  # reuse what was scaled
                frame = Frame(small, self._count, ts, mono, clock)
            with self._cond:
                if not self._current(gen):
                    break
                if not delivered:  # an abandoned reader that came back must not set it
                    self.size = size
                    log_size(self.uri, *size, self.cfg.max_width)
                self._slot = frame
                self._count += 1
                delivered = True
                if self._state != "open":
                    log.info("%s: open (%dx%d)", self.uri, *size)
                    self._state = "open"
                self._cond.notify_all()
        return delivered, "closed"

    def _failed(self, error: str) -> None:
        with self._cond:
            if self._state == "open":
                self.reconnects += 1
                self._state = "reconnecting"
                log.warning("%s: lost (%s), reconnecting", self.uri, error)
            elif _kind(error) != _kind(self.last_error or ""):
                log.warning("%s: %s, retrying", self.uri, error)
            self.last_error = error


class CameraSource(_LiveSource):
    """A V4L2 camera; width/height/fps/fourcc from the config are requested at each open."""

    def __init__(self, cfg: SourceConfig, first_index: int = 0) -> None:
        # The V4L2 backend otherwise waits 10 s for a frame from a stalled camera; it reads
        # this once per process, so the first camera's read_timeout_s wins.
        os.environ.setdefault(
            "OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT", str(max(1, math.ceil(cfg.read_timeout_s)))
        )
        super().__init__(cfg, first_index)

    def _open(self) -> cv2.VideoCapture:
        path, cfg = self.cfg.uri, self.cfg
        if not os.path.exists(path):
            raise OSError("no such device")
        cap = cv2.VideoCapture(path, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise OSError("cannot open camera")
        if cfg.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*cfg.fourcc))
        if cfg.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
        if cfg.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        if cfg.fps:
            cap.set(cv2.CAP_PROP_FPS, cfg.fps)
        return cap


class StreamSource(_LiveSource):
    """An RTSP or HTTP(S) MJPEG stream through FFmpeg, with open and read timeouts so that a
    dead or hung server cannot block the reader."""

    def __init__(self, cfg: SourceConfig, first_index: int = 0) -> None:
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_CAPTURE_OPTIONS)
        # MJPEG over HTTP has no timestamps: FFmpeg numbers its frames at a guessed 25 fps
        self.has_clock = not urlsplit(cfg.uri).scheme.lower().startswith("http")
        super().__init__(cfg, first_index)

    def _open(self) -> cv2.VideoCapture:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, round(self.cfg.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, round(self.cfg.read_timeout_s * 1000),
            cv2.CAP_PROP_N_THREADS, DECODER_THREADS,
        ]
        cap = cv2.VideoCapture(self.cfg.uri, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise OSError("cannot open stream")
        return cap


def fit_width(image: np.ndarray, max_width: int | None) -> np.ndarray:
    """The frame scaled down to `max_width` (never up), right after capture, so that the
    full-size frame is dropped at once. Bilinear: at 1080p it costs 2.3 ms against INTER_AREA's
    11 ms (x86); faces stay far larger than the detector's and the chips' inputs."""
    h, w = image.shape[:2]
    if max_width is None or w <= max_width:
        return image
    size = (max_width, max(1, round(h * max_width / w)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


def log_size(name: str, width: int, height: int, max_width: int | None) -> None:
    """Say at start what size the source sends and what the agent does with it (what that
    size needs against the memory ceiling is health.SourceFit's to say)."""
    if max_width is not None and width > max_width:
        log.info("%s: source sends %dx%d; frames are scaled to %d px wide (source.max_width)",
                 name, width, height, max_width)
    elif width * height > _BIG_PIXELS:
        log.warning("%s: source sends %dx%d at full size (source.max_width is off): this needs "
                    "much memory and CPU; use the camera's sub-stream, set source.max_width "
                    "(e.g. 1280), or raise memory.ceiling_mb", name, width, height)


def _kind(error: str) -> str:
    """An error without its measured numbers, so a dead stream is logged once, not per retry."""
    return re.sub(r"\d+(\.\d+)?", "#", error)

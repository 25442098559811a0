"""The agent watching itself: resident memory against a ceiling, whether it keeps up with the
camera, and loop statistics."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from enum import Enum
from typing import TYPE_CHECKING

from edge_agent.config import Config, MemoryConfig

if TYPE_CHECKING:
    from edge_agent.capture import Blank, Frame, FrameSource

log = logging.getLogger(__name__)

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20

EXIT_MEMORY_CEILING = 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings the agent back

# The agent's peak RSS by source size, frames scaled to source.max_width 1280 (measured at 1080p
# and 4K, docs/performance.md "Big cameras"): a base, plus per source pixel the decoder's
# reference frames and the two full-size BGR frames (OpenCV's and the reused one). A stream that
# allows B-frames (x264's default: a reorder delay of 2) makes the decoder hold ~4 more frames,
# however few B-frames it sends: at 4K ~48 MB more.
_NEED_BASE_MB = 97.5
_NEED_MB_PER_MPIXEL = 10.4
_NEED_MB_PER_MPIXEL_B_FRAMES = 16.2
_NEED_MARGIN_MB = 10.0  # growth beyond the source's need that still sheds work


def memory_need_mb(width: int, height: int, b_frames: bool) -> float:
    """About what the agent's RSS peaks at for a source of this size (H.264, one decoder
    thread); scaling frames (source.max_width) barely changes it: the decoder dominates."""
    per = _NEED_MB_PER_MPIXEL_B_FRAMES if b_frames else _NEED_MB_PER_MPIXEL
    return _NEED_BASE_MB + width * height / 1e6 * per


def rss_mb() -> float:
    """Current resident set size; /proc/self/statm is ~15 us, cheap enough to poll every second."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_MB


class Memory(Enum):
    OK = "ok"
    SHED = "shed"
    CEILING = "ceiling"


class MemoryGuard:
    """Soft threshold: shed work. Ceiling: leave cleanly so systemd restarts a fresh process.

    Shedding (the detector less often) cannot shrink a big source's decoder, only delay first
    events (at 4K 21 frames instead of 2): a source whose size alone takes it past the soft
    threshold (which a 640x480 stream stays under) raises it to its need plus a margin, so
    growth beyond the need is still shed. A soft threshold set lower than that is kept."""

    def __init__(self, cfg: MemoryConfig, exits: CeilingExits | None = None) -> None:
        self.configure(cfg)
        self.exits = exits
        self.fit = SourceFit()
        self.rss_mb = rss_mb()
        self.peak_mb = self.rss_mb
        self.level = Memory.OK
        self.sheds = 0
        self._next = 0.0

    def configure(self, cfg: MemoryConfig) -> None:
        """New limits (on reload); the readings and counters carry on."""
        self.ceiling_mb = cfg.ceiling_mb
        self.soft_mb = cfg.ceiling_mb * cfg.soft_fraction
        self.interval = cfg.check_interval_s

    def check(self, now: float) -> Memory:
        if now < self._next:
            return self.level
        self._next = now + self.interval
        self.rss_mb = rss_mb()
        self.peak_mb = max(self.peak_mb, self.rss_mb)
        if self.rss_mb >= self.ceiling_mb:
            self.level = Memory.CEILING
        elif self.rss_mb >= self.shed_mb:
            if self.level is not Memory.SHED:
                self.sheds += 1
                gc.collect()
            self.level = Memory.SHED
        else:
            self.level = Memory.OK
        return self.level

    @property
    def shed_mb(self) -> float:
        need = self.fit.need_mb
        if need is None or self.soft_mb < memory_need_mb(640, 480, False):
            return self.soft_mb
        return max(self.soft_mb, need + _NEED_MARGIN_MB)


class SourceFit:
    """Says once the source's size is known (and again if it changes) what the agent needs for
    it against the memory ceiling and, if that may not fit, what to do: an honest start
    instead of a silent restart loop. OpenCV does not tell whether the stream allows B-frames
    (it shows in the decoder's memory, not in the frame types: a stream that allows them may
    use few), so both figures are given."""

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None
        self.need_mb: float | None = None  # without B-frames

    def check(self, size: tuple[int, int] | None, cfg: MemoryConfig) -> None:
        if size is None or size == self.size:
            return
        self.size = size
        self.need_mb = need = memory_need_mb(*size, False)
        need_b = memory_need_mb(*size, True)
        what = f"source sends {size[0]}x{size[1]}: the agent needs about {need:.0f} MB"
        if need_b < cfg.ceiling_mb * cfg.soft_fraction:
            log.info("%s (%.0f if the stream has B-frames), memory.ceiling_mb %.0f", what,
                     need_b, cfg.ceiling_mb)
            return
        if need >= cfg.ceiling_mb:
            log.error("%s, more than memory.ceiling_mb %.0f: it will exit with %d soon after "
                      "every start. Use the camera's sub-stream (640-1280 px wide) or raise "
                      "memory.ceiling_mb to at least %.0f", what, cfg.ceiling_mb,
                      EXIT_MEMORY_CEILING, need_b * 1.1,
                      extra={"ERROR_KIND": "memory_source_too_big"})
        else:
            log.warning("%s, %.0f MB if the stream has B-frames (its decoder then holds more "
                        "frames), against memory.ceiling_mb %.0f. If it reaches the ceiling, use "
                        "the camera's sub-stream (640-1280 px wide), turn B-frames off in its "
                        "encoder settings, or raise memory.ceiling_mb to at least %.0f; scaling "
                        "frames (source.max_width) cannot shrink the decoder", what, need_b,
                        cfg.ceiling_mb, need_b * 1.1)


class Pace(Enum):
    OK = "ok"
    BEHIND = "behind"


PACE_WINDOW_S = 10.0  # frame rates are judged over windows this long
_BEHIND_SHARE = 0.5  # processing less than this share of what the camera sends: behind
_CAUGHT_UP_SHARE = 0.7  # ... and at least this share again: caught up (no flapping)
_DECODE_SHARE = 0.8  # frames decoded at less than this share of the camera's rate: decode-bound


class PaceWatch:
    """Does the agent keep up with the camera on this machine's CPU? A live source keeps only
    its newest frame and a realtime file skips what is late, so a slow agent silently works on
    a fraction of the frames: tracks jump, fast faces are missed or counted twice.

    What the camera sends is measured, not taken from the rate a device or stream states (a
    webcam in low light sends fewer frames; FFmpeg may guess an RTSP rate twice too high): a
    live stream's own clock shows whether decoding keeps up with it, frame indices count what
    was handed over, taken or skipped. A realtime file's rate is exact."""

    def __init__(self) -> None:
        self.state = Pace.OK
        self.share: float | None = None  # of the camera's frames processed, last judged window
        self.source_fps: float | None = None  # what the camera sent then, frames per second
        self._start: float | None = None
        self._first = self._last = self._steps = 0
        self._clock0: float | None = None
        self._clock: float | None = None
        self._reconnects = 0

    def restart(self) -> None:
        """A new source or pipeline: judge from the next frame on, keeping what was said."""
        self._start = None

    def check(self, now: float, frame: Frame | Blank | None, source: FrameSource) -> None:
        """Each loop turn, with the frame processed (None if the read timed out)."""
        if self._start is not None and (source.state != "open"
                                        or source.reconnects != self._reconnects):
            self._start = None  # a stall or a reconnect is not the CPU's doing
        if frame is None:
            return
        if self._start is None:
            self._start, self._first, self._last, self._steps = now, frame.index, frame.index, 0
            self._clock0 = self._clock = frame.stream_s
            self._reconnects = source.reconnects
            return
        self._steps += 1
        self._last, self._clock = frame.index, frame.stream_s
        if now - self._start >= PACE_WINDOW_S:
            self._judge(now - self._start, source.paced_fps, source.size)
            self._start = None

    def _judge(self, elapsed: float, paced_fps: float | None,
               size: tuple[int, int] | None) -> None:
        processed = self._steps / elapsed
        delivered = (self._last - self._first) / elapsed
        if self._clock0 is not None and self._clock is not None and self._clock > self._clock0:
            decoded = min(1.0, (self._clock - self._clock0) / elapsed)  # stream s per wall s
            sent = delivered / decoded
        else:
            sent = max(delivered, paced_fps or 0.0)
            decoded = delivered / sent if sent > 0 else 1.0
        self.share = share = processed / sent if sent > 0 else 1.0
        self.source_fps = sent
        if self.state is Pace.OK and share < _BEHIND_SHARE:
            self.state = Pace.BEHIND
            what = f"{size[0]}x{size[1]} " if size else ""
            if decoded < _DECODE_SHARE:
                why = (f"the source sends {what}at {sent:.1f} fps, but only {delivered:.1f} "
                       f"fps could be decoded and {processed:.1f} processed on this machine's CPU")
            else:
                why = (f"the agent processes {processed:.1f} of the {sent:.1f} fps the source "
                       f"sends {what}on this machine's CPU")
            log.warning("%s: tracks jump between the frames it sees, and fast faces may be "
                        "missed or counted twice. Use the camera's sub-stream (640-1280 px "
                        "wide) or lower its frame rate, or raise detect.every_n_frames", why,
                        extra={"ERROR_KIND": "cpu"})
        elif self.state is Pace.BEHIND and share >= _CAUGHT_UP_SHARE:
            self.state = Pace.OK
            log.info("keeping up again: %.1f of %.1f fps processed", processed, sent)


class LoopStats:
    """Frame rate and stage timings as exponential moving averages: constant memory."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.alpha = alpha
        self.started = time.monotonic()
        self.frames = 0
        self.detections = 0
        self.detect_skipped = 0  # due detector runs the motion gate saved (nothing moved)
        self.classifications = 0
        self.frame_s = 0.0
        self.detect_ms = 0.0
        self.classify_ms = 0.0
        self._last: float | None = None

    def frame(self, now: float) -> None:
        self.frames += 1
        if self._last is not None:
            dt = now - self._last
            self.frame_s += self.alpha * (dt - self.frame_s) if self.frame_s else dt
        self._last = now

    @property
    def fps(self) -> float:
        return 1.0 / self.frame_s if self.frame_s > 0 else 0.0

    def detect(self, ms: float) -> None:
        self.detections += 1
        self.detect_ms += self.alpha * (ms - self.detect_ms) if self.detections > 1 else ms

    def skipped(self) -> None:
        self.detect_skipped += 1

    def classify(self, ms: float) -> None:
        self.classifications += 1
        self.classify_ms += self.alpha * (ms - self.classify_ms) if self.classifications > 1 else ms

    def uptime(self) -> float:
        return time.monotonic() - self.started


EXITS_FILE = "ceiling-exits.json"  # beside the spool: survives the restart that follows an exit
_EXITS_KEEP_S = 3600.0  # exits older than this are forgotten
_EXITS_EARLY_S = 300.0  # an exit within this long of start counts towards a restart loop
_EXITS_LOOP = 2  # this many early exits within _EXITS_KEEP_S: the agent is looping on exit 75
_EXITS_MAX = 20
_SAFE_WIDTH = 640  # the agent peaks near 100 MB with frames this wide (docs/performance.md)


class CeilingExits:
    """Recent exits at the memory ceiling, kept in a small JSON file so that the next start can
    tell a one-off (a leak, a burst) from a restart loop (a source too big for the ceiling):
    the journal then says why and what to do, and `T/state` carries the count."""

    def __init__(self, path: str, now: float | None = None) -> None:
        self.path = path
        now = time.time() if now is None else now
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            exits = [e for e in data
                     if isinstance(e, dict) and now - float(e["ts"]) < _EXITS_KEEP_S]
        except (OSError, ValueError, KeyError, TypeError):
            exits = []
        self.exits: list[dict[str, float]] = exits[-_EXITS_MAX:]

    @classmethod
    def beside(cls, spool_path: str) -> CeilingExits:
        return cls(os.path.join(os.path.dirname(os.path.abspath(spool_path)), EXITS_FILE))

    @property
    def looping(self) -> bool:
        return sum(e.get("uptime_s", 0.0) < _EXITS_EARLY_S for e in self.exits) >= _EXITS_LOOP

    def record(self, uptime_s: float, rss_mb: float, fit: SourceFit | None = None) -> None:
        """Written at exit, with the source's size and estimate when known; a failure to write
        only loses the diagnosis, never the exit."""
        exit_: dict[str, float] = {"ts": round(time.time(), 1), "uptime_s": round(uptime_s, 1),
                                   "rss_mb": round(rss_mb, 1)}
        if fit is not None and fit.size is not None and fit.need_mb is not None:
            exit_.update(width=fit.size[0], height=fit.size[1], need_mb=round(fit.need_mb, 1),
                         need_b_frames_mb=round(memory_need_mb(*fit.size, True), 1))
        self.exits = [*self.exits, exit_][-_EXITS_MAX:]
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.exits, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def adapt_to_exits(cfg: Config, exits: CeilingExits) -> Config:
    """After repeated ceiling exits soon after start, say why and start smaller: frames at most
    640 px wide, which is safe (the detector works at 320 px). That saves the frames' memory,
    not the decoder's: at 4K only ~4 MB, so the log says what the source needs when known."""
    if not exits.looping:
        return cfg
    last = exits.exits[-1]
    width = min(cfg.source.max_width or _SAFE_WIDTH, _SAFE_WIDTH)
    try:
        source = (f" The source sends {last['width']:.0f}x{last['height']:.0f}: the agent needs "
                  f"about {last['need_mb']:.0f} MB for it, {last['need_b_frames_mb']:.0f} if "
                  "the stream allows B-frames, mostly its decoder, which smaller frames do not "
                  "shrink.")
    except (KeyError, TypeError, ValueError):  # recorded before the source was known
        source = ""
    log.error("memory ceiling: %d exits in the last hour, soon after start (last: rss "
              "%.0f MB >= memory.ceiling_mb %.0f): the source is too big for this ceiling.%s "
              "Use the camera's sub-stream, turn off its B-frames, set source.max_width if it is "
              "off, or raise memory.ceiling_mb. Starting with frames scaled to %d px wide.",
              len(exits.exits), last.get("rss_mb", 0.0), cfg.memory.ceiling_mb, source, width,
              extra={"ERROR_KIND": "memory_ceiling_loop"})
    return dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, max_width=width))


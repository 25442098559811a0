"""The agent watching itself: resident memory against a ceiling, and loop statistics."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from enum import Enum

from edge_agent.config import Config, MemoryConfig

log = logging.getLogger(__name__)

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20

EXIT_MEMORY_CEILING = 75  # EX_TEMPFAIL: systemd's Restart=on-failure brings the agent back


def rss_mb() -> float:
    """Current resident set size; /proc/self/statm is ~15 us, cheap enough to poll every second."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_MB


class Memory(Enum):
    OK = "ok"
    SHED = "shed"
    CEILING = "ceiling"


class MemoryGuard:
    """Soft threshold: shed work. Ceiling: leave cleanly so systemd restarts a fresh process."""

    def __init__(self, cfg: MemoryConfig, exits: CeilingExits | None = None) -> None:
        self.configure(cfg)
        self.exits = exits
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
        elif self.rss_mb >= self.soft_mb:
            if self.level is not Memory.SHED:
                self.sheds += 1
                gc.collect()
            self.level = Memory.SHED
        else:
            self.level = Memory.OK
        return self.level


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

    def record(self, uptime_s: float, rss_mb: float) -> None:
        """Written at exit; a failure to write only loses the diagnosis, never the exit."""
        self.exits = [*self.exits, {"ts": round(time.time(), 1), "uptime_s": round(uptime_s, 1),
                                    "rss_mb": round(rss_mb, 1)}][-_EXITS_MAX:]
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.exits, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def adapt_to_exits(cfg: Config, exits: CeilingExits) -> Config:
    """After repeated ceiling exits soon after start, say why and start smaller: frames at most
    640 px wide, which is safe (the detector works at 320 px) and halves the frame memory."""
    if not exits.looping:
        return cfg
    last = exits.exits[-1]
    width = min(cfg.source.max_width or _SAFE_WIDTH, _SAFE_WIDTH)
    log.error("memory ceiling: %d exits in the last hour, soon after start (last: rss "
              "%.0f MB >= memory.ceiling_mb %.0f): the source is too big for this ceiling. Use "
              "the camera's sub-stream, set source.max_width, or raise memory.ceiling_mb. "
              "Starting with frames scaled to %d px wide.", len(exits.exits),
              last.get("rss_mb", 0.0), cfg.memory.ceiling_mb, width,
              extra={"ERROR_KIND": "memory_ceiling_loop"})
    return dataclasses.replace(cfg, source=dataclasses.replace(cfg.source, max_width=width))


"""The agent watching itself: resident memory against a ceiling, and loop statistics."""

from __future__ import annotations

import gc
import os
import time
from enum import Enum

from edge_agent.config import MemoryConfig

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

    def __init__(self, cfg: MemoryConfig) -> None:
        self.configure(cfg)
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

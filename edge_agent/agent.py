"""The frame loop: source -> detect every N -> track -> classify once -> events -> publisher."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2

from edge_agent import models
from edge_agent.capture import Frame, FrameSource, open_source
from edge_agent.classify import AGE_FILE, GENDER_FILE, FaceClassifier, face_quality
from edge_agent.config import Config, ConfigError, topic_base
from edge_agent.detect import make_detector
from edge_agent.events import EventBuilder
from edge_agent.health import EXIT_MEMORY_CEILING, LoopStats, Memory, MemoryGuard
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool
from edge_agent.track import Track, Tracker

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.5  # how long the loop waits for a frame before it looks after health anyway
SHED_FACTOR = 3  # under memory pressure the detector runs this many times less often


class Pipeline:
    """Everything that turns one frame into events; the loop in `run` drives it."""

    def __init__(self, cfg: Config, publish: Callable[[dict[str, Any]], object],
                 run_id: str) -> None:
        mdir = cfg.models.dir
        self.cfg = cfg
        cv2.setNumThreads(cfg.threads)
        self.detector = make_detector(cfg.detect, mdir)
        self.classifier = (FaceClassifier(f"{mdir}/{GENDER_FILE}", f"{mdir}/{AGE_FILE}")
                           if cfg.classify.enabled else None)
        self.tracker = Tracker(cfg.track)
        self.events = EventBuilder(cfg.device_id, cfg.camera, run_id, cfg.classify.samples,
                                   cfg.classify.window, cfg.classify.enabled)
        self._publish = publish
        self.lost_events = 0
        self.people_today = 0
        self._today = time.localtime().tm_yday
        self.last_face: dict[str, Any] = {}
        self.stats = LoopStats()
        self.every_n = cfg.detect.every_n_frames
        self._since_detect = self.every_n
        self._shape: tuple[int, ...] = ()

    def step(self, frame: Frame) -> None:
        self.stats.frame(time.monotonic())
        if frame.image.shape != self._shape:
            if self._shape:
                log.warning("frame size changed from %s to %s: ending open tracks",
                            self._shape[1::-1], frame.image.shape[1::-1])
                self.finish()
            self._shape = frame.image.shape
            self._since_detect = self.every_n
        self._since_detect += 1
        detections = None
        if self._since_detect >= self.every_n:
            self._since_detect = 0
            t0 = time.perf_counter()
            detections = self.detector.detect(frame.image)
            self.stats.detect((time.perf_counter() - t0) * 1e3)
        self._end(self.tracker.update(frame, detections))
        if detections is not None:
            self._on_detections(frame)

    def _on_detections(self, frame: Frame) -> None:
        """Classification and new/update decisions only change when the detector has run."""
        tracks = self.tracker.tracks
        for t in tracks:
            changed = t.detection is not None and self._classify(frame, t)
            if t.confirmed:
                ev = self.events.seen(t, frame, changed)
                if ev is not None:
                    self.publish(ev)
        self.events.forget_missing({t.id for t in tracks})

    def _classify(self, frame: Frame, track: Track) -> bool:
        """A chip only from a face that is large enough and wholly in view: a face entering
        is cut off at first, and its chip's replicated border misleads the age model."""
        det = track.detection
        assert det is not None
        x, y, w, h = det.box
        fh, fw = frame.image.shape[:2]
        if (self.classifier is None or min(w, h) < self.cfg.classify.min_face_px
                or x < 0 or y < 0 or x + w > fw or y + h > fh):
            return False
        votes = self.events.face(track).votes
        if votes.done:
            return False
        q = face_quality(frame.image, det)
        if not votes.wants(q):
            return False
        t0 = time.perf_counter()
        p_male, ages = self.classifier.predict(frame.image, det)
        self.stats.classify((time.perf_counter() - t0) * 1e3)
        votes.add(q, p_male, ages)
        return True

    def _end(self, tracks: list[Track]) -> None:
        for t in tracks:
            for ev in self.events.ended(t):
                self.publish(ev)

    def publish(self, event: dict[str, Any]) -> None:
        """A spool that cannot take the event (disk full, card failing) must not stop the
        camera: count what is lost, say so now and then, carry on."""
        if event["type"] == "new":
            today = time.localtime().tm_yday
            if today != self._today:
                self._today, self.people_today = today, 0
            self.people_today += 1
        if event["type"] != "end" and event["gender"] is not None:
            self.last_face = {"gender": event["gender"], "age": event["age"],
                              "age_bucket": event["age_bucket"]}
        try:
            self._publish(event)
        except (OSError, sqlite3.Error, ValueError) as e:
            self.lost_events += 1
            if self.lost_events in (1, 10) or self.lost_events % 1000 == 0:
                log.error("could not store event (%d lost so far): %s", self.lost_events, e)

    def stalled(self, now: float) -> None:
        """No frame came: faces cannot be seen, so their tracks end on time as usual."""
        self._end(self.tracker.expire(now))

    def finish(self) -> None:
        self._end(self.tracker.flush())


def run(cfg: Config, stop: threading.Event | None = None) -> int:
    """Run until the source ends, `stop` is set, or memory hits the ceiling; returns the exit
    code (0, or 75 at the memory ceiling)."""
    stop = stop or threading.Event()
    models.verify(cfg.models.dir, models.required_models(cfg.detect.backend,
                                                         cfg.classify.enabled))
    try:
        source = open_source(cfg.source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"source.uri: {e}") from None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(source.close)
        spool = Spool(cfg.spool)
        cleanup.callback(spool.close)
        publisher = Publisher(cfg.mqtt, topic_base(cfg), spool)
        cleanup.callback(publisher.stop)
        pipe = Pipeline(cfg, publisher.publish_event, str(spool.new_run()))
        return _loop(cfg, stop, source, pipe, publisher, spool)


def _loop(cfg: Config, stop: threading.Event, source: FrameSource, pipe: Pipeline,
          publisher: Publisher, spool: Spool) -> int:
    memory = MemoryGuard(cfg.memory)
    log.info("running: source=%s detect every %d frames, broker %s:%d", cfg.source.uri,
             cfg.detect.every_n_frames, cfg.mqtt.host, cfg.mqtt.port)
    code = 0
    next_state = 0.0
    while not stop.is_set():
        frame = source.read(READ_TIMEOUT_S)
        if frame is not None:
            pipe.step(frame)
        elif source.finished:
            break
        else:
            pipe.stalled(time.monotonic())
        now = time.monotonic()
        level = memory.check(now)
        if level is Memory.CEILING:
            log.error("memory ceiling reached: rss %.0f MB >= %.0f MB; exiting with %d",
                      memory.rss_mb, memory.ceiling_mb, EXIT_MEMORY_CEILING)
            code = EXIT_MEMORY_CEILING
            break
        pipe.every_n = cfg.detect.every_n_frames * (SHED_FACTOR if level is Memory.SHED else 1)
        if now >= next_state:
            next_state = now + cfg.mqtt.state_interval_s
            publisher.publish_state(snapshot(pipe, source, memory, publisher, spool))
    pipe.finish()
    publisher.publish_state(snapshot(pipe, source, memory, publisher, spool))
    timeout = cfg.mqtt.drain_timeout_s if code == 0 else min(cfg.mqtt.drain_timeout_s, 2.0)
    if not publisher.drain(timeout):
        log.warning("%d events not yet acknowledged; kept in the spool for the next start",
                    spool.depth())
    return code


def snapshot(pipe: Pipeline, source: FrameSource, memory: MemoryGuard, publisher: Publisher,
             spool: Spool) -> dict[str, Any]:
    """The retained `T/state` health report."""
    s = pipe.stats
    return {
        "ts": round(time.time(), 3),
        "uptime_s": round(s.uptime(), 1),
        "fps": round(s.fps, 2),
        "frames": s.frames,
        "detect_ms": round(s.detect_ms, 2),
        "classify_ms": round(s.classify_ms, 2),
        "every_n": pipe.every_n,
        "rss_mb": round(memory.rss_mb, 1),
        "peak_rss_mb": round(memory.peak_mb, 1),
        "memory": memory.level.value,
        "memory_sheds": memory.sheds,
        "tracks": sum(t.confirmed for t in pipe.tracker.tracks),  # faces in view
        "people_today": pipe.people_today,
        "last_gender": pipe.last_face.get("gender"),
        "last_age": pipe.last_face.get("age"),
        "last_age_bucket": pipe.last_face.get("age_bucket"),
        "source": source.state,
        "source_reconnects": source.reconnects,
        "source_error": source.last_error,
        "spool_depth": spool.depth(),
        "spool_dropped": spool.dropped(),
        "events_lost": pipe.lost_events,
        "broker": "connected" if publisher.connected else "disconnected",
        "reconnects": publisher.reconnects,
    }

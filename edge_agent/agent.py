"""The frame loop: source -> detect every N -> track -> classify once -> events -> publisher."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2

from edge_agent import config, metrics, models, openssl, redact, service
from edge_agent.capture import Blank, Frame, FrameSource, open_source
from edge_agent.classify import AGE_FILE, GENDER_FILE, FaceClassifier, TrackClassifier
from edge_agent.config import Config, ConfigError, LineConfig, SourceConfig, topic_base
from edge_agent.count import DailyTotals, LineCounter
from edge_agent.detect import Box, make_detector
from edge_agent.events import EventBuilder
from edge_agent.health import (
    EXIT_MEMORY_CEILING,
    CeilingExits,
    LoopStats,
    Memory,
    MemoryGuard,
    PaceWatch,
    adapt_to_exits,
)
from edge_agent.motion import MotionGate, focus
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool
from edge_agent.track import Track, Tracker

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.5  # how long the loop waits for a frame before it looks after health anyway
SHED_FACTOR = 3  # under memory pressure the detector runs this many times less often
STOP_DRAIN_S = 3.0  # a stop asked for (signal, memory ceiling) waits this long for acks at most
STOP_PUBLISHER_S = 1.0  # then `offline` and the disconnect get this long at most
EXIT_FAULT = 74  # a fault a restart may cure (docs/operations.md); the unit restarts on it
MAX_NETWORK_RESTARTS = 5  # paho's network thread died this often in a row: exit EXIT_FAULT
FULL_FRAME_EVERY = 5  # with faces tracked, every 5th detector run looks at the whole frame


class Pipeline:
    """Everything that turns one frame into events; the loop in `run` drives it."""

    def __init__(self, cfg: Config, publish: Callable[[dict[str, Any]], object],
                 run_id: str, totals: DailyTotals | None = None) -> None:
        mdir = cfg.models.dir
        self.cfg = cfg
        cv2.setNumThreads(cfg.threads)
        # OpenCV 5 warns once per net that its new engine ignores targets: noise in every log.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        self.detector = make_detector(cfg.detect, mdir)
        c = cfg.classify
        self.classifier = TrackClassifier(
            FaceClassifier(f"{mdir}/{GENDER_FILE}", f"{mdir}/{AGE_FILE}") if c.enabled else None,
            c.samples, c.window, c.min_face_px)
        self.tracker = Tracker(cfg.track)
        self.events = EventBuilder(cfg.device_id, cfg.camera, run_id, c.enabled)
        self.lines = LineCounter()
        self.totals = totals or DailyTotals()
        self.set_lines(cfg.count.lines)
        self._publish = publish
        self.lost_events = 0
        self.stats = LoopStats()
        self.every_n = cfg.detect.every_n_frames
        self._since_detect = self.every_n
        self._shape: tuple[int, ...] = ()
        self.motion = MotionGate(cfg.detect.motion) if cfg.detect.motion.enabled else None
        self.crop = cfg.detect.motion.crop
        self._crop_runs = 0
        self.detect_cropped = 0  # detector runs on a region rather than the whole frame

    @property
    def needs_image(self) -> bool:
        """Whether the next frame will be looked at: a face is tracked or the detector is due.
        The source skips converting the others to colour (`Blank`)."""
        return self.tracker.tracking or self._since_detect + 1 >= self.every_n

    def step(self, frame: Frame | Blank) -> None:
        self.stats.frame(time.monotonic())
        if isinstance(frame, Blank):  # only when needs_image said no: nothing to look at
            self._since_detect += 1
            self.totals.tick()
            return
        if frame.image.shape != self._shape:
            if self._shape:
                log.warning("frame size changed from %s to %s: ending open tracks",
                            self._shape[1::-1], frame.image.shape[1::-1])
                self.finish()
            self._shape = frame.image.shape
            self._since_detect = self.every_n
        self._since_detect += 1
        detections = None
        if self._since_detect >= self.every_n and self._worth_detecting(frame):
            self._since_detect = 0
            t0 = time.perf_counter()
            detections = self.detector.detect(frame.image, self._focus(frame))
            self.stats.detect((time.perf_counter() - t0) * 1e3)
        self._end(self.tracker.update(frame, detections))
        if detections is not None:
            self._on_detections(frame)
        self._count_lines(frame)
        self.totals.tick()

    def set_lines(self, lines: tuple[LineConfig, ...]) -> None:
        """Counting lines, also on a reload (tracks carry on)."""
        self.lines.configure(lines)
        self.totals.set_lines(ln.name for ln in lines)

    def _worth_detecting(self, frame: Frame) -> bool:
        """With faces in view, always; otherwise only when something moves. The gate looks at
        due frames only, so the detector still runs on the same frames as without it."""
        moving = self.motion is None or self.motion.moving(frame.image)
        if moving or self.tracker.tracking:
            return True
        self._since_detect = 0
        self.stats.skipped()
        return False

    def _focus(self, frame: Frame) -> Box | None:
        """The detector looks only around tracked faces and at what moves (with nobody tracked,
        at what made the gate open); at the whole frame every `FULL_FRAME_EVERY` runs while
        faces are tracked (a face that came in without moving) and whenever what moved is
        unknown."""
        tracks = self.tracker.tracks
        if self.motion is None or not self.crop:
            return None
        self._crop_runs = self._crop_runs + 1 if tracks else 0
        if self._crop_runs >= FULL_FRAME_EVERY:
            self._crop_runs = 0
            return None
        h, w = frame.image.shape[:2]
        region = focus([t.box for t in tracks], self.motion.regions(), w, h)
        self.detect_cropped += region is not None
        return region

    def _on_detections(self, frame: Frame) -> None:
        """Classification and new/update decisions only change when the detector has run."""
        tracks = self.tracker.tracks
        for t in tracks:
            changed = t.detection is not None and self._classify(frame, t)
            if t.confirmed:
                ev = self.events.seen(t, frame, self.classifier.result(t.id), changed)
                if ev is not None:
                    self.publish(ev)
        live = {t.id for t in tracks}
        self.events.forget_missing(live)
        self.classifier.forget_missing(live)
        self.lines.forget_missing(live)

    def _classify(self, frame: Frame, track: Track) -> bool:
        assert track.detection is not None
        ms = self.classifier.offer(frame.image, track.id, track.detection)
        if ms is None:
            return False
        self.stats.classify(ms)
        return True

    def _count_lines(self, frame: Frame) -> None:
        h, w = frame.image.shape[:2]
        for c in self.lines.update(self.tracker.tracks, frame.index, w, h,
                                   self.events.announced):
            self.publish(self.events.crossed(c.track, frame, self.classifier.result(c.track.id),
                                             c.line, c.direction.value))

    def _end(self, tracks: list[Track]) -> None:
        for t in tracks:
            ms = self.classifier.settle(t.id)
            if ms is not None:
                self.stats.classify(ms)
            crossings = [(c.line, c.direction.value) for c in self.lines.ended(t)]
            for ev in self.events.ended(t, self.classifier.result(t.id), crossings):
                self.publish(ev)
            self.classifier.forget(t.id)

    def publish(self, event: dict[str, Any]) -> None:
        """A spool that cannot take the event (disk full, card failing) must not stop the
        camera: count what is lost, say so now and then, carry on."""
        try:
            self._publish(event)
            self.totals.record(event)
        except (OSError, sqlite3.Error, ValueError) as e:
            self.lost_events += 1
            if self.lost_events in (1, 10) or self.lost_events % 1000 == 0:
                log.error("could not store event (%d lost so far): %s", self.lost_events, e)

    def stalled(self, now: float) -> None:
        """No frame came: faces cannot be seen, so their tracks end on time as usual."""
        self._end(self.tracker.expire(now))

    def finish(self) -> None:
        self._end(self.tracker.flush())


def run(cfg: Config, stop: threading.Event | None = None,
        reload: threading.Event | None = None, config_path: str | None = None) -> int:
    """Run until the source ends, `stop` is set, or memory hits the ceiling; returns the exit
    code (0, or 75 at the memory ceiling). Setting `reload` re-reads `config_path`."""
    stop = stop or threading.Event()
    reload = reload or threading.Event()
    models.verify(cfg.models.dir, models.required_models(cfg.detect.backend,
                                                         cfg.classify.enabled))
    svc = service.Service()
    exits = CeilingExits.beside(cfg.spool.path)
    cfg = adapt_to_exits(cfg, exits)
    with contextlib.ExitStack() as cleanup:
        agent = Agent(cfg, cleanup)
        agent.memory.exits = exits
        _await_source(agent.source, stop, cfg.source.open_timeout_s)
        svc.ready(agent.status())
        return _loop(agent, svc, stop, reload, config_path)


def _open_source(cfg: SourceConfig, first_index: int = 0) -> FrameSource:
    try:
        source = open_source(cfg, first_index)
    except (OSError, ValueError) as e:
        raise ConfigError(f"source.uri: {e}") from None
    return source


def _await_source(source: FrameSource, stop: threading.Event, timeout: float) -> None:
    """READY should mean "seeing", or "retrying and saying why": wait, bounded, for either."""
    deadline = time.monotonic() + timeout
    while (source.state == "connecting" and source.last_error is None
           and time.monotonic() < deadline and not stop.wait(0.05)):
        pass


class Agent:
    """What a configuration builds: source, spool, publisher, pipeline, memory guard. `reload`
    rebuilds only what a new configuration changes; the spool, and so `seq`, always carries on."""

    def __init__(self, cfg: Config, cleanup: contextlib.ExitStack) -> None:
        self.cfg = cfg
        self.source = _open_source(cfg.source)
        cleanup.callback(lambda: self.source.close())
        self.spool = Spool(cfg.spool)
        cleanup.callback(self._close_spool)
        self.publisher = Publisher(cfg.mqtt, topic_base(cfg), self.spool)
        cleanup.callback(lambda: self.publisher.stop(STOP_PUBLISHER_S))
        self.totals = DailyTotals(self.spool, self._publish_counts)
        self.pipe = Pipeline(cfg, self.publish, str(self.spool.new_run()), self.totals)
        self.totals.publish()
        self.publisher.set_discovery_lines([ln.name for ln in cfg.count.lines])
        self.memory = MemoryGuard(cfg.memory)
        self.pace = PaceWatch()
        self.metrics = metrics.Textfile(cfg.metrics.textfile) if cfg.metrics.textfile else None
        self.network_restarts = 0  # in a row, without a connect in between

    def _publish_counts(self, payload: str) -> None:
        self.publisher.publish_counts(payload)

    def _close_spool(self) -> None:
        lost = self.spool.close()
        if lost:
            log.error("%d events held in memory could not be stored (disk still failing) and "
                      "are lost with this process", lost, extra={"ERROR_KIND": "spool"})

    def check_network(self) -> bool:
        """paho's network thread can die on an exception of its own and then never reconnects:
        notice it, log it, start a new publisher. False after MAX_NETWORK_RESTARTS in a row."""
        if self.publisher.network_alive():
            if self.publisher.connected:
                self.network_restarts = 0
            return True
        self.network_restarts += 1
        log.error("mqtt network thread died (%d in a row); starting a new connection",
                  self.network_restarts, extra={"ERROR_KIND": "mqtt"})
        if self.network_restarts > MAX_NETWORK_RESTARTS:
            return False
        try:
            fresh = Publisher(self.cfg.mqtt, topic_base(self.cfg), self.spool, start=False)
        except ConfigError as e:  # e.g. the password file went away: try again next time
            log.error("mqtt: cannot start a new connection: %s", e, extra={"ERROR_KIND": "mqtt"})
            return True
        fresh.set_discovery_lines([ln.name for ln in self.cfg.count.lines])
        self.publisher.stop(STOP_PUBLISHER_S)
        self.publisher = fresh
        fresh.start()
        self.totals.publish()
        return True

    def publish(self, event: dict[str, Any]) -> None:
        seq = self.publisher.publish_event(event)
        if event["type"] != "update":
            log.info("track %s: %s (seq %d)", event["track_id"], event["type"], seq,
                     extra={"TRACK": event["track_id"], "EVENT": event["type"], "SEQ": seq})

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.pipe, self.source, self.memory, self.pace, self.publisher,
                        self.spool)

    def publish_state(self) -> None:
        """`T/state`, and the same figures into `metrics.textfile` if there is one."""
        state = self.snapshot()
        self.publisher.publish_state(state)
        if self.metrics:
            self.metrics.write(state, self.cfg.device_id, self.cfg.camera)

    def status(self) -> str:
        line = service.status_line(self.snapshot())
        if self.spool.fault:
            line += " (in memory: the disk fails)"
        return redact.redact(line)  # systemctl status is pasted into support threads

    def reload(self, path: str | None) -> None:
        """Apply the configuration now in `path`; if it is invalid, keep running as before."""
        if path is None:
            return
        try:
            applied = self._apply(config.load(path))
        except Exception as e:  # whatever failed, the running configuration carries on
            log.error("reload of %s failed, keeping the running configuration: %s", path, e,
                      extra={"ERROR_KIND": "config"})
            return
        log.info("reloaded %s: %s", path, ", ".join(applied) if applied else "nothing changed")

    def _apply(self, new: Config) -> list[str]:
        old = self.cfg
        changed = _changed_keys(old, new)
        later = {k.split(".")[0] for k in changed} - RELOADABLE
        if new.mqtt.tls and openssl.kept_out():  # started without TLS, so mqtt.tls changed
            log.warning("reload: mqtt.tls needs OpenSSL, which the agent left out when it "
                        "started without TLS; mqtt.* take effect at the next start")
            later.add("mqtt")
        if later:
            log.warning("reload: %s take effect at the next start",
                        ", ".join(sorted(k for k in changed if k.split(".")[0] in later)))
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in later})
            changed = {k for k in changed if k.split(".")[0] not in later}
        new_source = any(k.split(".")[0] == "source" for k in changed)
        new_pipe = any(k.split(".")[0] in PIPELINE_KEYS and k not in LIVE_KEYS for k in changed)
        new_publisher = any(k.split(".")[0] in PUBLISHER_KEYS and k not in LIVE_KEYS
                            for k in changed)
        if new_pipe:
            models.verify(new.models.dir,
                          models.required_models(new.detect.backend, new.classify.enabled))
        with contextlib.ExitStack() as undo:
            source, pipe = self.source, self.pipe
            if new_source:
                source = _open_source(new.source, self.source.next_index)
                undo.callback(source.close)
            if new_pipe:
                pipe = Pipeline(new, self.publish, str(self.spool.new_run()), self.totals)
            if new_publisher:
                self._replace_publisher(new)
            undo.pop_all()
        if new_source or new_pipe:
            self.pipe.finish()  # a new camera or new models: tracks cannot carry over
            self.pace.restart()  # and their pace is judged afresh
        if new_pipe:
            for name in ("stats", "lost_events"):
                setattr(pipe, name, getattr(self.pipe, name))
        if new_source:
            self.source.close()
        self.source, self.pipe, self.cfg = source, pipe, new
        if "count.lines" in changed:
            pipe.set_lines(new.count.lines)
        if new_publisher or "count.lines" in changed:
            self.totals.publish()
            self.publisher.set_discovery_lines([ln.name for ln in new.count.lines])
        self.memory.configure(new.memory)
        service.update_logging(new.log_level, {"DEVICE": new.device_id, "CAMERA": new.camera})
        return sorted(changed)

    def _replace_publisher(self, new: Config) -> None:
        """The new one is built (password, TLS files, client) while the old one runs; the old
        one then stops (it says `offline`) before the new one connects, so two clients never
        share one client id."""
        fresh = Publisher(new.mqtt, topic_base(new), self.spool, start=False)
        self.publisher.stop(STOP_PUBLISHER_S)
        self.publisher = fresh
        fresh.start()


# What a reload does with each changed key: applied in place, pipeline rebuilt (open tracks
# end), publisher reconnected; keys outside RELOADABLE (spool.*) wait for the next start.
LIVE_KEYS = frozenset({"log_level", "memory.ceiling_mb", "memory.soft_fraction",
                       "memory.check_interval_s", "detect.every_n_frames",
                       "mqtt.state_interval_s", "mqtt.drain_timeout_s", "count.lines"})
PIPELINE_KEYS = frozenset({"device_id", "camera", "threads", "detect", "track", "classify",
                           "models"})
PUBLISHER_KEYS = frozenset({"device_id", "mqtt"})
RELOADABLE = PIPELINE_KEYS | PUBLISHER_KEYS | {"source", "memory", "log_level", "count"}


def _changed_keys(old: Config, new: Config) -> set[str]:
    """Dotted paths of the values that differ, e.g. {'detect.every_n_frames', 'camera'}."""
    def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out |= flat(value, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = value
        return out

    a, b = flat(old), flat(new)
    return {k for k in a if a[k] != b[k]}


def _loop(agent: Agent, svc: service.Service, stop: threading.Event, reload: threading.Event,
          config_path: str | None) -> int:
    log.info("running: source=%s detect every %d frames, broker %s:%d, spool %s",
             redact.redact(agent.cfg.source.uri), agent.cfg.detect.every_n_frames,
             agent.cfg.mqtt.host, agent.cfg.mqtt.port, agent.spool.spool_id)
    code = 0
    next_state = 0.0
    while not stop.is_set():
        source, pipe, cfg = agent.source, agent.pipe, agent.cfg
        frame = source.read(READ_TIMEOUT_S, image=pipe.needs_image)
        if frame is not None:
            pipe.step(frame)
        elif source.finished:
            break
        else:
            pipe.stalled(time.monotonic())
        now = time.monotonic()
        agent.pace.check(now, frame, source)
        agent.memory.fit.check(source.size, cfg.memory)
        level = agent.memory.check(now)
        if level is Memory.CEILING:
            log.error("memory ceiling reached: rss %.0f MB >= %.0f MB; exiting with %d",
                      agent.memory.rss_mb, agent.memory.ceiling_mb, EXIT_MEMORY_CEILING,
                      extra={"ERROR_KIND": "memory_ceiling"})
            code = EXIT_MEMORY_CEILING
            if agent.memory.exits is not None:
                agent.memory.exits.record(pipe.stats.uptime(), agent.memory.rss_mb,
                                          agent.memory.fit)
            break
        pipe.every_n = cfg.detect.every_n_frames * (SHED_FACTOR if level is Memory.SHED else 1)
        agent.spool.maintain()
        if not agent.check_network():
            log.error("mqtt network thread keeps dying; exiting with %d to be restarted",
                      EXIT_FAULT, extra={"ERROR_KIND": "mqtt"})
            code = EXIT_FAULT
            break
        if now >= next_state:
            next_state = now + cfg.mqtt.state_interval_s
            agent.publish_state()
        svc.beat(now, source.state != "hung", agent.status)
        if reload.is_set():
            reload.clear()
            svc.reloading()
            agent.reload(config_path)
            svc.ready(agent.status())
    svc.stopping({EXIT_MEMORY_CEILING: "memory ceiling reached, exiting to be restarted",
                  EXIT_FAULT: "the MQTT connection keeps failing, exiting to be restarted"}
                 .get(code, "stopping"))
    agent.pipe.finish()
    drain = agent.cfg.mqtt.drain_timeout_s
    if code or stop.is_set():
        drain = min(drain, STOP_DRAIN_S)
    drained = agent.publisher.drain(drain)
    agent.publish_state()  # the last, retained report: what is left once the drain is over
    if not drained:
        spool = agent.spool
        log.warning("%d events not yet acknowledged; kept in the spool for the next start "
                    "(%d of them in memory, saved now if the disk takes them)",
                    spool.depth(), spool.in_memory())
    if agent.spool.refused():
        log.warning("%d events refused by the broker; kept in the spool, retried at the next "
                    "start", agent.spool.refused())
    return code


def snapshot(pipe: Pipeline, source: FrameSource, memory: MemoryGuard, pace: PaceWatch,
             publisher: Publisher, spool: Spool) -> dict[str, Any]:
    """The retained `T/state` health report."""
    s = pipe.stats
    return {
        "ts": round(time.time(), 3),
        "uptime_s": round(s.uptime(), 1),
        "fps": round(s.fps, 2),
        "pace": pace.state.value,
        "pace_share": None if pace.share is None else round(pace.share, 3),
        "source_fps": None if pace.source_fps is None else round(pace.source_fps, 2),
        "frames": s.frames,
        "detect_ms": round(s.detect_ms, 2),
        "detect_skipped": s.detect_skipped,
        "classify_ms": round(s.classify_ms, 2),
        "every_n": pipe.every_n,
        "rss_mb": round(memory.rss_mb, 1),
        "peak_rss_mb": round(memory.peak_mb, 1),
        "memory": memory.level.value,
        "memory_sheds": memory.sheds,
        "ceiling_exits": len(memory.exits.exits) if memory.exits else 0,  # in the last hour
        "memory_need_mb": None if memory.fit.need_mb is None else round(memory.fit.need_mb),
        "tracks": sum(t.confirmed for t in pipe.tracker.tracks),  # faces in view
        "people_today": pipe.totals.people,
        "last_gender": pipe.totals.last_face.get("gender"),
        "last_age": pipe.totals.last_face.get("age"),
        "last_age_bucket": pipe.totals.last_face.get("age_bucket"),
        "source": source.state,
        "source_reconnects": source.reconnects,
        "source_error": source.last_error,
        "spool_depth": spool.depth(),
        "spool_dropped": spool.dropped(),
        "spool_id": spool.spool_id,
        "spool": "memory" if spool.fault else "disk",
        "spool_fault": spool.fault or None,
        "spool_in_memory": spool.in_memory(),
        "events_refused": spool.refused(),
        "mqtt_ignored": publisher.ignored,
        "events_lost": pipe.lost_events,
        "broker": "connected" if publisher.connected else "disconnected",
        "reconnects": publisher.reconnects,
    }

"""edge_agent.service and the agent as a service: sd_notify on a socket the test binds, watchdog
pings at the rate $WATCHDOG_USEC asks and none while the loop is stuck, journal entries in the
native protocol, SIGTERM and SIGHUP (valid and invalid configuration)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SAMPLE_CLIP, Broker, free_port
from test_e2e import Recorder, agent_config

from edge_agent import service
from edge_agent.agent import SHED_FACTOR

NO_SYSTEMD_PYTHON = "import sys; sys.modules['systemd'] = None\n"


# --- the protocols, in process ------------------------------------------------------------


class Listener:
    """An AF_UNIX datagram socket standing in for systemd's notify or journal socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), data))

    def messages(self) -> list[tuple[float, str]]:
        return [(t, d.decode()) for t, d in list(self.got)]

    def with_line(self, line: str) -> list[float]:
        return [t for t, m in self.messages() if line in m.split("\n")]

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not self.with_line(line):
            assert time.monotonic() < deadline, f"no {line} in {timeout} s: {self.messages()}"
            time.sleep(0.02)
        return self.with_line(line)[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    yield d
    shutil.rmtree(d)


@pytest.mark.parametrize("lib", [False, True], ids=["fallback", "systemd-python"])
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_reaches_path_and_abstract_sockets(short_dir: Path, monkeypatch:
                                                    pytest.MonkeyPatch, lib: bool,
                                                    abstract: bool) -> None:
    if lib and service.sd_daemon is None:
        pytest.skip("systemd-python is not installed (pip install -e '.[test]')")
    if not lib:
        monkeypatch.setattr(service, "sd_daemon", None)
    address = f"@edge-agent-test-{os.getpid()}" if abstract else str(short_dir / "notify")
    listener = Listener(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    try:
        n = service.Notifier()
        assert n.enabled
        assert n.send("READY=1", "STATUS=hello")
        listener.wait_for("READY=1", 2)
        assert listener.messages()[0][1] == "READY=1\nSTATUS=hello"
    finally:
        listener.close()


@pytest.mark.parametrize("lib", [False, True], ids=["fallback", "systemd-python"])
def test_notifier_without_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch,
                                                  lib: bool) -> None:
    if lib and service.sd_daemon is None:
        pytest.skip("systemd-python is not installed (pip install -e '.[test]')")
    if not lib:
        monkeypatch.setattr(service, "sd_daemon", None)
    assert not service.Notifier({}).send("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    n = service.Notifier()
    assert n.enabled and not n.send("WATCHDOG=1") and not n.send("WATCHDOG=1")


def test_watchdog_interval_is_half_and_only_for_our_pid() -> None:
    me = str(os.getpid())
    assert service.watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert service.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": me}) == 1.5
    assert service.watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None
    assert service.watchdog_interval({}) is None
    assert service.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert service.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_beat_pings_at_the_interval_only_while_healthy_and_rate_limits_status(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "sd_daemon", None)
    listener = Listener(str(short_dir / "notify"))
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "1000000"}
    svc = service.Service(env, status_interval=2.0)
    built = []

    def status() -> str:
        built.append(1)
        return f"status {len(built)}"

    try:
        for i in range(40):  # 4 s of loop turns every 0.1 s; unhealthy from 3 s on
            svc.beat(100.0 + i * 0.1, i < 30, status)
        time.sleep(0.3)
    finally:
        listener.close()
    pings = [m for _, m in listener.messages() if m == "WATCHDOG=1"]
    statuses = [m for _, m in listener.messages() if m.startswith("STATUS=")]
    assert len(pings) == 6, pings  # at 0, 0.5, ... 2.5 s; none once unhealthy
    assert statuses == ["STATUS=status 1", "STATUS=status 2"] and len(built) == 2


def test_status_line_summarises_the_state() -> None:
    state = {"fps": 14.96, "tracks": 2, "rss_mb": 61.4, "source": "reconnecting",
             "source_error": "no frame for 2.0 s", "broker": "connected", "spool_depth": 3}
    assert service.status_line(state) == ("15.0 fps, 2 faces, rss 61 MB, source reconnecting "
                                           "(no frame for 2.0 s), broker connected, spool 3")
    behind = state | {"fps": 6.2, "source": "open", "pace": "behind", "source_fps": 25.0}
    assert service.status_line(behind).startswith("6.2 fps of 25 (behind), 2 faces")


def _parse_journal_datagram(data: bytes) -> dict[str, str]:
    fields, i = {}, 0
    while i < len(data):
        eol = data.index(b"\n", i)
        line = data[i:eol]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = eol + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[eol + 1:eol + 9])
            value = data[eol + 9:eol + 9 + size]
            assert data[eol + 9 + size:eol + 10 + size] == b"\n"
            i = eol + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def test_journal_handler_fallback_speaks_the_native_protocol(
        short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = Listener(str(short_dir / "journal"))
    handler = service.JournalHandler({"SYSLOG_IDENTIFIER": "edge-agent", "CAMERA": "hall"},
                                     path=listener.address)
    logger = logging.getLogger("edge_agent.capture")
    logger.addHandler(handler)
    try:
        logger.warning("lost %s", "rtsp://cam", extra={"TRACK": "7-12", "lower": "ignored"})
        try:
            raise ValueError("two\nlines")
        except ValueError:
            logger.exception("it broke")
        deadline = time.monotonic() + 2
        while len(listener.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        logger.removeHandler(handler)
        handler.close()
        listener.close()
    first, second = (_parse_journal_datagram(d) for _, d in listener.got)
    assert first["MESSAGE"] == "lost rtsp://cam" and first["PRIORITY"] == "4"
    assert first["TRACK"] == "7-12" and "lower" not in first and "LOWER" not in first
    assert first["ERROR_KIND"] == "source" and first["CAMERA"] == "hall"
    assert first["SYSLOG_IDENTIFIER"] == "edge-agent" and first["CODE_FUNC"]
    assert second["PRIORITY"] == "3" and "ValueError: two\nlines" in second["MESSAGE"]


def test_journal_or_stderr_is_chosen_from_the_environment() -> None:
    st = os.fstat(sys.stderr.fileno())
    ours = f"{st.st_dev}:{st.st_ino}"
    assert service.under_systemd({"JOURNAL_STREAM": ours})
    assert not service.under_systemd({"JOURNAL_STREAM": "1:2", "INVOCATION_ID": "x"})
    assert service.under_systemd({"INVOCATION_ID": "abc"})
    assert not service.under_systemd({})


# --- the agent as a subprocess ------------------------------------------------------------


@pytest.fixture(scope="module")
def clip() -> Path:
    """The sample clip (46 s, a face in view from the first frame); looped, faces keep coming."""
    return SAMPLE_CLIP


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID",
                        "JOURNAL_STREAM")}
    return env | extra


def _without_systemd_python(short_dir: Path) -> str:
    """A sitecustomize that makes `import systemd` fail: the agent takes its fallbacks."""
    shim = short_dir / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_SYSTEMD_PYTHON)
    return str(shim)


STALL_ENTRY = Path(__file__).with_name("systemd_stall.py")


def _start(cfg: Path, env: dict[str, str], stall_after_s: float | None = None
           ) -> subprocess.Popen[str]:
    """`edge-agent run`; with `stall_after_s`, through the test-only entry point whose frame
    source blocks for good after that many seconds."""
    entry = ["-m", "edge_agent"] if stall_after_s is None else [str(STALL_ENTRY),
                                                                 str(stall_after_s)]
    return subprocess.Popen([sys.executable, *entry, "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=env)


class Stderr:
    """Collects a child's stderr on a thread, so the pipe never fills."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._run, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.text()[-3000:]}"
            time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_agent_notifies_ready_watchdog_status_and_stopping(
        tmp_path: Path, short_dir: Path, clip: Path, broker: Broker, models_dir: Path) -> None:
    listener = Listener(str(short_dir / "notify"))
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    env = clean_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000",
                     PYTHONPATH=_without_systemd_python(short_dir))
    t0 = time.monotonic()
    proc = _start(cfg, env)
    err = Stderr(proc)
    try:
        ready = listener.wait_for("READY=1", 30)
        time.sleep(6.5)
        proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", 5)
        assert proc.wait(10) == 0, err.text()[-3000:]
    finally:
        _stop(proc)
        listener.close()
    messages = listener.messages()
    assert "READY=1" in messages[0][1].split("\n"), messages[:3]
    assert any(line.startswith("STATUS=") for line in messages[0][1].split("\n"))
    pings = [t for t in listener.with_line("WATCHDOG=1") if ready <= t < stopping]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 11, f"{len(pings)} pings in {stopping - ready:.1f} s"
    assert max(gaps) < 0.9, f"a gap of {max(gaps):.2f} s; the watchdog allows 1 s"
    assert 0.45 <= sum(gaps) / len(gaps) <= 0.7, f"mean gap {sum(gaps) / len(gaps):.2f} s"
    statuses = [(t, m) for t, m in messages if m.startswith("STATUS=")]
    assert len(statuses) >= 1 and "broker connected" in statuses[-1][1], statuses
    assert all(w in statuses[-1][1] for w in ("fps", "faces", "rss", "source open"))
    status_times = [t for t, _ in statuses]
    assert all(b - a >= 4.5 for a, b in itertools.pairwise(status_times))
    print(f"READY {ready - t0:.2f} s after exec; {len(pings)} pings, mean gap "
          f"{sum(gaps) / len(gaps):.2f} s, max {max(gaps):.2f} s")


def test_no_watchdog_pings_while_the_loop_is_stuck(tmp_path: Path, short_dir: Path, clip: Path,
                                                  broker: Broker, models_dir: Path) -> None:
    listener = Listener(str(short_dir / "notify"))
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    env = clean_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000",
                     PYTHONPATH=_without_systemd_python(short_dir))
    proc = _start(cfg, env, stall_after_s=2)
    err = Stderr(proc)
    try:
        listener.wait_for("READY=1", 30)
        err.wait_for("stalling the frame loop now", 10)
        stalled = time.monotonic()
        time.sleep(3)
        assert proc.poll() is None, "the process is alive, only its loop is stuck"
        pings = listener.with_line("WATCHDOG=1")
        assert pings and stalled - pings[0] > 1.0, "pings came before the stall"
        late = [t - stalled for t in pings if t > stalled + 0.1]
        assert not late, f"pings {late} s after the loop stalled"
    finally:
        _stop(proc)
        listener.close()


def _events_state(rec: Recorder) -> dict[str, Any]:
    return json.loads(rec.retained.get("state", "{}"))


def _every_n_is(state: dict[str, Any], n: int) -> bool:
    """The configured N, or SHED_FACTOR times it while memory pressure sheds work."""
    return state.get("every_n") == n * (SHED_FACTOR if state.get("memory") == "shed" else 1)


def test_sigterm_ends_tracks_and_goes_offline_within_seconds(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    rec = Recorder(broker.port, "edge-agent/test-pi")
    proc = _start(cfg, clean_env())
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events), 30)
        open_tracks = {e["track_id"] for e in rec.events if e["type"] == "new"} - \
            {e["track_id"] for e in rec.events if e["type"] == "end"}
        assert open_tracks, "stop while a face is in view"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, err.text()[-3000:]
        took = time.monotonic() - t0
        assert rec.wait_for(lambda: rec.status[-1:] == ["offline"], 5), rec.status
    finally:
        _stop(proc)
        rec.close()
    print(f"SIGTERM to exit: {took:.2f} s")
    assert took < 3.0
    events = rec.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    ended = {e["track_id"] for e in events if e["type"] == "end"}
    assert open_tracks <= ended


def test_sigterm_with_the_broker_down_waits_at_most_3_s(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    data = yaml.safe_load(cfg.read_text())
    data["mqtt"]["drain_timeout_s"] = 30
    cfg.write_text(yaml.safe_dump(data))
    rec = Recorder(broker.port, "edge-agent/test-pi")
    proc = _start(cfg, clean_env())
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events), 30)
        rec.close()
        broker.stop()
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, err.text()[-3000:]
        took = time.monotonic() - t0
    finally:
        _stop(proc)
    print(f"SIGTERM to exit with the broker down: {took:.2f} s")
    assert took < 3.0 + 2.5, f"SIGTERM to exit took {took:.1f} s"
    assert "kept in the spool for the next start" in err.text()


def _rewrite(cfg: Path, **sections: dict[str, Any]) -> None:
    data = yaml.safe_load(cfg.read_text())
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    cfg.write_text(yaml.safe_dump(data))


def test_sighup_applies_a_valid_config_without_losing_an_event(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:
    """Camera label (pipeline rebuilt), topic prefix (publisher reconnected), every_n (in
    place), spool bound (next start only): one SIGHUP, same process, seq unbroken."""
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    rec = Recorder(broker.port, "+/test-pi")
    proc = _start(cfg, clean_env())
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events), 30)
        _rewrite(cfg, camera="porch", detect={"every_n_frames": 3},
                 mqtt={"topic_prefix": "site-b"}, spool={"max_events": 5000})
        before = len(rec.events)
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reloaded", 10)
        assert rec.wait_for(lambda: any(e["camera"] == "porch" and e["type"] == "new"
                                        for e in rec.events), 30), "no event after reload"
        assert rec.wait_for(lambda: _every_n_is(_events_state(rec), 3), 15), _events_state(rec)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        _stop(proc)
        rec.close()
    log = err.text()
    assert "spool.max_events take effect at the next start" in log
    reloaded = next(line for line in log.splitlines() if "reloaded" in line)
    for key in ("camera", "detect.every_n_frames", "mqtt.topic_prefix"):
        assert key in reloaded, reloaded
    events = rec.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "seq must carry on"
    old = [e for e in events if e["camera"] == "hall"]
    new = [e for e in events if e["camera"] == "porch"]
    assert len(old) >= before and new
    old_ids = {e["track_id"] for e in old}
    assert {e["track_id"] for e in old if e["type"] == "new"} <= \
        {e["track_id"] for e in old if e["type"] == "end"}, "tracks end when the pipeline goes"
    assert not old_ids & {e["track_id"] for e in new}, "track ids stay unique"
    assert max(e["seq"] for e in old) < min(e["seq"] for e in new)


def test_sighup_with_an_invalid_config_keeps_the_old_one(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    rec = Recorder(broker.port, "edge-agent/test-pi")
    proc = _start(cfg, clean_env())
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: _events_state(rec).get("frames", 0) > 0, 30)
        _rewrite(cfg, camera="porch", detect={"every_n_frames": "five"})
        proc.send_signal(signal.SIGHUP)
        err.wait_for("keeping the running configuration", 10)
        frames = _events_state(rec)["frames"]
        assert rec.wait_for(lambda: _events_state(rec)["frames"] > frames + 15, 5)
        assert proc.poll() is None
        n = len(rec.events)
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events[n:]), 30)
    finally:
        _stop(proc)
        rec.close()
    assert "detect.every_n_frames: expected an integer >= 1, got 'five'" in err.text()
    assert all(e["camera"] == "hall" for e in rec.events)
    assert _events_state(rec)["every_n"] == 5


def test_sighup_turning_tls_on_waits_for_a_restart(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:
    """Started without TLS, the agent runs without OpenSSL (edge_agent/openssl.py): a reload
    that turns `mqtt.tls` on keeps the running connection and says so; the rest applies."""
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    rec = Recorder(broker.port, "edge-agent/test-pi")  # the old prefix
    proc = _start(cfg, clean_env())
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events), 30)
        _rewrite(cfg, camera="porch", mqtt={"tls": True, "topic_prefix": "site-b"})
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reloaded", 10)
        assert rec.wait_for(lambda: any(e["camera"] == "porch" and e["type"] == "new"
                                        for e in rec.events), 30), "no event after reload"
        assert proc.poll() is None
    finally:
        _stop(proc)
        rec.close()
    log = err.text()
    assert "mqtt.tls needs OpenSSL" in log and "mqtt.* take effect at the next start" in log
    reloaded = next(line for line in log.splitlines() if "reloaded" in line)
    assert "camera" in reloaded and "mqtt" not in reloaded, reloaded
    assert all(e["seq"] == i for i, e in enumerate(rec.events, 1))


def test_reload_keeps_everything_when_a_file_or_model_is_missing(
        tmp_path: Path, clip: Path, models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checks that only a running system can make (the file exists, the models verify) come
    before anything is torn down."""
    from edge_agent import agent, config

    path = agent_config(tmp_path, models_dir, free_port(), str(clip), loop=True)
    cfg = config.load(path)
    caplog.set_level(logging.INFO)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(logging.getLogger().setLevel, logging.getLogger().level)
        a = agent.Agent(cfg, cleanup)
        source, pipe, publisher = a.source, a.pipe, a.publisher
        _rewrite(path, source={"uri": str(tmp_path / "gone.mp4")})
        a.reload(str(path))
        _rewrite(path, source={"uri": str(clip)}, models={"dir": str(tmp_path)},
                 detect={"backend": "ultraface"})
        a.reload(str(path))
        assert (a.source, a.pipe, a.publisher, a.cfg) == (source, pipe, publisher, cfg)
        _rewrite(path, models={"dir": str(models_dir)}, detect={"backend": "yunet"},
                 track={"max_unseen_s": 2.0}, memory={"ceiling_mb": 300})
        a.reload(str(path))
        assert a.source is source and a.publisher is publisher and a.pipe is not pipe
        assert a.memory.ceiling_mb == 300 and a.pipe.stats is pipe.stats
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("keeping the running configuration" in e for e in errors)
    assert "source.uri" in errors[0] and "gone.mp4" in errors[0]
    assert "version-RFB-320.onnx" in errors[1], errors[1]
    assert "reloaded" in caplog.text and "memory.ceiling_mb, track.max_unseen_s" in caplog.text

"""Nothing lost, nothing hung (docs/operations.md, "Faults"): signal storms against a real
`edge-agent run`, reloads and starts with files that once killed it, two agents on one spool,
MQTT 5 refusals from a real mosquitto with an ACL, a full tmpfs under the spool, a broker that
never answers CONNECT, and what the broker sends on the Home Assistant status topic."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from conftest import Broker, wait_for
from test_e2e import Recorder, agent_config
from test_service import Stderr, clean_env, clip  # noqa: F401 - clip is a fixture

from edge_agent import mqtt as mqtt_mod
from edge_agent.agent import STOP_DRAIN_S
from edge_agent.config import MqttConfig, SpoolConfig
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool

T = "edge-agent/test-pi"
BAD_FILES = {
    "not UTF-8": (b"device_id: test-pi\ncamera: \xff\xfe\n", "not UTF-8 text"),
    "huge integer": (b"memory: {ceiling_mb: " + b"9" * 400 + b"}\n",
                     "memory.ceiling_mb: expected a number"),
    "empty host": (b"mqtt: {host: ''}\n", "mqtt.host: expected a host name"),
    "keepalive": (b"mqtt: {keepalive_s: 70000}\n", "mqtt.keepalive_s: expected an integer"),
    "long device_id": (b"device_id: " + b"d" * 70000 + b"\n", "device_id: expected at most"),
}


def _start(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=clean_env())


def _frames(rec: Recorder) -> int:
    return int(json.loads(rec.retained.get("state", "{}")).get("frames", 0))


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_sighup_storm_never_hangs_and_sigterm_still_ends_in_time(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:  # noqa: F811
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    rec = Recorder(broker.port, T)
    proc = _start(cfg)
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: _frames(rec) > 0, 30), err.text()[-2000:]
        for _ in range(300):
            os.kill(proc.pid, signal.SIGHUP)
        for _ in range(50):
            os.kill(proc.pid, signal.SIGHUP)
            time.sleep(0.02)
        before = _frames(rec)
        assert rec.wait_for(lambda: _frames(rec) > before + 5, 15), \
            f"frame loop stopped after the SIGHUP storm:\n{err.text()[-3000:]}"
        for _ in range(100):  # a storm with the SIGTERM in the middle of it
            os.kill(proc.pid, signal.SIGHUP)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        for _ in range(100):
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGHUP)
        code = proc.wait(STOP_DRAIN_S + 10)
        took = time.monotonic() - t0
    finally:
        _kill(proc)
        rec.close()
    print(f"SIGTERM after a SIGHUP storm: exit {code} in {took:.2f} s")
    assert code == 0, err.text()[-3000:]
    assert took < STOP_DRAIN_S + 2.0
    assert "Traceback" not in err.text()


def test_reload_with_bad_files_keeps_running_and_the_same_files_at_start_exit_2(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:  # noqa: F811
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    good = cfg.read_bytes()
    rec = Recorder(broker.port, T)
    proc = _start(cfg)
    err = Stderr(proc)
    try:
        assert rec.wait_for(lambda: _frames(rec) > 0, 30), err.text()[-2000:]
        for name, (content, _) in BAD_FILES.items():
            base = yaml.safe_load(good)
            bad = (content if name == "not UTF-8" else
                   yaml.safe_dump(base).encode() + content.replace(b"mqtt: {", b"mqtt2: {"))
            if name in ("empty host", "keepalive"):
                base["mqtt"] |= yaml.safe_load(content)["mqtt"]
                bad = yaml.safe_dump(base, width=10**6).encode()
            elif name != "not UTF-8":
                base |= yaml.safe_load(content)
                bad = yaml.safe_dump(base, width=10**6).encode()
            cfg.write_bytes(bad)
            n = err.text().count("reload of")
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while err.text().count("reload of") == n:
                assert time.monotonic() < deadline and proc.poll() is None, err.text()[-3000:]
                time.sleep(0.05)
            assert "failed, keeping the running configuration" in err.text().splitlines()[-1] \
                or "failed, keeping" in err.text(), err.text()[-2000:]
        before = _frames(rec)
        assert rec.wait_for(lambda: _frames(rec) > before, 10)
        assert rec.status[-1] == "online" and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_DRAIN_S + 5) == 0, err.text()[-3000:]
    finally:
        _kill(proc)
        rec.close()
    assert "Traceback" not in err.text()
    for name, (content, message) in BAD_FILES.items():
        base = yaml.safe_load(good)
        if name == "not UTF-8":
            bad = content
        elif name in ("empty host", "keepalive"):
            base["mqtt"] |= yaml.safe_load(content)["mqtt"]
            bad = yaml.safe_dump(base, width=10**6).encode()
        else:
            base |= yaml.safe_load(content)
            bad = yaml.safe_dump(base, width=10**6).encode()
        path = tmp_path / f"bad-{name.replace(' ', '-')}.yaml"
        path.write_bytes(bad)
        for command in ("run", "check-config"):
            r = subprocess.run([sys.executable, "-m", "edge_agent", command, "-c", str(path)],
                               capture_output=True, text=True, timeout=60, env=clean_env())
            assert r.returncode == 2, (name, command, r.stderr[-2000:])
            assert message in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)


def test_two_agents_on_one_spool_the_second_exits_2(
        tmp_path: Path, clip: Path, broker: Broker, models_dir: Path) -> None:  # noqa: F811
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), loop=True)
    rec = Recorder(broker.port, T)
    first = _start(cfg)
    err = Stderr(first)
    try:
        assert rec.wait_for(lambda: _frames(rec) > 0, 30), err.text()[-2000:]
        second = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                                capture_output=True, text=True, timeout=60, env=clean_env())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"in use by another edge-agent process (pid {first.pid})" in second.stderr
        assert first.poll() is None and rec.status[-1] == "online"
        first.send_signal(signal.SIGTERM)
        assert first.wait(STOP_DRAIN_S + 5) == 0
    finally:
        _kill(first)
        rec.close()


# --- the publisher against real brokers ----------------------------------------------------



class Sub:
    def __init__(self, port: int, topic: str = f"{T}/events", name: str = "sub") -> None:
        self.got: list[bytes] = []
        self.last: dict[str, bytes] = {}
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}")
        self.c.username_pw_set("reader")
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        if m.topic.endswith("/events"):
            self.got.append(m.payload)
        self.last[m.topic.rsplit("/", 1)[1]] = m.payload

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in list(self.got)]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_mqtt5_refused_events_are_kept_counted_and_sent_after_a_reconnect(
        tmp_path: Path, broker: Broker) -> None:
    """mosquitto with an ACL that lets the agent say `online` but not publish events."""
    acl = tmp_path / "acl"
    acl.write_text(f"user agent\ntopic write {T}/status\ntopic write {T}/state\n"
                   f"topic read homeassistant/status\n"
                   f"user reader\ntopic read {T}/#\n")
    broker.stop()
    broker.extra_conf = f"acl_file {acl}\n"
    broker.start()
    spool = Spool(SpoolConfig(path=str(tmp_path / "spool.db")))
    sub = Sub(broker.port)
    pub = Publisher(MqttConfig(port=broker.port, protocol="5", username="agent",
                               discovery=False, reconnect_min_s=2.0), T, spool)
    try:
        assert wait_for(lambda: pub.connected)
        for i in range(20):
            pub.publish_event({"type": "new", "i": i})
        assert wait_for(lambda: spool.refused() == 20), (spool.refused(), spool.depth())
        assert spool.depth() == 0 and sub.got == []
        acl.write_text(acl.read_text() + f"user agent\ntopic write {T}/events\n")
        broker.stop()  # the broker reads its ACL at start; the agent reconnects
        sub.close()
        broker.start()
        sub = Sub(broker.port)  # before the agent is back (it waits 2 s)
        assert wait_for(lambda: spool.refused() == 0 and spool.depth() == 0, 20)
        assert wait_for(lambda: len(sub.got) >= 20, 10)
        assert sorted(json.loads(p)["i"] for p in sub.got) == list(range(20))
    finally:
        pub.stop()
        sub.close()
        spool.close()
    assert spool.dropped() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_mid_run_delivers_from_memory_and_the_accounting_is_true(
        small_disk: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent import spool as spool_mod

    monkeypatch.setattr(spool_mod, "RETRY_DISK_S", 0.2)
    spool = Spool(SpoolConfig(path=str(small_disk / "spool.db")))
    sub = Sub(broker.port)
    pub = Publisher(MqttConfig(port=broker.port, discovery=False), T, spool)

    def events() -> list[dict[str, Any]]:
        return [json.loads(p) for p in list(sub.got)]

    filler = small_disk / "filler"
    reserve = small_disk / "reserve"  # freed with the filler: the WAL may have taken the rest
    reserve.write_bytes(b"\0" * 64 * 1024)
    payload = "x" * 1500
    try:
        assert wait_for(lambda: pub.connected)
        for i in range(10):
            pub.publish_event({"type": "new", "i": i, "pad": payload})
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # the rest of the disk
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        sent = 10
        while not spool.fault and sent < 400:
            pub.publish_event({"type": "new", "i": sent, "pad": payload})
            sent += 1
        assert spool.fault, "the disk never filled"
        for i in range(sent, sent + 50):
            pub.publish_event({"type": "new", "i": i, "pad": payload})
            assert spool.depth() >= 0
        sent += 50
        assert wait_for(lambda: spool.depth() == 0, 20), spool.depth()
        assert spool.pending(0, 10_000) == []  # the report is what the spool holds
        assert wait_for(lambda: len({e["i"] for e in events()}) == sent, 10)
        filler.unlink()
        reserve.unlink()
        assert wait_for(lambda: (spool.maintain(), not spool.fault)[1], 5)
        pub.publish_event({"type": "new", "i": sent})
        assert wait_for(lambda: len({e["i"] for e in events()}) == sent + 1, 10)
        wal = Path(f"{small_disk / 'spool.db'}-wal")
        assert not wal.exists() or wal.stat().st_size <= 300 * 1024
    finally:
        pub.stop()
        sub.close()
        spool.close()
    ids = {(e["spool_id"], e["seq"]) for e in events()}
    assert len(ids) == len({e["i"] for e in events()}), "two events share (spool_id, seq)"
    assert spool.dropped() == 0


def test_a_broker_that_never_sends_connack_is_logged_and_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_mod, "CONNACK_TIMEOUT_S", 1.0)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: [accepted.append(server.accept()[0]) for _ in range(3)],
                     daemon=True).start()
    spool = Spool(SpoolConfig(path=str(tmp_path / "spool.db")))
    caplog.set_level(logging.WARNING, "edge_agent.mqtt")
    pub = Publisher(MqttConfig(port=port, discovery=False, reconnect_min_s=0.2,
                               reconnect_max_s=0.5), T, spool)
    try:
        assert wait_for(lambda: "no CONNACK within 1 s" in caplog.text, 10), caplog.text
        assert wait_for(lambda: len(accepted) >= 2, 10), "no retry after the CONNACK timeout"
    finally:
        pub.stop()
        spool.close()
        server.close()
        for s in accepted:
            s.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_oversized_binary_and_empty_ha_status_are_ignored_and_counted(
        tmp_path: Path, broker: Broker, protocol: str) -> None:
    spool = Spool(SpoolConfig(path=str(tmp_path / "spool.db")))
    pub = Publisher(MqttConfig(port=broker.port, protocol=protocol), T, spool)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="hostile")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        assert wait_for(lambda: pub.connected)
        time.sleep(0.3)
        for payload in (b"x" * (2 << 20), bytes(range(256)), b"", b"online\0"):
            c.publish("homeassistant/status", payload, qos=1).wait_for_publish(5)
        c.publish("homeassistant/status", b"online", qos=1).wait_for_publish(5)
        time.sleep(1.0)
        # MQTT 5: the broker drops the 2 MB one for us (Maximum Packet Size); 3.1.1 counts it
        assert pub.ignored == (4 if protocol == "3.1.1" else 3), pub.ignored
        assert pub.connected
    finally:
        c.loop_stop()
        c.disconnect()
        pub.stop()
        spool.close()


def test_read_only_disk_at_start_runs_from_memory_then_returns_to_disk(
        small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_agent import spool as spool_mod

    monkeypatch.setattr(spool_mod, "RETRY_DISK_S", 0.0)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    spool = Spool(SpoolConfig(path=str(small_disk / "spool.db")))
    try:
        assert spool.fault and spool.depth() == 0
        assert [spool.append({"i": i}) for i in range(3)] == [1, 2, 3]
        memory_id = spool.spool_id
        spool.maintain()
        assert spool.fault
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        spool.maintain()
        assert not spool.fault and spool.spool_id != memory_id
        assert spool.depth() == 3 and spool.append({"i": 3}) == 1
        assert [json.loads(p)["spool_id"] for _, p in spool.pending(0, 10)] == \
            [spool.spool_id] + [memory_id] * 3
    finally:
        assert spool.close() == 0
    spool = Spool(SpoolConfig(path=str(small_disk / "spool.db")))
    assert spool.depth() == 4  # what memory held went to disk at close
    spool.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_network_thread_is_noticed(tmp_path: Path, broker: Broker) -> None:
    """keepalive 70000 (refused by config.load since) made paho's thread die of struct.error
    at CONNECT; built without the loader, it still does, and the publisher notices."""
    spool = Spool(SpoolConfig(path=str(tmp_path / "spool.db")))
    pub = Publisher(MqttConfig(port=broker.port, keepalive_s=70000, discovery=False), T, spool)
    try:
        assert wait_for(lambda: not pub.network_alive(), 10)
        assert not pub.connected
    finally:
        pub.stop()
        spool.close()
    ok = Publisher(MqttConfig(port=broker.port, discovery=False), T, spool := Spool(
        SpoolConfig(path=str(tmp_path / "spool2.db"))))
    try:
        assert wait_for(lambda: ok.connected) and ok.network_alive()
    finally:
        ok.stop()
        spool.close()


def test_agent_on_a_disk_that_fills_mid_run_delivers_every_event(
        small_disk: Path, tmp_path: Path, clip: Path, broker: Broker,  # noqa: F811
        models_dir: Path) -> None:
    """The issue's run: the spool on a 256 KB file system that fills up while the clip plays.
    Every event reaches the broker once (by spool_id, seq), the agent exits 0, and the last
    T/state reports an empty spool: nothing was left, so no stop message claims otherwise."""
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), realtime=False)
    data = yaml.safe_load(cfg.read_text())
    data["spool"]["path"] = str(small_disk / "spool.db")
    cfg.write_text(yaml.safe_dump(data))
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"\0" * 140 * 1024)  # room to open the spool, not for the run
    except OSError:
        pass
    finally:
        os.close(fd)
    baseline = tmp_path / "baseline.yaml"
    baseline.write_text(yaml.safe_dump(data | {"spool": {"path": str(tmp_path / "b.db")},
                                               "device_id": "baseline"}))
    base_rec = Sub(broker.port, "edge-agent/baseline/#", "base")
    rec = Sub(broker.port, f"{T}/#", "full")
    try:
        b = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(baseline)],
                           capture_output=True, text=True, timeout=180, env=clean_env())
        assert b.returncode == 0, b.stderr[-2000:]
        r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=180, env=clean_env())
        assert wait_for(lambda: rec.last.get("status") == b"offline", 5)
    finally:
        rec.close()
        base_rec.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "keeping events in memory" in r.stderr, "the disk never filled"
    assert "could not store event" not in r.stderr and "Traceback" not in r.stderr
    assert "not yet acknowledged" not in r.stderr, r.stderr[-2000:]
    events = rec.events()
    keys = [(e["spool_id"], e["seq"]) for e in events]
    assert len(set(keys)) == len(base_rec.events()), (keys, len(base_rec.events()))
    assert len({sid for sid, _ in keys}) >= 2, "no event went through memory"
    state = json.loads(rec.last["state"])
    assert state["spool_depth"] == 0, state
    news = {e["track_id"] for e in events if e["type"] == "new"}
    ends = {e["track_id"] for e in events if e["type"] == "end"}
    assert news and news == ends, (news, ends)


def test_the_unit_restarts_on_every_exit_code_but_configuration() -> None:
    from conftest import REPO

    from edge_agent.agent import EXIT_FAULT
    from edge_agent.health import EXIT_MEMORY_CEILING

    unit = (REPO / "deploy" / "systemd" / "edge-agent.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Restart"] == "on-failure"
    assert settings["RestartPreventExitStatus"].split() == ["2"]
    assert {EXIT_FAULT, EXIT_MEMORY_CEILING} == {74, 75}
    ops = (REPO / "docs" / "operations.md").read_text()
    for code in (0, 2, 3, 74, 75):
        assert f"| {code} |" in ops or f"| **{code}** |" in ops, code

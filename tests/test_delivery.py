"""Delivery that loses nothing, with the real agent (`python -m edge_agent run`) and mosquitto:
broker outages, SIGKILL, spool bounds, credentials and TLS, Home Assistant discovery."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import REPO, Broker, event_errors
from test_e2e import agent_config, run_agent
from test_mqtt import first_seen, make_pki, tls_listener, wait_for

from devtools import assets
from devtools.broker import free_port, wait_port

pytestmark = pytest.mark.slow

BASE = "edge-agent/test-pi"
HA = "homeassistant"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A face coming and going ten times (cut from the sample clip), and how many faces that is:
    many events per second at full speed."""
    return assets.busy_clip(tmp_path_factory.mktemp("clip") / "busy.mp4", cycles=10), 10


class Collector:
    """A subscriber in a persistent session: with broker persistence it misses nothing across
    a broker restart. Every event is checked against docs/event.schema.json."""

    def __init__(self, port: int, auth: tuple[str, str] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.status: list[str] = []
        self.state: dict[str, Any] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.invalid: list[str] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="delivery-collector",
                             clean_session=False)
        if auth:
            self.c.username_pw_set(*auth)
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.on_connect = lambda c, *_: c.subscribe([(f"{BASE}/#", 1), (f"{HA}/#", 1)])
        self.c.on_subscribe = lambda *_: self.ready.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(5)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode()
        with self.lock:
            if msg.topic == f"{BASE}/events":
                self.events.append(json.loads(text))
                self.invalid += [f"{text}: {e}" for e in event_errors(self.events[-1])]
            elif msg.topic == f"{BASE}/status":
                self.status.append(text)
            elif msg.topic == f"{BASE}/state":
                self.state = json.loads(text)
            elif msg.topic.endswith("/config"):
                self.configs[msg.topic] = json.loads(text)

    def seqs(self) -> list[int]:
        with self.lock:
            return [e["seq"] for e in self.events]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()
        assert not self.invalid, "events breaking the schema:\n" + "\n".join(self.invalid[:5])


def persistent_broker(broker: Broker, extra: str = "") -> None:
    """mosquitto that keeps sessions and queued messages across its own restart."""
    db = broker.workdir / "db"
    db.mkdir(exist_ok=True)
    broker.extra_conf = (f"persistence true\npersistence_location {db}/\n"
                         f"max_queued_messages 0\n{extra}")
    broker.stop()
    broker.start()


def write_config(tmp_path: Path, models_dir: Path, port: int, clip: Path, mqtt_: dict[str, Any]
                 | None = None, spool: dict[str, Any] | None = None, **source: Any) -> Path:
    cfg = agent_config(tmp_path, models_dir, port, str(clip), **{"realtime": False, **source})
    data = yaml.safe_load(cfg.read_text())
    data["mqtt"] |= {"state_interval_s": 0.5, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
                     "drain_timeout_s": 10, **(mqtt_ or {})}
    data["spool"] |= spool or {}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def start_agent(procs: list[subprocess.Popen[bytes]], cfg: Path) -> subprocess.Popen[bytes]:
    log = (cfg.parent / f"agent-{len(procs)}.log").open("wb")
    p = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                         stderr=log)
    log.close()
    procs.append(p)
    return p


def spool_db(tmp_path: Path) -> tuple[list[int], int, int]:
    """(seqs waiting, last seq handed out, dropped) as the agent's spool file holds them."""
    path = tmp_path / "spool.db"
    if not path.exists():
        return [], 0, 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        pending = [r[0] for r in db.execute("SELECT seq FROM events ORDER BY seq")]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        return pending, int(meta.get("last_seq", 0)), int(meta.get("dropped", 0))
    except sqlite3.OperationalError as e:
        if "no such table" not in str(e):
            raise
        return [], 0, 0  # the agent is creating it right now
    finally:
        db.close()


def listening_sockets(pid: int) -> list[str]:
    """Sockets of `pid` that accept connections (TCP LISTEN) or datagrams (any bound UDP)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.is_symlink() else ""
        if m := re.fullmatch(r"socket:\[(\d+)\]", with_target):
            inodes.add(m[1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes and (proto.startswith("udp") or f[3] == "0A"):
                found.append(f"{proto} {f[1]}")
    return found


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_broker_outage_mid_run_loses_nothing(tmp_path: Path, broker: Broker, models_dir: Path,
                                             clip: tuple[Path, Any], agents: list[Any]) -> None:
    """Events keep coming while mosquitto is down for 3 s; afterwards every seq has arrived,
    first copies in order, `online` was announced again, and the agent listens on no port."""
    persistent_broker(broker)
    col = Collector(broker.port)
    cfg = write_config(tmp_path, models_dir, broker.port, clip[0], loop=True)
    agent = start_agent(agents, cfg)
    try:
        assert wait_for(lambda: len(col.events) >= 4, 30), "no events before the outage"
        assert listening_sockets(agent.pid) == []
        broker.stop()
        before = spool_db(tmp_path)[1]
        time.sleep(3.0)
        pending, during, _ = spool_db(tmp_path)
        assert agent.poll() is None and during > before + 3 and pending[-1] == during
        broker.start()
        assert wait_for(lambda: max(col.seqs()) > during + 3, 30), "nothing new after it"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        pending, last, dropped = spool_db(tmp_path)
        assert pending == [] and dropped == 0
        assert wait_for(lambda: set(col.seqs()) >= set(range(1, last + 1)), 10), \
            sorted(set(range(1, last + 1)) - set(col.seqs()))[:20]
        assert wait_for(lambda: col.status[-1:] == ["offline"], 5)
    finally:
        col.close()
    assert first_seen(col.seqs()) == list(range(1, last + 1))
    assert col.status.count("online") == 2, col.status  # again after the reconnect
    assert col.state["reconnects"] == 1 and col.state["spool_dropped"] == 0
    assert sorted(col.configs) == sorted(f"{HA}/sensor/test-pi/{k}/config" for k in (
        "tracks", "people_today", "last_gender", "last_age", "fps", "rss_mb", "pace"))
    for c in col.configs.values():  # every sensor reads a field the state really has
        field = re.fullmatch(r"\{\{ value_json\.(\w+) \}\}", c["value_template"])
        assert field and field[1] in col.state, (c, sorted(col.state))
        assert (c["state_topic"], c["availability_topic"]) == (f"{BASE}/state", f"{BASE}/status")


def test_sigkill_while_broker_down_then_restart_delivers_the_spool(
        tmp_path: Path, broker: Broker, models_dir: Path, clip: tuple[Path, Any],
        agents: list[Any]) -> None:
    persistent_broker(broker)
    col = Collector(broker.port)
    looping = write_config(tmp_path, models_dir, broker.port, clip[0], loop=True)
    agent = start_agent(agents, looping)
    try:
        assert wait_for(lambda: len(col.events) >= 2, 30)
        broker.stop()
        sent = max(col.seqs())
        assert wait_for(lambda: spool_db(tmp_path)[1] >= sent + 5, 30)
        agent.send_signal(signal.SIGKILL)
        agent.wait(5)
        spooled, killed_at, _ = spool_db(tmp_path)
        assert spooled and spooled[-1] == killed_at
        broker.start()
        r = run_agent(write_config(tmp_path, models_dir, broker.port, clip[0]), 120)
        assert r.returncode == 0, r.stderr[-2000:]
        pending, last, _ = spool_db(tmp_path)
        assert pending == [] and last > killed_at
        assert wait_for(lambda: set(col.seqs()) >= set(range(1, last + 1)), 10)
    finally:
        col.close()
    seqs = first_seen(col.seqs())
    assert seqs == list(range(1, last + 1)) and set(spooled) <= set(seqs)
    once = {e["seq"]: e for e in col.events}.values()  # at least once: a resend is no repeat
    news = [e["track_id"] for e in once if e["type"] == "new"]
    assert len(set(news)) == len(news), "track ids repeat after the restart"


def test_long_outage_fills_the_spool_to_its_bound(tmp_path: Path, broker: Broker,
                                                  models_dir: Path, clip: tuple[Path, Any],
                                                  agents: list[Any]) -> None:
    """With the broker down the spool stays at spool.max_events, dropping the oldest and
    counting them; the agent's memory stays flat; after the outage the newest arrive and
    T/state reports the drops."""
    persistent_broker(broker)
    col = Collector(broker.port)
    broker.stop()
    cfg = write_config(tmp_path, models_dir, broker.port, clip[0], loop=True,
                       spool={"max_events": 10})
    agent = start_agent(agents, cfg)
    try:
        assert wait_for(lambda: spool_db(tmp_path)[2] >= 1, 30), "the spool never filled"
        rss: list[float] = []
        depths: list[int] = []
        while spool_db(tmp_path)[2] < 120:
            assert agent.poll() is None and len(rss) < 300
            rss.append(rss_mb(agent.pid))
            depths.append(len(spool_db(tmp_path)[0]))
            time.sleep(0.1)
        assert max(depths) == 10
        assert max(rss) - rss[0] < 8, rss  # flat: nothing accumulates in memory while offline
        broker.start()
        assert wait_for(lambda: col.state.get("spool_dropped", 0) >= 120, 20), col.state
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        pending, last, dropped = spool_db(tmp_path)
        assert pending == []
        assert wait_for(lambda: max(col.seqs(), default=0) == last, 10)
        assert wait_for(lambda: col.state.get("spool_dropped") == dropped, 5), col.state
    finally:
        col.close()
    got = sorted(set(col.seqs()))
    assert got[0] > 1 and got == list(range(got[0], last + 1)), got  # the oldest went
    assert len(got) + dropped >= last  # everything not dropped arrived


def test_wrong_password_keeps_the_frame_loop_running(tmp_path: Path, broker: Broker,
                                                     models_dir: Path,
                                                     clip: tuple[Path, int]
                                                     ) -> None:
    """A refused login is logged once per back-off step; the clip is still processed to the
    end and its events are kept in the spool for later."""
    users = tmp_path / "users"
    users.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(users), "agent", "s3cret"], check=True)
    broker.extra_conf = f"allow_anonymous false\npassword_file {users}\n"
    broker.stop()
    broker.start()
    cfg = write_config(tmp_path, models_dir, broker.port, clip[0],
                       {"username": "agent", "reconnect_min_s": 0.5, "drain_timeout_s": 2})
    env = os.environ | {"EDGE_AGENT_MQTT_PASSWORD": "wr0ng-pw"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                       capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    refusals = [ln for ln in r.stderr.splitlines() if "refused the connection" in ln]
    assert 1 <= len(refusals) <= took / 0.5 + 2, refusals
    assert all("Not authorized" in ln and "check mqtt.username" in ln for ln in refusals)
    assert "password from EDGE_AGENT_MQTT_PASSWORD" in r.stderr and "wr0ng-pw" not in r.stderr
    db = sqlite3.connect(f"file:{tmp_path / 'spool.db'}?mode=ro", uri=True)
    events = [json.loads(p) for (p,) in db.execute("SELECT payload FROM events ORDER BY seq")]
    db.close()
    assert sum(e["type"] == "new" for e in events) == clip[1]  # every face seen
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert not [e for e in events if event_errors(e)]


def test_world_readable_password_file_is_refused(tmp_path: Path, broker: Broker,
                                                 models_dir: Path, clip: tuple[Path, Any]
                                                 ) -> None:
    pw = tmp_path / "mqtt.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    cfg = write_config(tmp_path, models_dir, broker.port, clip[0],
                       {"username": "agent", "password_file": "mqtt.pw"})
    r = run_agent(cfg, 60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(r"mqtt\.password_file: .*mqtt\.pw is readable by every user \(mode 0644\)",
                     r.stderr), r.stderr[-2000:]
    assert "s3cret" not in r.stderr


def test_tls_client_certificate_and_password_end_to_end(
        tmp_path: Path, broker: Broker, models_dir: Path,
        clip: tuple[Path, int]) -> None:
    """MQTT 5 over mutual TLS with a password from a systemd credential, files relative to
    the config; the collector uses the plain listener."""
    pki = make_pki(tmp_path / "pki")
    users = tmp_path / "users"
    users.touch(mode=0o600)
    for user, pw in (("agent", "s3cret"), ("collector", "c0llect")):
        subprocess.run(["mosquitto_passwd", "-b", str(users), user, pw], check=True)
    port = free_port()
    broker.extra_conf = (f"allow_anonymous false\npassword_file {users}\n"
                         + tls_listener(port, pki, mutual=True))
    broker.stop()
    broker.start()
    wait_port(port)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret")
    cfg = write_config(tmp_path, models_dir, port, clip[0], {
        "protocol": "5", "username": "agent", "tls": True, "ca_file": "pki/ca.crt",
        "cert_file": "pki/client.crt", "key_file": "pki/client.key"})
    col = Collector(broker.port, ("collector", "c0llect"))
    try:
        r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=120,
                           env=os.environ | {"CREDENTIALS_DIRECTORY": str(creds)}, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "password from systemd credential mqtt-password" in r.stderr
        assert "(TLS)" in r.stderr
        last = spool_db(tmp_path)[1]
        assert wait_for(lambda: sorted(set(col.seqs())) == list(range(1, last + 1)), 10)
        assert wait_for(lambda: col.status[-1:] == ["offline"], 5)
    finally:
        col.close()
    assert sum(e["type"] == "new" for e in col.events) == clip[1]


def test_spool_outage_bench_short(tmp_path: Path) -> None:
    """devtools/spool_outage.py in seconds: a bounded spool keeps exactly the newest events and
    memory stays flat; an unbounded one delivers all 4,000 with nothing lost."""
    def bench(*args: str) -> dict[str, Any]:
        r = subprocess.run([sys.executable, "-m", "devtools.spool_outage", "--json", *args],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr[-2000:]
        return json.loads(r.stdout)

    r = bench("--duration", "2", "--rate", "2000")
    assert r["events_outage"] == 4000 and r["spool_depth_at_reconnect"] == 4000
    assert r["lost"] == 0 and r["dropped"] == 0 and r["order_ok"]
    assert r["rss_growth_mb"] < 5, r
    r = bench("--duration", "1", "--rate", "1000", "--max-events", "300", "--quiet-drain")
    assert r["spool_depth_at_reconnect"] == 300 and r["dropped"] == r["events_outage"] - 300
    assert r["lost"] == 0 and r["unexpected"] == 0 and r["order_ok"]
    assert r["received"] == r["events_warmup"] + 300

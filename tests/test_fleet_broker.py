"""deploy/mosquitto/: the example fleet broker, run as shipped (only paths and the port are
changed) on loopback with TLS from a throw-away CA. The agent delivers through it as its own
device; another device's credentials cannot publish, or read, under its topics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import REPO, SAMPLE_CLIP
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from devtools.broker import free_port, wait_port

FLEET = REPO / "deploy" / "mosquitto"
DEVICE, OTHER, CONSUMER = "pi-kitchen-01", "pi-hall-02", "edge-consumer"
NOT_AUTHORIZED = 135


def _pki(d: Path) -> tuple[Path, Path, Path]:
    """CA, and the broker's certificate for 127.0.0.1 signed by it, with its key (EC, ~0.1 s)."""
    d.mkdir()

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=fleet test CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ossl("req", *ec, "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=broker")
    ossl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "broker.crt", "-days", "2", "-extfile", "san.ext")
    return d / "ca.crt", d / "broker.crt", d / "broker.key"


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The shipped config and ACL with this test's files and port; (port, CA certificate)."""
    for tool in ("mosquitto", "mosquitto_passwd", "openssl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (scripts/install-system-deps)")
    ca, crt, key = _pki(tmp_path / "pki")
    passwd = tmp_path / "edge-agent.passwd"
    for i, user in enumerate((DEVICE, OTHER, CONSUMER)):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd),
                        user, f"{user}-secret"], check=True, capture_output=True)
    port = free_port()
    conf = (FLEET / "edge-agent-fleet.conf").read_text()
    for shipped, here in (("/etc/mosquitto/edge-agent.passwd", passwd),
                          ("/etc/mosquitto/edge-agent-fleet.acl", FLEET / "edge-agent-fleet.acl"),
                          ("/etc/mosquitto/certs/broker.crt", crt),
                          ("/etc/mosquitto/certs/broker.key", key),
                          ("/var/lib/mosquitto/", f"{tmp_path}/"),
                          ("listener 8883", f"listener {port} 127.0.0.1")):
        assert shipped in conf, shipped
        conf = conf.replace(shipped, str(here))
    conf += f"log_dest file {tmp_path / 'mosquitto.log'}\n"
    conf += "user root\n" if os.geteuid() == 0 else ""
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, ca
    finally:
        proc.terminate()
        proc.wait(5)


class Client:
    """An MQTT 5 client over TLS; v5 so that the broker's refusals come back as reason codes."""

    def __init__(self, port: int, ca: Path, user: str) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self.acks: dict[int, int] = {}
        self.granted: list[int] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(ca))
        self.c.username_pw_set(user, f"{user}-secret")
        self.c.on_connect = lambda c, u, f, rc, p: rc == 0 and self.connected.set()
        self.c.on_message = lambda c, u, m: self.msgs.append(m)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc.value)

        def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: list, p: Properties) -> None:
            self.granted = [rc.value for rc in rcs]
            self.subscribed.set()

        self.c.on_subscribe = on_subscribe
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(5), f"{user} could not connect"

    def subscribe(self, *topics: str) -> list[int]:
        self.subscribed.clear()
        self.c.subscribe([(t, 1) for t in topics])
        assert self.subscribed.wait(5)
        return self.granted

    def publish(self, topic: str, payload: str, retain: bool = False) -> int:
        """The broker's PUBACK reason code (0 = accepted, 135 = not authorized)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + 5
        while info.mid not in self.acks:
            assert time.monotonic() < deadline, f"no PUBACK for {topic}"
            time.sleep(0.01)
        return self.acks[info.mid]

    def topics(self) -> set[str]:
        return {m.topic for m in list(self.msgs)}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _short_clip(tmp_path: Path, seconds: float = 3) -> Path:
    out = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(SAMPLE_CLIP), "-t", str(seconds),
                    "-c", "copy", str(out)], check=True)
    return out


def test_agent_delivers_through_the_fleet_broker(fleet_broker: tuple[int, Path], tmp_path: Path,
                                                 models_dir: Path) -> None:
    port, ca = fleet_broker
    consumer = Client(port, ca, CONSUMER)
    try:
        assert consumer.subscribe("edge-agent/#", "homeassistant/#") == [1, 1]
        (tmp_path / "password").write_text(f"{DEVICE}-secret")
        (tmp_path / "password").chmod(0o600)
        cfg = {"device_id": DEVICE, "camera": "kitchen",
               "source": {"uri": str(_short_clip(tmp_path)), "realtime": False},
               "models": {"dir": str(models_dir)},
               "mqtt": {"host": "127.0.0.1", "port": port, "username": DEVICE,
                        "password_file": str(tmp_path / "password"), "tls": True,
                        "ca_file": str(ca), "drain_timeout_s": 10},
               "spool": {"path": str(tmp_path / "spool.db")}}
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c",
                            str(tmp_path / "agent.yaml")], capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        deadline = time.monotonic() + 5
        base = f"edge-agent/{DEVICE}"
        while f"{base}/events" not in consumer.topics() and time.monotonic() < deadline:
            time.sleep(0.05)
        topics = consumer.topics()
        assert {f"{base}/status", f"{base}/state", f"{base}/events"} <= topics, topics
        assert any(t.startswith(f"homeassistant/sensor/{DEVICE}/") for t in topics), topics
        events = [json.loads(m.payload) for m in consumer.msgs if m.topic == f"{base}/events"]
        assert {e["type"] for e in events} >= {"new", "end"}
        assert {e["device"] for e in events} == {DEVICE}
    finally:
        consumer.close()


def test_a_device_cannot_publish_or_read_as_another(fleet_broker: tuple[int, Path]) -> None:
    port, ca = fleet_broker
    consumer = Client(port, ca, CONSUMER)
    other = Client(port, ca, OTHER)
    try:
        consumer.subscribe("edge-agent/#", "homeassistant/#")
        forged = json.dumps({"type": "new", "device": DEVICE, "seq": 1})
        victim = f"edge-agent/{DEVICE}"
        assert other.publish(f"{victim}/events", forged) == NOT_AUTHORIZED
        assert other.publish(f"{victim}/status", "offline", retain=True) == NOT_AUTHORIZED
        assert other.publish(f"homeassistant/sensor/{DEVICE}/people/config", "{}",
                             retain=True) == NOT_AUTHORIZED
        assert other.publish("edge-agent/x/events", forged) == NOT_AUTHORIZED
        # Its own topics and its own discovery configs are fine: the ACL is not simply closed.
        assert other.publish(f"edge-agent/{OTHER}/events", "{}") == 0
        assert other.publish(f"homeassistant/sensor/{OTHER}/people/config", "{}") == 0
        time.sleep(0.3)
        assert consumer.topics() == {f"edge-agent/{OTHER}/events",
                                     f"homeassistant/sensor/{OTHER}/people/config"}
        # Reading: mosquitto grants the subscription but delivers only what the ACL allows.
        other.subscribe(f"{victim}/#", "edge-agent/#")
        device = Client(port, ca, DEVICE)
        try:
            assert device.publish(f"{victim}/events", "{}") == 0
        finally:
            device.close()
        deadline = time.monotonic() + 5
        while f"{victim}/events" not in consumer.topics() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"{victim}/events" in consumer.topics()
        assert not [m.topic for m in other.msgs if m.topic.startswith(victim)]
        # Consumers only read.
        assert consumer.publish(f"{victim}/events", forged) == NOT_AUTHORIZED
    finally:
        other.close()
        consumer.close()


def test_no_plain_or_anonymous_access(fleet_broker: tuple[int, Path]) -> None:
    port, ca = fleet_broker
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain.username_pw_set(DEVICE, f"{DEVICE}-secret")
    answers: list[int] = []
    plain.on_connect = lambda c, u, f, rc, p: answers.append(rc.value)
    plain.connect("127.0.0.1", port)  # TCP connects; the TLS listener never accepts MQTT on it
    deadline = time.monotonic() + 3
    while plain.loop(0.1) == mqtt.MQTT_ERR_SUCCESS and time.monotonic() < deadline:
        pass
    assert not answers, answers
    anon = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    anon.tls_set(ca_certs=str(ca))
    refused: list[int] = []
    anon.on_connect = lambda c, u, f, rc, p: refused.append(rc.value)
    anon.connect("127.0.0.1", port)
    deadline = time.monotonic() + 5
    while not refused and time.monotonic() < deadline:
        anon.loop(0.1)
    assert refused and refused[0] != 0, refused

"""Planted secrets never come out: a password in the camera URI and the MQTT password are
searched for in every output of `check-config` and `run` (stderr, error messages, a failed
reload) and in every message on every MQTT topic."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import yaml
from conftest import Broker
from test_service import Stderr, clean_env

from edge_agent import redact

URI_PW = "Uri-Pl4nted-pw"
MQTT_PW = "Mqtt-Pl4nted-pw"


def test_redact_masks_uri_passwords_and_remembered_secrets() -> None:
    assert redact.redact("open rtsp://admin:hunter22@cam:554/s failed") == \
        "open rtsp://admin:***@cam:554/s failed"
    assert redact.redact("http://u:p@x/ and rtsps://a:b@c/d") == "http://u:***@x/ and rtsps://a:***@c/d"
    assert redact.redact("rtsp://cam/stream") == "rtsp://cam/stream"
    redact.remember("xyzzy-42")
    assert redact.redact("password is xyzzy-42.") == "password is ***."
    assert redact.redact('{"e":"rtsp://u:xyzzy-42@h/"}') == '{"e":"rtsp://u:***@h/"}'


class Everything:
    """Every message on every topic of the broker, retained ones included."""

    def __init__(self, port: int, auth: tuple[str, str]) -> None:
        self.payloads: list[bytes] = []
        self.topics: set[str] = set()
        self._lock = threading.Lock()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="everything")
        self.c.username_pw_set(*auth)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("#", qos=1)
        self.c.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        with self._lock:
            self.payloads.append(m.payload)
            self.topics.add(m.topic)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_planted_passwords_appear_nowhere(tmp_path: Path, broker: Broker,
                                          models_dir: Path) -> None:
    users = tmp_path / "users"
    users.touch(mode=0o600)
    subprocess.run(["mosquitto_passwd", "-b", str(users), "agent", MQTT_PW], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(users), "watcher", "w"], check=True)
    broker.extra_conf = f"allow_anonymous false\npassword_file {users}\n"
    broker.stop()
    broker.start()
    pw = tmp_path / "mqtt.pw"
    pw.write_text(MQTT_PW + "\n")
    pw.chmod(0o600)
    with socket.socket() as s:  # a camera that is not there: its errors get logged
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg_data = {
        "device_id": "test-pi",
        "source": {"uri": f"rtsp://admin:{URI_PW}@127.0.0.1:{dead}/stream",
                   "open_timeout_s": 0.5},
        "models": {"dir": str(models_dir)},
        "mqtt": {"port": broker.port, "username": "agent", "password_file": str(pw),
                 "state_interval_s": 0.5},
        "spool": {"path": str(tmp_path / "spool.db")},
        "log_level": "debug",
    }
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump(cfg_data))
    outputs: list[str] = []
    for command in ("check-config",):
        r = subprocess.run([sys.executable, "-m", "edge_agent", command, "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60, env=clean_env())
        assert r.returncode == 0, r.stderr
        assert "rtsp://admin:***@127.0.0.1" in r.stdout
        outputs += [r.stdout, r.stderr]
    bad = tmp_path / "bad.yaml"  # an error message that quotes the secret back
    bad.write_text(yaml.safe_dump(cfg_data | {"camera": f"x{MQTT_PW}", "threads": URI_PW}))
    r = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "-c", str(bad)],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 2
    outputs += [r.stdout, r.stderr]

    watcher = Everything(broker.port, ("watcher", "w"))
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, text=True, env=clean_env())
    err = Stderr(proc)
    try:
        err.wait_for("mqtt connected", 30)
        time.sleep(3)  # reconnect attempts to the camera, several T/state
        cfg.write_text(yaml.safe_dump(cfg_data | {"mqtt": cfg_data["mqtt"] | {
            "host": f"rtsp://admin:{URI_PW}@cam", "username": MQTT_PW}}))
        proc.send_signal(signal.SIGHUP)
        err.wait_for("reload of", 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, err.text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
    outputs.append(err.text())
    assert any(t.endswith("/state") for t in watcher.topics), watcher.topics
    assert "rtsp://admin:***@" in err.text()
    for secret in (URI_PW, MQTT_PW):
        for text in outputs:
            assert secret not in text, text[-3000:]
        for payload in watcher.payloads:
            assert secret.encode() not in payload, payload[:500]
    assert os.environ.get("EDGE_AGENT_MQTT_PASSWORD") != MQTT_PW

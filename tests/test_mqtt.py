"""Publisher against a real mosquitto: order, outages, Last Will, drain, credentials, TLS,
Home Assistant discovery."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import wait_for
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import free_port, wait_port
from edge_agent import config
from edge_agent.config import ConfigError, MqttConfig, SpoolConfig
from edge_agent.mqtt import CREDENTIALS_ENV, PASSWORD_ENV, Publisher, password
from edge_agent.spool import Spool

T = "test/dev1"



class Sub:
    """A test subscriber on `T/#`; `persistent` keeps its queue across a broker restart."""

    def __init__(self, port: int, persistent: bool = False,
                 topics: tuple[str, ...] = (f"{T}/#",)) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id="collector" if persistent else "",
                             clean_session=not persistent)
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.c.on_subscribe = lambda *_: self.ready.set()
        self.c.on_message = lambda c, u, m: self.msgs.append(m)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(5)

    def payloads(self, leaf: str) -> list[str]:
        return [m.payload.decode() for m in list(self.msgs) if m.topic == f"{T}/{leaf}"]

    def seqs(self) -> list[int]:
        return [json.loads(p)["seq"] for p in self.payloads("events")]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def first_seen(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [q for q in seqs if not (q in seen or seen.add(q))]  # type: ignore[func-returns-value]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(SpoolConfig(path=str(tmp_path / "spool.db")))
    yield s
    s.close()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_delivers_in_order_with_status_and_state(broker, spool: Spool, protocol: str) -> None:
    sub = Sub(broker.port)
    pub = Publisher(MqttConfig(port=broker.port, protocol=protocol, max_inflight=5), T, spool)
    try:
        assert [pub.publish_event({"type": "new", "i": i}) for i in range(300)] == list(
            range(1, 301))
        assert pub.drain(10)
        assert pub.connected and pub.inflight == 0 and pub.reconnects == 0
        assert wait_for(lambda: len(sub.seqs()) >= 300)
        assert sub.seqs() == list(range(1, 301))
        assert sub.payloads("events")[0] == (
            f'{{"type":"new","i":0,"spool_id":"{spool.spool_id}","seq":1}}')
        pub.publish_state({"fps": 1.5})
        assert wait_for(lambda: sub.payloads("state") == ['{"fps":1.5}'])
        late = Sub(broker.port)  # retained messages reach a subscriber that comes later
        assert wait_for(lambda: late.payloads("status") == ["online"]
                        and late.payloads("state") == ['{"fps":1.5}'])
        assert late.payloads("events") == []
        late.close()
    finally:
        pub.stop()
        sub.close()


def test_broker_restart_loses_nothing_and_keeps_order(broker, spool: Spool) -> None:
    db = broker.workdir / "db"
    db.mkdir()
    broker.extra_conf = f"persistence true\npersistence_location {db}/\nmax_queued_messages 0\n"
    broker.stop()
    broker.start()
    sub = Sub(broker.port, persistent=True)
    pub = Publisher(MqttConfig(port=broker.port, max_inflight=10), T, spool)
    assert wait_for(lambda: pub.connected)
    stop = threading.Event()
    sent: list[int] = []

    def frame_loop() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            sent.append(pub.publish_event({"type": "update"}))
            assert time.perf_counter() - t < 0.5  # never waits for the network
            time.sleep(0.005)

    loop = threading.Thread(target=frame_loop)
    loop.start()
    try:
        time.sleep(1.0)
        broker.stop()
        assert wait_for(lambda: not pub.connected, 2)
        time.sleep(3.0)
        broker.start()
        assert wait_for(lambda: pub.connected, 10)
        time.sleep(0.5)
    finally:
        stop.set()
        loop.join()
    assert pub.drain(15), f"{spool.depth()} events left"
    assert pub.reconnects == 1
    n = len(sent)
    assert sent == list(range(1, n + 1)) and n > 300
    assert wait_for(lambda: set(sub.seqs()) >= set(sent), 10), "events missing"
    assert first_seen(sub.seqs()) == sent
    pub.stop()
    sub.close()


def test_last_will_on_sigkill(broker, tmp_path: Path) -> None:
    sub = Sub(broker.port)
    script = (
        "import time\n"
        "from edge_agent.config import MqttConfig, SpoolConfig\n"
        "from edge_agent.mqtt import Publisher\n"
        "from edge_agent.spool import Spool\n"
        f"s = Spool(SpoolConfig(path={str(tmp_path / 'child.db')!r}))\n"
        f"p = Publisher(MqttConfig(port={broker.port}), {T!r}, s)\n"
        "while not p.connected: time.sleep(0.01)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert child.stdout and child.stdout.readline() == b"ready\n"
        assert wait_for(lambda: sub.payloads("status") == ["online"], 5)
        child.send_signal(signal.SIGKILL)
        assert wait_for(lambda: sub.payloads("status") == ["online", "offline"], 5)
    finally:
        child.kill()
        child.wait()
        sub.close()


def test_clean_stop_sends_offline(broker, spool: Spool) -> None:
    sub = Sub(broker.port)
    pub = Publisher(MqttConfig(port=broker.port), T, spool)
    assert wait_for(lambda: sub.payloads("status") == ["online"], 5)
    pub.stop()
    assert wait_for(lambda: sub.payloads("status") == ["online", "offline"], 5)
    assert not pub.connected
    late = Sub(broker.port)
    assert wait_for(lambda: late.payloads("status") == ["offline"], 5)
    late.close()
    sub.close()


def test_drain_fails_while_down_then_next_publisher_delivers(broker, tmp_path: Path) -> None:
    broker.stop()
    cfg = SpoolConfig(path=str(tmp_path / "spool.db"))
    spool = Spool(cfg)
    pub = Publisher(MqttConfig(port=broker.port), T, spool)
    t = time.perf_counter()
    for i in range(20):
        pub.publish_event({"i": i})
    assert time.perf_counter() - t < 1.0
    assert not pub.drain(1.0)
    pub.stop()
    spool.close()
    spool = Spool(cfg)
    assert spool.depth() == 20
    broker.start()
    sub = Sub(broker.port)
    pub = Publisher(MqttConfig(port=broker.port), T, spool)
    try:
        assert pub.drain(10)
        assert wait_for(lambda: len(sub.seqs()) >= 20)
        assert sub.seqs() == list(range(1, 21)) and spool.depth() == 0
    finally:
        pub.stop()
        spool.close()
        sub.close()


def test_credentials_and_refusal_back_off(broker, spool: Spool, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    users = tmp_path / "users"
    users.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(users), "agent", "s3cret"], check=True)
    os.chmod(users, 0o600)
    broker.extra_conf = f"allow_anonymous false\npassword_file {users}\n"
    broker.stop()
    broker.start()
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    pub = Publisher(MqttConfig(port=broker.port, username="agent", password_file=str(secret)),
                    T, spool)
    assert wait_for(lambda: pub.connected, 5)
    pub.stop()

    monkeypatch.setenv("EDGE_AGENT_MQTT_PASSWORD", "wrong")
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    cpu = time.process_time()
    pub = Publisher(MqttConfig(port=broker.port, username="agent"), T, spool)
    time.sleep(3.0)
    assert not pub.connected
    pub.stop()
    refusals = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    assert 1 <= len(refusals) <= 4, [r.getMessage() for r in refusals]
    assert time.process_time() - cpu < 0.5


def test_unreachable_broker_logs_once_per_back_off(tmp_path: Path, spool: Spool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    cpu = time.process_time()
    pub = Publisher(MqttConfig(port=free_port(), reconnect_min_s=0.2, reconnect_max_s=0.8),
                    T, spool)
    t = time.perf_counter()
    for i in range(50):
        pub.publish_event({"i": i})
    assert time.perf_counter() - t < 1.0
    time.sleep(3.0)
    pub.stop()
    fails = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert 3 <= len(fails) <= 7, fails  # waits 0.2, 0.4, 0.8, 0.8, ...
    assert "Connection refused" in fails[0] and fails[0].endswith("retrying in 0.2 s"), fails
    assert fails[2].endswith("retrying in 0.8 s") and fails[-1].endswith("retrying in 0.8 s")
    assert time.process_time() - cpu < 0.5
    assert spool.depth() == 50


def test_password_sources_and_precedence(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    assert password(MqttConfig()) == (None, "nowhere")
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert password(MqttConfig()) == ("from-env", PASSWORD_ENV)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd\n")
    (creds / "broker").write_text("other-name")
    monkeypatch.setenv(CREDENTIALS_ENV, str(creds))
    assert password(MqttConfig())[0] == "from-systemd"
    assert password(MqttConfig(password_credential="broker"))[0] == "other-name"
    assert password(MqttConfig(password_credential="absent"))[0] == "from-env"
    pw = tmp_path / "pw"
    pw.write_text("from-file\r\n")
    pw.chmod(0o640)
    assert password(MqttConfig(password_file=str(pw))) == ("from-file", "mqtt.password_file")
    pw.chmod(0o644)
    with pytest.raises(ConfigError, match=r"^mqtt\.password_file: .*pw is readable by every "
                                          r"user \(mode 0644\); run chmod 600"):
        password(MqttConfig(password_file=str(pw)))
    with pytest.raises(ConfigError, match=r"^mqtt\.password_file: cannot read .*nope"):
        password(MqttConfig(password_file=str(tmp_path / "nope")))


@pytest.mark.parametrize(("mqtt", "message"), [
    ({"cert_file": "c.pem", "tls": True}, r"^mqtt\.key_file: expected a file to go with "
                                          r"mqtt\.cert_file"),
    ({"key_file": "k.pem", "tls": True}, r"^mqtt\.cert_file: expected a file to go with "),
    ({"ca_file": "ca.pem"}, r"^mqtt\.tls: expected true when mqtt\.ca_file is set, got false"),
    ({"tls_insecure": True}, r"^mqtt\.tls: expected true when mqtt\.tls_insecure is set"),
    ({"tls": "yes"}, r"^mqtt\.tls: expected true or false, got 'yes'"),
    ({"discovery_prefix": "ha/"}, r"^mqtt\.discovery_prefix: expected topic levels"),
    ({"password_credential": "../pw"}, r"^mqtt\.password_credential: expected a credential"),
    ({"password": "s3cret"}, r"^mqtt\.password: unknown key"),
])
def test_mqtt_config_errors_name_the_key(mqtt: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.from_dict({"source": {"uri": "x.mp4"}, "device_id": "d", "mqtt": mqtt})


def test_mqtt_config_defaults_and_relative_tls_paths(tmp_path: Path) -> None:
    m = MqttConfig()
    assert (m.tls, m.tls_insecure, m.ca_file, m.discovery, m.discovery_prefix,
            m.password_credential) == (False, False, None, True, "homeassistant",
                                       "mqtt-password")
    f = tmp_path / "agent.yaml"
    f.write_text("source: {uri: x.mp4}\nmqtt: {tls: true, ca_file: pki/ca.crt, "
                 "cert_file: pki/c.crt, key_file: /abs/c.key}\n")
    m = config.load(f).mqtt
    assert (m.ca_file, m.cert_file, m.key_file) == (
        str(tmp_path / "pki/ca.crt"), str(tmp_path / "pki/c.crt"), "/abs/c.key")


def make_pki(d: Path) -> dict[str, Path]:
    """A throw-away CA with certificates for the broker (127.0.0.1), for a broker under another
    name, and for a client; EC keys, so this takes ~0.1 s."""
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ossl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=edge-agent test CA")
    ext = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost",
           "other": "subjectAltName=DNS:broker.invalid",
           "client": "extendedKeyUsage=clientAuth"}
    for name, line in ext.items():
        (d / f"{name}.ext").write_text(line + "\n")
        ossl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def tls_listener(port: int, pki: dict[str, Path], cert: str = "server",
                 mutual: bool = False) -> str:
    """mosquitto.conf lines for an extra TLS listener; the plain one stays for test clients."""
    conf = (f"listener {port} 127.0.0.1\ncafile {pki['ca_crt']}\n"
            f"certfile {pki[cert + '_crt']}\nkeyfile {pki[cert + '_key']}\n")
    if mutual:
        conf += "require_certificate true\nuse_identity_as_username true\n"
    return conf


def test_tls_checks_the_ca_and_the_host_name(broker, spool: Spool, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    good, other = free_port(), free_port()
    broker.extra_conf = tls_listener(good, pki) + tls_listener(other, pki, cert="other")
    broker.stop()
    broker.start()
    wait_port(good)
    wait_port(other)
    sub = Sub(broker.port)
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt")
    quick = {"reconnect_min_s": 0.2, "reconnect_max_s": 0.4, "discovery": False, "tls": True}
    pubs = []
    try:
        pub = Publisher(MqttConfig(port=good, ca_file=str(pki["ca_crt"]), **quick), T, spool)
        pubs.append(pub)
        for i in range(5):
            pub.publish_event({"i": i})
        assert pub.drain(10) and wait_for(lambda: sub.seqs() == [1, 2, 3, 4, 5])
        pub.stop()
        for port, ca, why in ((other, pki["ca_crt"], "IP address mismatch"),
                              (good, None, "self-signed certificate in certificate chain")):
            caplog.clear()
            pub = Publisher(MqttConfig(port=port, ca_file=ca and str(ca), **quick), T, spool)
            pubs.append(pub)
            time.sleep(1.0)
            assert not pub.connected
            pub.stop()
            fails = [r.getMessage() for r in caplog.records if "TLS handshake failed" in
                     r.getMessage()]
            assert 1 <= len(fails) <= 4 and all(why in f for f in fails), fails
        pub = Publisher(MqttConfig(port=other, ca_file=str(pki["ca_crt"]), tls_insecure=True,
                                   **quick), T, spool)
        pubs.append(pub)
        assert wait_for(lambda: pub.connected, 5)
    finally:
        for p in pubs:
            p.stop()
        sub.close()


def test_mutual_tls(broker, spool: Spool, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    broker.extra_conf = tls_listener(port, pki, mutual=True)
    broker.stop()
    broker.start()
    wait_port(port)
    sub = Sub(broker.port)
    cfg = MqttConfig(port=port, tls=True, ca_file=str(pki["ca_crt"]), reconnect_min_s=0.2,
                     reconnect_max_s=0.4, discovery=False)
    pub = Publisher(cfg, T, spool)
    try:
        time.sleep(1.0)
        assert not pub.connected  # no client certificate: the broker hangs up
        pub.stop()
        pub = Publisher(dataclasses.replace(cfg, cert_file=str(pki["client_crt"]),
                                            key_file=str(pki["client_key"])), T, spool)
        pub.publish_event({"i": 1})
        assert pub.drain(10) and wait_for(lambda: sub.seqs() == [1])
        assert "client" in (broker.workdir / "mosquitto.log").read_text()
    finally:
        pub.stop()
        sub.close()
    pki["client_key"].chmod(0o644)
    with pytest.raises(ConfigError, match=r"^mqtt\.key_file: .* is readable by every user"):
        Publisher(dataclasses.replace(cfg, cert_file=str(pki["client_crt"]),
                                      key_file=str(pki["client_key"])), T, spool)
    with pytest.raises(ConfigError, match=r"^mqtt\.ca_file: cannot read"):
        Publisher(dataclasses.replace(cfg, ca_file=str(tmp_path / "nope.crt")), T, spool)
    with pytest.raises(ConfigError, match=r"^mqtt\.ca_file: not a usable CA"):
        Publisher(dataclasses.replace(cfg, ca_file=str(pki["client_ext"])), T, spool)


def test_discovery_on_connect_and_when_home_assistant_comes_online(broker,
                                                                   spool: Spool) -> None:
    ha = "homeassistant"
    sub = Sub(broker.port, topics=(f"{T}/#", f"{ha}/#"))
    pub = Publisher(MqttConfig(port=broker.port), T, spool, device_id="dev.1")

    def configs() -> list[mqtt.MQTTMessage]:
        return [m for m in list(sub.msgs) if m.topic.endswith("/config")]

    other = mqtt.Client(CallbackAPIVersion.VERSION2)
    other.connect("127.0.0.1", broker.port)
    other.loop_start()
    try:
        assert wait_for(lambda: len(configs()) == 7, 5), [m.topic for m in sub.msgs]
        assert wait_for(lambda: sub.payloads("status") == ["online"], 5)
        topics = sorted(m.topic for m in configs())
        assert topics == sorted(f"{ha}/sensor/dev_1/{k}/config" for k in (
            "tracks", "people_today", "last_gender", "last_age", "fps", "rss_mb", "pace"))
        docs = [json.loads(m.payload) for m in configs()]
        assert len({d["unique_id"] for d in docs}) == 7
        for d in docs:
            key = d["unique_id"].removeprefix("edge_agent_dev_1_")
            assert d["value_template"] == f"{{{{ value_json.{key} }}}}"
            assert d["state_topic"] == f"{T}/state" and d["availability_topic"] == f"{T}/status"
            assert (d["payload_available"], d["payload_not_available"]) == ("online", "offline")
            assert d["device"]["identifiers"] == ["edge_agent_dev_1"] and d["name"]
        late = Sub(broker.port, topics=(f"{ha}/#",))  # retained for a Home Assistant that
        assert wait_for(lambda: len(late.msgs) == 7, 5)  # subscribes later
        late.close()

        other.publish(f"{ha}/status", "offline", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        assert len(configs()) == 7
        other.publish(f"{ha}/status", "online", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(configs()) == 14, 5)
        other.publish(f"{ha}/status", "online", qos=1, retain=True).wait_for_publish(5)
        assert wait_for(lambda: len(configs()) == 21, 5)
        pub.stop()
        pub = Publisher(MqttConfig(port=broker.port), T, spool, device_id="dev.1")
        assert wait_for(lambda: len(configs()) == 28, 5)  # on connect
        time.sleep(0.5)
        assert len(configs()) == 28  # not again for the retained `online` replayed to it
        pub.stop()
        pub = Publisher(MqttConfig(port=broker.port, discovery=False), T, spool)
        assert wait_for(lambda: len(sub.payloads("status")) == 5, 5)
        other.publish(f"{ha}/status", "online", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        assert len(configs()) == 28
    finally:
        pub.stop()
        other.loop_stop()
        other.disconnect()
        sub.close()

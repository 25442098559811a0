"""Publisher against a real mosquitto: order, outages, Last Will, drain, credentials."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import MqttConfig, SpoolConfig
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool

T = "test/dev1"


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Sub:
    """A test subscriber on `T/#`; `persistent` keeps its queue across a broker restart."""

    def __init__(self, port: int, persistent: bool = False) -> None:
        self.msgs: list[mqtt.MQTTMessage] = []
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id="collector" if persistent else "",
                             clean_session=not persistent)
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.on_connect = lambda c, *_: c.subscribe(f"{T}/#", qos=1)
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
        assert sub.payloads("events")[0] == '{"type":"new","i":0,"seq":1}'
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

"""`edge-agent demo`: the whole agent on a sample clip, against a local mosquitto, printing every
event it publishes, then how they compare with the clip's ground truth."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from devtools import scenario
from devtools.broker import free_port, start_mosquitto
from edge_agent import agent, config


def main(source: str | None, shared: str | None, people: int) -> int:
    base = scenario.shared_dir(shared)
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    scn = None
    if source is None:
        scn = scenario.plan(base / "data" / "faces", people=people)
        source = str(scenario.render(scn, base / "data" / "faces", work / "sample.mp4"))
        print(f"sample clip: {source} ({scn.frames} frames, {len(scn.people)} people)")
    port = free_port()
    broker = start_mosquitto(work, port)
    cfg = config.from_dict({
        "device_id": "demo", "camera": "sample",
        "source": {"uri": source, "realtime": True},
        "models": {"dir": str(base / "models")},
        "mqtt": {"port": port, "state_interval_s": 5},
        "spool": {"path": str(work / "spool.db")},
    })
    events: list[dict] = []
    sub = _subscribe(port, config.topic_base(cfg), events)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        code = agent.run(cfg, stop)
        time.sleep(0.3)
    finally:
        sub.loop_stop()
        sub.disconnect()
        broker.terminate()
        broker.wait(5)
    if scn is not None:
        print("\nagainst the ground truth: " + scenario.evaluate(scn, events).summary())
        for p in scn.people:
            print(f"  walked through: {p.gender:6} age {p.age}")
    shutil.rmtree(work, ignore_errors=True)
    return code


def _subscribe(port: int, base: str, sink: list[dict]) -> mqtt.Client:
    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode()
        if msg.topic.endswith("/events"):
            sink.append(json.loads(text))
            print(f"{msg.topic} {text}", flush=True)
        elif msg.topic.endswith("/status"):
            print(f"{msg.topic} {text}", flush=True)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-agent-demo-viewer")
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe(f"{base}/#", qos=1)
    client.loop_start()
    return client


if __name__ == "__main__":
    sys.exit(main(None, None, 6))

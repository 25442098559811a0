"""`edge-agent demo`: the whole agent on the sample clip in the repository (or a camera, or any
clip), against a local mosquitto, printing every event as it is published and a short summary.
With the research-only face data (`--scene`), a generated multi-person scene is scored against
its ground truth instead."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from devtools import assets, scenario
from devtools.broker import free_port, start_mosquitto
from edge_agent import agent, config


def main(source: str | None, shared: str | None = None, people: int = 6,
         scene: bool = False) -> int:
    if scene and source:
        print("edge-agent demo: give --source or --scene, not both", file=sys.stderr)
        return 2
    if shared or scene:
        try:
            faces = scenario.shared_dir(shared) / "data" / "faces"
        except FileNotFoundError as e:
            print(f"edge-agent demo: {e}", file=sys.stderr)
            return 2
    models_dir = assets.models_dir()
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    scn = None
    if scene:
        scn = scenario.plan(faces, people=people)
        source = str(scenario.render(scn, faces, work / "scene.mp4"))
        print(f"generated scene: {scn.frames} frames, {len(scn.people)} people")
    elif source is None:
        source = str(assets.SAMPLE_CLIP)
        print(f"sample clip: {assets.SAMPLE_CLIP.name} (Pexels, see samples/README.md)")
    port = free_port()
    broker = start_mosquitto(work, port)
    cfg = config.from_dict({
        "device_id": "demo", "camera": "sample",
        "source": {"uri": source, "realtime": True},
        "models": {"dir": str(models_dir)},
        "mqtt": {"port": port, "state_interval_s": 5},
        "spool": {"path": str(work / "spool.db")},
    })
    events: list[dict[str, Any]] = []
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
    print()
    print(summary(events))
    if scn is not None:
        print("against the ground truth: " + scenario.evaluate(scn, events).summary())
        for p in scn.people:
            print(f"  walked through: {p.gender:6} age {p.age}")
    shutil.rmtree(work, ignore_errors=True)
    return code


def summary(events: list[dict[str, Any]]) -> str:
    """Tracks, events by type, and each person once by their final gender and age bucket."""
    final: dict[str, dict[str, Any]] = {}
    for ev in events:
        final[ev["track_id"]] = ev
    kinds = Counter(ev["type"] for ev in events)
    genders = Counter(ev.get("gender") or "unknown" for ev in final.values())
    ages = Counter(ev.get("age_bucket") or "unknown" for ev in final.values())
    return "\n".join([
        f"summary: {len(final)} tracks; events: "
        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
        "  gender: " + (", ".join(f"{k} {n}" for k, n in sorted(genders.items())) or "none"),
        "  age:    " + (", ".join(f"{k} {n}" for k, n in sorted(ages.items())) or "none"),
    ])


def _subscribe(port: int, base: str, sink: list[dict[str, Any]]) -> mqtt.Client:
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
    sys.exit(main(None))

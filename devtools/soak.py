"""Soak: `edge-agent run` on a looping clip against a local mosquitto for N minutes, its RSS
sampled every second; prints the growth after warm-up (mean of the last minute minus mean of the
first minute after warm-up, and the fitted slope). Exits 1 if the growth reaches --limit-mb.

    python3 -m devtools.soak --minutes 12 --warmup 2 [--clip CLIP] [--shared DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

from devtools import assets, scenario
from devtools.broker import free_port, start_mosquitto

PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_MB


class Watcher:
    """Counts events and keeps the last retained state, to show the agent did its work."""

    def __init__(self, port: int, base: str) -> None:
        self.events = 0
        self.state: dict = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-watcher")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{base}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/events"):
                self.events += 1
            elif msg.topic.endswith("/state"):
                self.state = json.loads(msg.payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--warmup", type=float, default=2.0, help="minutes not counted")
    p.add_argument("--clip", help="a video file; default: a generated scene of --people")
    p.add_argument("--people", type=int, default=8)
    p.add_argument("--shared", default=None,
                   help="research data folder with data/faces/ (default: $EDGE_AGENT_SHARED)")
    p.add_argument("--limit-mb", type=float, default=2.0)
    args = p.parse_args()
    if args.minutes - args.warmup < 2:
        p.error("--minutes must exceed --warmup by at least 2")

    models_dir = assets.models_dir()
    work = Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    clip = args.clip
    if clip is None:
        faces = scenario.shared_dir(args.shared) / "data" / "faces"
        scn = scenario.plan(faces, people=args.people, seed=11)
        clip = str(scenario.render(scn, faces, work / "soak.mp4"))
    port = free_port()
    broker = start_mosquitto(work, port)
    cfg = {
        "device_id": "soak", "camera": "loop",
        "source": {"uri": clip, "loop": True, "realtime": True},
        "models": {"dir": str(models_dir)},
        "mqtt": {"port": port, "state_interval_s": 5},
        "spool": {"path": str(work / "spool.db")},
    }
    (work / "agent.yaml").write_text(yaml.safe_dump(cfg))
    watcher = Watcher(port, "edge-agent/soak")
    log = (work / "agent.log").open("w")
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c",
                              str(work / "agent.yaml")], stderr=log)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    print(f"soak: {args.minutes:g} min on {clip} (warm-up {args.warmup:g} min), pid {agent.pid}")
    print(" min   rss mean   rss max   events   fps")
    try:
        next_report = 60.0
        while (elapsed := time.monotonic() - t0) < args.minutes * 60:
            if agent.poll() is not None:
                print(f"agent exited with {agent.returncode}; log in {work / 'agent.log'}")
                return 1
            samples.append((elapsed, rss_mb(agent.pid)))
            if elapsed >= next_report:
                minute = [r for t, r in samples if t >= next_report - 60]
                print(f"{next_report / 60:4.0f}   {statistics.mean(minute):7.1f}   "
                      f"{max(minute):7.1f}   {watcher.events:6d}   "
                      f"{watcher.state.get('fps', 0):5.1f}", flush=True)
                next_report += 60
            time.sleep(1.0 - (time.monotonic() - t0) % 1.0)
    finally:
        agent.terminate()
        code = agent.wait(30)
        watcher.close()
        broker.terminate()
        broker.wait(5)

    warm = [(t, r) for t, r in samples if t >= args.warmup * 60]
    first = statistics.mean(r for t, r in warm if t < warm[0][0] + 60)
    last = statistics.mean(r for t, r in warm if t >= warm[-1][0] - 60)
    slope = statistics.linear_regression([t for t, _ in warm], [r for _, r in warm]).slope
    growth = last - first
    print(f"\nsamples {len(samples)}, after warm-up {len(warm)}; events {watcher.events}, "
          f"frames {watcher.state.get('frames')}, exit {code}")
    print(f"rss after warm-up {first:.1f} MB, at the end {last:.1f} MB, "
          f"peak {max(r for _, r in samples):.1f} MB")
    print(f"growth after warm-up {growth:+.2f} MB (slope {slope * 3600:+.2f} MB/h); "
          f"limit {args.limit_mb:g} MB: {'ok' if growth < args.limit_mb else 'TOO MUCH'}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if growth < args.limit_mb and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

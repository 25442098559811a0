"""Soak: `edge-agent run` on a looping clip against a local mosquitto for N minutes, its RSS
sampled every second; prints the growth after warm-up (mean of the last minute minus mean of the
first minute after warm-up, and the fitted slope). Exits 1 if the growth reaches --limit-mb.

With --faults, every few seconds one fault at random: the broker stopped (SIGTERM) or killed
(SIGKILL) and started again seconds later, a SIGHUP storm, or a window in which the broker
refuses `T/events` (an ACL, MQTT 5). With --rtsp the clip comes from an RTSP server
(tests/rtsp_server.py, Debian's python3 with gst-rtsp-server) and the faults also restart it,
hang it (SIGSTOP for seconds, its sockets open) and change the resolution (a live test pattern
at another size for a while). It then reports events produced against events received
after dedupe by (device, spool_id, seq) (what is still in the spool at the end counts as
produced, not lost), the largest gap in delivery, and RSS, threads and open file descriptors
over time. Exits 1 on any lost event, or if threads or descriptors grew.

    python3 -m devtools.soak --minutes 12 --warmup 2 [--clip CLIP] [--shared DIR]
    python3 -m devtools.soak --minutes 30 --warmup 2 --faults [--rtsp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
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
BASE = "edge-agent/soak"
RTSP_SERVER = Path(__file__).resolve().parent.parent / "tests" / "rtsp_server.py"
DEBIAN_PYTHON = "/usr/bin/python3"  # the one with Debian's `gi`


class Rtsp:
    """The clip (or a test pattern at another size) served over RTSP on a loopback port."""

    def __init__(self, port: int, clip: str) -> None:
        self.port, self.clip = port, clip
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"rtsp://127.0.0.1:{port}/soak"

    def start(self, *extra: str) -> None:
        source = list(extra) or ["--file", self.clip]
        self.proc = subprocess.Popen([DEBIAN_PYTHON, str(RTSP_SERVER), "--port", str(self.port),
                                      "--mount", "/soak", *source], stdout=subprocess.DEVNULL)
        time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


def persist(work: Path) -> str:
    """The broker keeps the watcher's session across its own restarts, even a SIGKILL."""
    return (f"persistence true\npersistence_location {work}/\nautosave_interval 1\n"
            "autosave_on_changes true\n")


def threads_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(ln.split()[1]) for ln in f if ln.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE_MB


class Watcher:
    """Counts events and keeps the last retained state, to show the agent did its work."""

    def __init__(self, port: int, base: str) -> None:
        self.events = 0
        self.state: dict = {}
        self.seen: set[tuple[str, str, int]] = set()  # (device, spool_id, seq)
        self.last_new = time.monotonic()
        self.max_gap = 0.0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-watcher",
                                  clean_session=False)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"{base}/#", qos=1)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/events"):
                self.events += 1
                e = json.loads(msg.payload)
                key = (e["device"], e.get("spool_id", ""), e["seq"])
                if key not in self.seen:
                    self.seen.add(key)
                    now = time.monotonic()
                    self.max_gap = max(self.max_gap, now - self.last_new)
                    self.last_new = now
            elif msg.topic.endswith("/state"):
                self.state = json.loads(msg.payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Faults:
    """Drives the faults from a thread; `log` lists what was done when."""

    def __init__(self, work: Path, port: int, agent: subprocess.Popen[bytes],
                 broker: subprocess.Popen[bytes], seed: int, every_s: float,
                 rtsp: Rtsp | None = None) -> None:
        self.work, self.port, self.agent, self.broker = work, port, agent, broker
        self.rtsp = rtsp
        self.rng = random.Random(seed)
        self.every_s = every_s
        self.log: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.acl = work / "deny-events.acl"
        self.acl.write_text(f"topic readwrite #\ntopic deny {BASE}/events\n")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def _restart_broker(self, sig: int, down_s: float, extra: str = "") -> None:
        self.broker.send_signal(sig)
        self.broker.wait(10)
        if self.stop.wait(down_s):
            extra = ""
        self.broker = start_mosquitto(self.work, self.port, persist(self.work) + extra)

    def _run(self) -> None:
        while not self.stop.wait(self.every_s * self.rng.uniform(0.5, 1.5)):
            kinds = ["stop", "kill", "hup", "refuse"]
            if self.rtsp:
                kinds += ["rtsp-restart", "rtsp-hang", "rtsp-resize"]
            kind = self.rng.choice(kinds)
            self.log.append((time.monotonic() - self._t0, kind))
            if kind == "stop":
                self._restart_broker(signal.SIGTERM, self.rng.uniform(1, 5))
            elif kind == "kill":
                self._restart_broker(signal.SIGKILL, self.rng.uniform(1, 5))
            elif kind == "hup":
                for _ in range(self.rng.randint(20, 200)):
                    self.agent.send_signal(signal.SIGHUP)
            elif self.rtsp and kind.startswith("rtsp"):
                self._rtsp_fault(self.rtsp, kind)
            else:
                self._restart_broker(signal.SIGTERM, 0.2, f"acl_file {self.acl}\n")
                self.stop.wait(self.rng.uniform(2, 6))
                self._restart_broker(signal.SIGTERM, 0.2)

    def _rtsp_fault(self, rtsp: Rtsp, kind: str) -> None:
        if kind == "rtsp-restart":
            rtsp.stop(self.rng.choice([signal.SIGTERM, signal.SIGKILL]))
            self.stop.wait(self.rng.uniform(1, 4))
            rtsp.start()
        elif kind == "rtsp-hang" and rtsp.proc:
            rtsp.proc.send_signal(signal.SIGSTOP)
            self.stop.wait(self.rng.uniform(2, 8))
            rtsp.proc.send_signal(signal.SIGCONT)
        else:
            rtsp.stop()
            rtsp.start("--width", "480", "--height", "360")
            self.stop.wait(self.rng.uniform(3, 6))
            rtsp.stop()
            rtsp.start()

    def close(self) -> subprocess.Popen[bytes]:
        self.stop.set()
        self._thread.join(30)
        return self.broker


def _left_in_spool(path: Path) -> set[tuple[str, int]]:
    """(spool_id, seq) of the events still queued or refused: produced, not lost."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [p for t in ("events", "refused")
                for (p,) in db.execute(f"SELECT payload FROM {t}")]
    finally:
        db.close()
    return {(e["spool_id"], e["seq"]) for e in map(json.loads, rows)}


def _last_seq(path: Path) -> tuple[str, int]:
    """The spool's id and the last seq it handed out: the end of the range to account for."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        sid = db.execute("SELECT value FROM ident WHERE key='spool_id'").fetchone()[0]
        last = db.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0]
    finally:
        db.close()
    return str(sid), int(last)


def _report_faults(watcher: Watcher, spool: Path, samples: list[tuple[float, int, int]],
                   warmup_s: float, faults: Faults) -> bool:
    received = {(sid, seq) for _, sid, seq in watcher.seen}
    left = _left_in_spool(spool) - received
    produced = received | left
    by_id: dict[str, list[int]] = {}
    for sid, seq in produced:
        by_id.setdefault(sid, []).append(seq)
    sid, last = _last_seq(spool)
    by_id.setdefault(sid, [])
    missing = sum((max(seqs, default=0) if i != sid else last)
                  - (min(seqs) if i != sid else 1) + 1 - len(seqs)
                  for i, seqs in by_id.items() if seqs or i == sid)
    dropped = int(watcher.state.get("spool_dropped", 0))
    lost = max(0, missing - dropped)
    warm = [(t, th, fd) for t, th, fd in samples if t >= warmup_s] or samples
    kinds = {k: sum(1 for _, x in faults.log if x == k) for k in sorted({x for _, x in faults.log})}
    print(f"faults: {kinds}")
    print(f"events produced {len(produced)} (spool ids {len(by_id)}), received after dedupe "
          f"{len(received)} ({watcher.events} with repeats), still in the spool {len(left)}, "
          f"missing {missing}, dropped over bounds {dropped}, LOST {lost}")
    print(f"largest gap between new events {watcher.max_gap:.1f} s")
    th = [x for _, x, _ in warm]
    fds = [x for _, _, x in warm]
    print(f"threads after warm-up {min(th)}..{max(th)}, open fds {min(fds)}..{max(fds)}")
    return lost == 0 and max(th) - min(th) <= 4 and max(fds) - min(fds) <= 6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--warmup", type=float, default=2.0, help="minutes not counted")
    p.add_argument("--clip", help="a video file; default: a generated scene of --people")
    p.add_argument("--people", type=int, default=8)
    p.add_argument("--shared", default=None,
                   help="research data folder with data/faces/ (default: $EDGE_AGENT_SHARED)")
    p.add_argument("--limit-mb", type=float, default=2.0)
    p.add_argument("--faults", action="store_true", help="flap the broker, SIGHUP, refusals")
    p.add_argument("--fault-every", type=float, default=8.0, help="seconds between faults")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rtsp", action="store_true", help="the clip over RTSP, with stream faults")
    args = p.parse_args(argv)
    if args.minutes - args.warmup < (0.5 if args.faults else 2):
        p.error("--minutes must exceed --warmup by at least 2 (0.5 with --faults)")

    models_dir = assets.models_dir()
    work = Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    clip = args.clip
    if clip is None:
        faces = scenario.shared_dir(args.shared) / "data" / "faces"
        scn = scenario.plan(faces, people=args.people, seed=11)
        clip = str(scenario.render(scn, faces, work / "soak.mp4", h264=args.rtsp))  # RTSP: H.264
    port = free_port()
    broker = start_mosquitto(work, port, persist(work) if args.faults else "")
    rtsp = Rtsp(free_port(), clip) if args.rtsp else None
    if rtsp:
        rtsp.start()
    cfg = {
        "device_id": "soak", "camera": "loop",
        "source": ({"uri": rtsp.url, "reconnect_max_s": 1.0} if rtsp else
                   {"uri": clip, "loop": True, "realtime": True}),
        "models": {"dir": str(models_dir)},
        "mqtt": {"port": port, "state_interval_s": 5, "reconnect_max_s": 2.0,
                 "protocol": "5" if args.faults else "3.1.1"},
        "spool": {"path": str(work / "spool.db")},
    }
    (work / "agent.yaml").write_text(yaml.safe_dump(cfg))
    watcher = Watcher(port, BASE)
    log = (work / "agent.log").open("w")
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c",
                              str(work / "agent.yaml")], stderr=log)
    samples: list[tuple[float, float]] = []
    counts: list[tuple[float, int, int]] = []
    faults = Faults(work, port, agent, broker, args.seed, args.fault_every, rtsp)
    t0 = time.monotonic()
    print(f"soak: {args.minutes:g} min on {clip} (warm-up {args.warmup:g} min), pid {agent.pid}")
    print(" min   rss mean   rss max   events   fps")
    try:
        if args.faults:
            time.sleep(5)  # models loaded, first frames: then the faults begin
            faults.start()
        next_report = 60.0
        while (elapsed := time.monotonic() - t0) < args.minutes * 60:
            if agent.poll() is not None:
                print(f"agent exited with {agent.returncode}; log in {work / 'agent.log'}")
                return 1
            samples.append((elapsed, rss_mb(agent.pid)))
            counts.append((elapsed, *threads_fds(agent.pid)))
            if elapsed >= next_report:
                minute = [r for t, r in samples if t >= next_report - 60]
                print(f"{next_report / 60:4.0f}   {statistics.mean(minute):7.1f}   "
                      f"{max(minute):7.1f}   {watcher.events:6d}   "
                      f"{watcher.state.get('fps', 0):5.1f}", flush=True)
                next_report += 60
            time.sleep(1.0 - (time.monotonic() - t0) % 1.0)
    finally:
        broker = faults.close()
        if args.faults:  # the broker back for good: let the agent deliver what it holds
            time.sleep(8)
        agent.terminate()
        code = agent.wait(30)
        time.sleep(1)
        watcher.close()
        broker.terminate()
        broker.wait(5)
        if rtsp:
            rtsp.stop()

    faults_ok = True
    if args.faults:
        faults_ok = _report_faults(watcher, work / "spool.db", counts, args.warmup * 60, faults)
    warm = [(t, r) for t, r in samples if t >= args.warmup * 60]
    window = min(60.0, (warm[-1][0] - warm[0][0]) / 3)
    first = statistics.mean(r for t, r in warm if t < warm[0][0] + window)
    last = statistics.mean(r for t, r in warm if t >= warm[-1][0] - window)
    slope = statistics.linear_regression([t for t, _ in warm], [r for _, r in warm]).slope
    growth = last - first
    print(f"\nsamples {len(samples)}, after warm-up {len(warm)}; events {watcher.events}, "
          f"frames {watcher.state.get('frames')}, exit {code}")
    print(f"rss after warm-up {first:.1f} MB, at the end {last:.1f} MB, "
          f"peak {max(r for _, r in samples):.1f} MB")
    print(f"growth after warm-up {growth:+.2f} MB (slope {slope * 3600:+.2f} MB/h); "
          f"limit {args.limit_mb:g} MB: {'ok' if growth < args.limit_mb else 'TOO MUCH'}")
    if code == 0 and faults_ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work} (agent.log, spool.db)")
    return 0 if growth < args.limit_mb and code == 0 and faults_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Broker outage benchmark: events spooled while mosquitto is down, then drained.

Runs the agent's delivery path (Spool + Publisher) in this process against a local mosquitto;
a `mosquitto_sub` in a persistent session (broker persistence on) records what arrives. Phases:
warm-up with the broker up; outage of --duration s at --rate events/s (RSS sampled every
second); broker back, events keep coming at the same rate while the backlog drains; then
every seq is checked. Prints a summary, or JSON with --json. Exit 1 if anything was lost.

    python devtools/spool_outage.py --duration 600 --rate 17       # 10-minute outage, ~10k events
    python devtools/spool_outage.py --duration 5 --rate 2000 --json # 10k events, quickly
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devtools.broker import free_port, start_mosquitto
from edge_agent.config import MqttConfig, SpoolConfig
from edge_agent.health import rss_mb
from edge_agent.mqtt import Publisher
from edge_agent.spool import Spool

BASE = "bench/dev"


def event(i: int) -> dict[str, Any]:
    """A realistic face event (docs/contract.md), ~260 bytes as compact JSON."""
    return {"type": ("new", "update", "end")[i % 3], "track_id": f"1-{i // 3}",
            "device": "dev", "camera": "front", "ts": round(time.time(), 3), "frame": 5 * i,
            "frame_size": [640, 480], "box": [random.randint(0, 500), 120, 96, 96],
            "first_frame": 5 * i - 40, "last_frame": 5 * i, "gender": "female",
            "gender_score": 0.912, "age": 31.5, "age_bucket": "25-34", "det_score": 0.874}


def wait(pred: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def produce(pub: Publisher, rate: float, count: int, on_second: Any = None) -> float:
    """Publish `count` events paced at `rate` per second (later if the host is slower);
    returns the seconds it took."""
    n, t0, next_tick = 0, time.monotonic(), 1.0
    while n < count:
        el = time.monotonic() - t0
        due = min(int(el * rate) + 1, count)
        while n < due:
            pub.publish_event(event(n))
            n += 1
        if on_second and el >= next_tick:
            on_second()
            next_tick += 1.0
        time.sleep(min(0.05, max(0.0, (n / rate) - (time.monotonic() - t0))))
    return time.monotonic() - t0


def run(duration: float, rate: float, max_events: int, inflight: int,
        drain_traffic: bool = True) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="spool-outage-"))
    port = free_port()
    (work / "db").mkdir()
    conf = f"persistence true\npersistence_location {work / 'db'}/\nmax_queued_messages 0\n"
    broker = start_mosquitto(work, port, conf)
    out = (work / "received.txt").open("wb")
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "-q", "1", "-c", "-i",
                            "bench-collector", "-t", f"{BASE}/events"], stdout=out)
    spool = Spool(SpoolConfig(path=str(work / "spool.db"), max_events=max_events))
    pub = Publisher(MqttConfig(port=port, max_inflight=inflight, reconnect_min_s=0.1,
                               reconnect_max_s=0.5, discovery=False), BASE, spool)
    try:
        assert wait(lambda: pub.connected, 10), "no connection to the broker"
        time.sleep(0.5)  # the collector subscribes
        warm = int(min(rate, 500.0))
        produce(pub, min(rate, 500.0), warm)
        assert pub.drain(30), "warm-up not drained"
        gc.collect()
        rss0 = rss_mb()

        broker.terminate()
        broker.wait(10)
        assert wait(lambda: not pub.connected, 10)
        samples: list[float] = []
        outage = round(duration * rate)
        outage_s = produce(pub, rate, outage, lambda: samples.append(rss_mb()))
        rss_outage_end = rss_mb()
        backlog_last = spool.last_seq()
        depth = spool.depth()
        dropped_outage = spool.dropped()
        spool_bytes = sum(p.stat().st_size for p in work.glob("spool.db*"))

        broker = start_mosquitto(work, port, conf)
        t0 = time.monotonic()

        def backlog_gone() -> bool:
            rows = spool.pending(0, 1)
            return not rows or rows[0][0] > backlog_last

        during = 0
        while not backlog_gone() and time.monotonic() - t0 < 600:
            if drain_traffic:
                chunk = max(1, round(rate * 0.05))
                produce(pub, rate, chunk)
                during += chunk
            else:
                time.sleep(0.005)
        drain_s = time.monotonic() - t0
        timed_out = not backlog_gone()
        assert pub.drain(60), f"{spool.depth()} events not drained"
        last = spool.last_seq()
        dropped = spool.dropped()
        # the outage drops the oldest spooled: right after the warm-up's (all delivered)
        expect = set(range(1, last + 1)) - set(range(warm + 1, warm + dropped_outage + 1))

        def received() -> list[int]:
            text = (work / "received.txt").read_bytes().decode()
            return [json.loads(line)["seq"] for line in text.splitlines() if line]

        wait(lambda: set(received()) >= expect, 60, 0.5)
        got = received()
        return {
            "duration_s": duration, "outage_s": round(outage_s, 1), "rate": rate,
            "max_events": max_events,
            "inflight": inflight, "events_warmup": warm, "events_outage": outage,
            "events_during_drain": during, "spool_depth_at_reconnect": depth,
            "spool_bytes_at_reconnect": spool_bytes, "dropped": dropped,
            "dropped_during_drain": dropped - dropped_outage,
            "drain_s": round(drain_s, 3),
            "drain_rate_per_s": round(depth / drain_s, 1) if drain_s > 0 else None,
            "rss_before_mb": round(rss0, 2),
            "rss_peak_outage_mb": round(max([*samples, rss_outage_end]), 2),
            "rss_outage_end_mb": round(rss_outage_end, 2),
            "rss_growth_mb": round(max([*samples, rss_outage_end]) - rss0, 2),
            "received": len(set(got)), "duplicates": len(got) - len(set(got)),
            "lost": len(expect - set(got)), "unexpected": len(set(got) - expect),
            "order_ok": _first_seen(got) == sorted(set(got)), "timed_out": timed_out,
        }
    finally:
        pub.stop()
        spool.close()
        sub.terminate()
        sub.wait(5)
        out.close()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _first_seen(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    out = []
    for q in seqs:
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=600.0, help="outage length, seconds")
    p.add_argument("--rate", type=float, default=17.0, help="events per second")
    p.add_argument("--max-events", type=int, default=100_000, help="spool.max_events")
    p.add_argument("--inflight", type=int, default=20, help="mqtt.max_inflight")
    p.add_argument("--quiet-drain", action="store_true",
                   help="no new events while the backlog drains")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verbose", action="store_true", help="show the agent's MQTT log")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.ERROR, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    r = run(a.duration, a.rate, a.max_events, a.inflight, not a.quiet_drain)
    if a.json:
        print(json.dumps(r))
    else:
        mb = r["spool_bytes_at_reconnect"] / 1e6
        print(f"outage {r['outage_s']:.0f} s at {r['rate']:g} events/s: "
              f"{r['spool_depth_at_reconnect']} spooled ({mb:.1f} MB on disk), "
              f"{r['dropped']} dropped over the bound")
        print(f"drained in {r['drain_s']:.2f} s = {r['drain_rate_per_s']} events/s "
              f"(new events kept coming: {r['events_during_drain']})")
        print(f"RSS {r['rss_before_mb']} MB before, peak {r['rss_peak_outage_mb']} MB during the "
              f"outage: growth {r['rss_growth_mb']} MB")
        print(f"received {r['received']} distinct, {r['duplicates']} duplicates, lost "
              f"{r['lost']}, order {'ok' if r['order_ok'] else 'BROKEN'}")
    return 0 if r["lost"] <= r["dropped_during_drain"] and r["order_ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

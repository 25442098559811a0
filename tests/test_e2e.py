"""End to end: a generated clip with exact ground truth goes through `edge-agent run` against a
real mosquitto; a subscriber checks what dashboards would see."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import SAMPLE_CLIP, Broker, RtspServer, event_errors, free_port

from devtools import scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def scene(tmp_path_factory: pytest.TempPathFactory, faces_dir: Path) -> tuple[Path,
                                                                             scenario.Scenario]:
    """Six adults, two or three on screen at once, one pair crossing with overlapping faces."""
    scn = scenario.plan(faces_dir, people=6, seed=7)
    clip = tmp_path_factory.mktemp("scene") / "scene.mp4"
    return scenario.render(scn, faces_dir, clip), scn


class Recorder:
    """Subscribes to everything under the device's topics and keeps it."""

    def __init__(self, port: int, base: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.retained: dict[str, str] = {}
        self.status: list[str] = []
        self.invalid: list[str] = []  # events that break docs/event.schema.json
        self.got = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-recorder")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{base}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        text = msg.payload.decode()
        with self.got:
            if msg.topic.endswith("/events"):
                self.events.append(json.loads(text))
                self.invalid += [f"{text}: {e}" for e in event_errors(self.events[-1])]
            elif msg.topic.endswith("/status"):
                self.status.append(text)
            if msg.retain or not msg.topic.endswith("/events"):
                self.retained[msg.topic.rsplit("/", 1)[1]] = text
            self.got.notify_all()

    def wait_for(self, pred: Any, timeout: float) -> bool:
        with self.got:
            return self.got.wait_for(pred, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        assert not self.invalid, "events not matching docs/event.schema.json:\n" + "\n".join(
            self.invalid[:5])


def agent_config(tmp_path: Path, models_dir: Path, port: int, uri: str, **source: Any) -> Path:
    cfg = {
        "device_id": "test-pi",
        "camera": "hall",
        "source": {"uri": uri, **source},
        "models": {"dir": str(models_dir)},
        "mqtt": {"port": port, "state_interval_s": 1},
        "spool": {"path": str(tmp_path / "spool.db")},
    }
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_agent(cfg: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=timeout)


def test_clip_through_agent_to_broker(tmp_path: Path, scene: tuple[Path, scenario.Scenario],
                                      broker: Broker, models_dir: Path) -> None:
    clip, scn = scene
    rec = Recorder(broker.port, "edge-agent/test-pi")
    try:
        r = run_agent(agent_config(tmp_path, models_dir, broker.port, str(clip), realtime=False))
        assert r.returncode == 0, r.stderr[-3000:]
        assert rec.wait_for(lambda: rec.status[-1:] == ["offline"], 5), rec.status
    finally:
        rec.close()
    events = rec.events
    score = scenario.evaluate(scn, events)
    detail = score.summary() + "\n" + "\n".join(json.dumps(e) for e in events)

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), detail
    assert score.events_ok, detail  # exactly one new and one end per track, new first
    assert score.found == len(scn.people), detail
    assert score.duplicates == 0 and score.false_tracks == 0, detail
    assert score.tracks == len(scn.people), detail
    assert score.gender_correct >= len(scn.people) - 1, detail
    assert score.age_mae <= 12.0, detail
    assert max(score.latencies) <= 15, detail

    for e in events:
        assert e["device"] == "test-pi" and e["camera"] == "hall"
        assert e["frame_size"] == [scn.width, scn.height]
        assert e["first_frame"] <= e["frame"] <= scn.frames - 1
        assert e["first_frame"] <= e["last_frame"]
        assert 0.0 <= e["gender_score"] <= 1.0 and 0.0 < e["det_score"] <= 1.0
        if e["type"] == "new":
            assert e["gender"] in ("male", "female") and e["age_bucket"], e
    assert len({e["track_id"] for e in events}) == len(scn.people)
    assert rec.retained["status"] == "offline"
    state = json.loads(rec.retained["state"])
    assert state["frames"] == scn.frames and state["spool_depth"] == 0
    assert state["rss_mb"] > 0 and "fps" in state and "reconnects" in state


def test_restart_continues_seq_and_track_ids(tmp_path: Path,
                                             scene: tuple[Path, scenario.Scenario],
                                             broker: Broker, models_dir: Path) -> None:
    clip, _ = scene
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), realtime=False)
    rec = Recorder(broker.port, "edge-agent/test-pi")
    try:
        assert run_agent(cfg).returncode == 0
        first = len(rec.events)
        assert run_agent(cfg).returncode == 0
        assert rec.wait_for(lambda: len(rec.events) == 2 * first, 5)
    finally:
        rec.close()
    assert [e["seq"] for e in rec.events] == list(range(1, 2 * first + 1))
    ids = [e["track_id"] for e in rec.events if e["type"] == "new"]
    assert len(set(ids)) == len(ids)


def test_missing_model_exits_3(tmp_path: Path, broker: Broker) -> None:
    r = run_agent(agent_config(tmp_path, tmp_path / "empty", broker.port, str(SAMPLE_CLIP)), 60)
    assert r.returncode == 3
    assert "face_detection_yunet_2023mar.onnx" in r.stderr


def test_missing_clip_exits_2(tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    r = run_agent(agent_config(tmp_path, models_dir, broker.port, str(tmp_path / "nope.mp4")), 60)
    assert r.returncode == 2
    assert "source.uri" in r.stderr and "nope.mp4" in r.stderr


def test_rtsp_stream_through_agent_survives_a_server_restart(
        tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    """The sample clip (H.264) served over RTSP; the server is killed and restarted mid-run; the
    agent reconnects, keeps publishing, and a SIGTERM ends open tracks with a clean `offline`."""
    server = RtspServer(free_port(), SAMPLE_CLIP)
    server.start()
    cfg = agent_config(tmp_path, models_dir, broker.port, server.url, read_timeout_s=2.0,
                       reconnect_max_s=1.0)
    rec = Recorder(broker.port, "edge-agent/test-pi")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, text=True)

    def state() -> dict[str, Any]:
        return json.loads(rec.retained.get("state", "{}"))

    try:
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events), 30), \
            "no face event from the RTSP stream"
        server.stop()
        assert rec.wait_for(lambda: state().get("source") == "reconnecting", 10), state()
        frames_before = state()["frames"]
        server.start()
        t0 = time.monotonic()
        assert rec.wait_for(lambda: state().get("source") == "open"
                            and state()["frames"] > frames_before, 10), state()
        recovery = time.monotonic() - t0
        assert recovery < 5.0, f"recovered in {recovery:.1f} s"
        assert state()["source_reconnects"] >= 1
        n = len(rec.events)
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events[n:]), 30), \
            "no face event after the reconnect"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.stderr.read() if proc.stderr else ""
        assert rec.wait_for(lambda: rec.status[-1:] == ["offline"], 5)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
        rec.close()
    events = rec.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    kinds: dict[str, list[str]] = {}
    for e in events:
        kinds.setdefault(e["track_id"], []).append(e["type"])
    for tid, k in kinds.items():
        assert k[0] == "new" and k[-1] == "end" and k.count("new") == k.count("end") == 1, tid
    frames = [e["frame"] for e in events if e["type"] == "new"]
    assert frames == sorted(frames), "live frame numbers never go back, reconnects included"


def test_memory_ceiling_exits_75_after_a_clean_stop(tmp_path: Path, broker: Broker,
                                                    models_dir: Path) -> None:
    """A ceiling below what the agent needs: it says so, publishes `offline`, exits 75."""
    cfg = agent_config(tmp_path, models_dir, broker.port, str(SAMPLE_CLIP), loop=True)
    data = yaml.safe_load(cfg.read_text()) | {"memory": {"ceiling_mb": 40}}
    cfg.write_text(yaml.safe_dump(data))
    rec = Recorder(broker.port, "edge-agent/test-pi")
    try:
        r = run_agent(cfg, 60)
        assert r.returncode == 75, r.stderr[-2000:]
        assert "memory ceiling reached" in r.stderr
        assert rec.wait_for(lambda: rec.status[-1:] == ["offline"], 5), rec.status
        assert json.loads(rec.retained["state"])["memory"] == "ceiling"
    finally:
        rec.close()


def test_memory_pressure_sheds_work_and_reports_it(tmp_path: Path, broker: Broker,
                                                   models_dir: Path) -> None:
    cfg = agent_config(tmp_path, models_dir, broker.port, str(SAMPLE_CLIP), realtime=False)
    data = yaml.safe_load(cfg.read_text()) | {"memory": {"ceiling_mb": 300,
                                                         "soft_fraction": 0.1}}
    cfg.write_text(yaml.safe_dump(data))
    rec = Recorder(broker.port, "edge-agent/test-pi")
    try:
        assert run_agent(cfg).returncode == 0
        assert rec.wait_for(lambda: "state" in rec.retained, 5)
    finally:
        rec.close()
    state = json.loads(rec.retained["state"])
    assert state["memory"] == "shed" and state["memory_sheds"] == 1
    assert state["every_n"] == 3 * 5


def test_counts_lines_and_keeps_the_days_totals_across_a_restart(
        tmp_path: Path, scene: tuple[Path, scenario.Scenario], broker: Broker,
        models_dir: Path) -> None:
    clip, scn = scene
    cfg = agent_config(tmp_path, models_dir, broker.port, str(clip), realtime=False)
    raw = yaml.safe_load(cfg.read_text())
    lines = [{"name": "middle", "a": [0.5, 1.0], "b": [0.5, 0.0]}]
    raw["count"] = {"lines": lines}
    cfg.write_text(yaml.safe_dump(raw))
    truth = scenario.line_truth(dataclasses.replace(scn, lines=lines))["middle"]
    rec = Recorder(broker.port, "edge-agent/test-pi")
    try:
        assert run_agent(cfg).returncode == 0
        assert rec.wait_for(lambda: "counts" in rec.retained, 5)
        first = json.loads(rec.retained["counts"])
        assert run_agent(cfg).returncode == 0
        assert rec.wait_for(lambda: json.loads(rec.retained["counts"])["people"]
                            == 2 * first["people"], 5), rec.retained["counts"]
    finally:
        rec.close()
    crosses = [e for e in rec.events if e["type"] == "cross"]
    assert first["people"] == len(scn.people)
    assert sum(first["gender"].values()) == sum(first["age_bucket"].values()) == len(scn.people)
    assert first["lines"] == {"middle": truth}, first
    assert len(crosses) == 2 * sum(truth.values())
    ends = [e for e in rec.events if e["type"] == "end"]
    assert all(0 < e["dwell_s"] <= scn.frames / scn.fps for e in ends)
    assert len({e["spool_id"] for e in rec.events}) == 1


def test_the_agent_says_when_it_cannot_keep_up_with_the_camera(
        tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    """The sample clip paced at its own 25 fps is kept up with; the same frames stamped 25x as
    fast (~625 fps: no CPU here decodes and tracks that) are not, and the agent says so."""
    fast = tmp_path / "fast.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-itsscale", "0.04", "-i", str(SAMPLE_CLIP),
                    "-c", "copy", str(fast)], check=True)
    for clip, pace in ((SAMPLE_CLIP, "ok"), (fast, "behind")):
        state, stderr = _first_judged_state(tmp_path / pace, broker, models_dir, clip, pace)
        assert state["pace"] == pace, state
        assert (state["pace_share"] > 0.9) == (pace == "ok"), state
        fps = cv2.VideoCapture(str(clip)).get(cv2.CAP_PROP_FPS)
        assert state["source_fps"] == pytest.approx(fps, rel=0.05), state
        said = [line for line in stderr.splitlines() if "on this machine's CPU" in line]
        assert len(said) == (pace == "behind"), stderr[-3000:]
        if said:
            assert "WARNING" in said[0] and "640x338" in said[0] and "sub-stream" in said[0]


def _first_judged_state(work: Path, broker: Broker, models_dir: Path, clip: Path,
                        device: str) -> tuple[dict[str, Any], str]:
    """`T/state` once the first 10 s of frames were judged (PACE_WINDOW_S), and the log."""
    work.mkdir()
    cfg = agent_config(work, models_dir, broker.port, str(clip), realtime=True, loop=True)
    cfg.write_text(yaml.safe_dump(yaml.safe_load(cfg.read_text()) | {"device_id": device}))
    rec = Recorder(broker.port, f"edge-agent/{device}")  # not another run's retained state
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, text=True)

    def state() -> dict[str, Any]:
        return json.loads(rec.retained.get("state", "{}"))

    try:
        assert rec.wait_for(lambda: state().get("pace_share") is not None, 40), state()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        return state(), proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        rec.close()


def test_without_tls_the_agent_runs_without_openssl(tmp_path: Path, broker: Broker,
                                                    models_dir: Path) -> None:
    """No `mqtt.tls`: OpenSSL's modules stay out of the process (4.5 MB, edge_agent/openssl.py),
    paho's connection still works and events arrive."""
    cfg = agent_config(tmp_path, models_dir, broker.port, str(SAMPLE_CLIP), realtime=True)
    rec = Recorder(broker.port, "edge-agent/test-pi")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "-c", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert rec.wait_for(lambda: any(e["type"] == "new" for e in rec.events), 40)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
        assert rec.wait_for(lambda: rec.status[-1:] == ["offline"], 5)
    finally:
        if proc.poll() is None:
            proc.kill()
        rec.close()
    loaded = {Path(line.split()[-1]).name.split(".")[0] for line in maps.splitlines()
              if "/" in line}
    assert not loaded & {"_ssl", "_hashlib"}, sorted(loaded)
    assert "network thread died" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert [e["seq"] for e in rec.events] == list(range(1, len(rec.events) + 1))

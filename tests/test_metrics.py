"""metrics.textfile: the T/state figures as a node_exporter textfile, written atomically."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import SAMPLE_CLIP, Broker
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent import config, metrics
from edge_agent.config import ConfigError

STATE = {"ts": 1795303763.6, "uptime_s": 12.5, "fps": 15.0, "frames": 180, "rss_mb": 101.5,
         "tracks": 2, "reconnects": 1, "source": "open", "broker": "connected",
         "memory": "ok", "last_gender": None, "last_age_bucket": "25-34", "source_error": None,
         "pace": "behind", "pace_share": 0.25, "source_fps": None}
LABEL = r'"((?:[^"\\]|\\.)*)"'
SAMPLE = re.compile(rf'^(\w+)\{{device={LABEL},camera={LABEL}(?:,state="(\w+)")?\}} (\S+)$')


def test_render_is_valid_exposition_format() -> None:
    text = metrics.render(STATE, 'pi "1"', "door")
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) edge_agent_\w+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, line
        assert m[2] == 'pi \\"1\\"' and m[3] == "door"
        samples[m[1] + (f"/{m[4]}" if m[4] else "")] = float(m[5])
    assert samples == {"edge_agent_ts": 1795303763.6, "edge_agent_uptime_s": 12.5,
                       "edge_agent_fps": 15.0, "edge_agent_frames_total": 180,
                       "edge_agent_rss_mb": 101.5, "edge_agent_tracks": 2,
                       "edge_agent_reconnects_total": 1, "edge_agent_source_state/open": 1,
                       "edge_agent_broker_state/connected": 1, "edge_agent_memory_state/ok": 1,
                       "edge_agent_pace_state/behind": 1, "edge_agent_pace_share": 0.25}
    assert "# TYPE edge_agent_frames_total counter" in text
    assert "# TYPE edge_agent_rss_mb gauge" in text


def test_write_replaces_the_file_and_survives_a_missing_folder(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    path = tmp_path / "edge_agent.prom"
    tf = metrics.Textfile(str(path))
    assert tf.write(STATE, "pi", "door") and tf.write({**STATE, "frames": 181}, "pi", "door")
    assert "edge_agent_frames_total{" in path.read_text()
    assert path.read_text().count("} 181\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["edge_agent.prom"]  # no temporary left
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    gone = metrics.Textfile(str(tmp_path / "missing" / "x.prom"))
    assert not gone.write(STATE, "pi", "door") and not gone.write(STATE, "pi", "door")
    assert len([r for r in caplog.records if "not written" in r.getMessage()]) == 1


def test_config_wants_a_prom_file(tmp_path: Path) -> None:
    cfg = config.from_dict({"source": {"uri": "x.mp4"}, "metrics": {"textfile": "m.prom"}},
                           base_dir=tmp_path)
    assert cfg.metrics.textfile == str(tmp_path / "m.prom")
    with pytest.raises(ConfigError, match=r"^metrics\.textfile: expected a path ending in \.prom"):
        config.from_dict({"source": {"uri": "x.mp4"}, "metrics": {"textfile": "/tmp/m.txt"}})
    assert config.from_dict({"source": {"uri": "x.mp4"}}).metrics.textfile is None


def test_agent_writes_the_state_figures(tmp_path: Path, broker: Broker, models_dir: Path) -> None:
    clip = SAMPLE_CLIP
    short = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(clip), "-t", "2", "-c", "copy",
                    str(short)], check=True)
    prom = tmp_path / "edge_agent.prom"
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
        "device_id": "metrics-pi", "camera": "door",
        "source": {"uri": str(short), "realtime": False}, "models": {"dir": str(models_dir)},
        "mqtt": {"port": broker.port}, "spool": {"path": str(tmp_path / "spool.db")},
        "metrics": {"textfile": str(prom)}}))
    states: list[dict[str, object]] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2)
    sub.on_connect = lambda c, *_: c.subscribe("edge-agent/metrics-pi/state", 1)
    sub.on_message = lambda c, u, m: states.append(json.loads(m.payload))
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    try:
        r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "-c",
                            str(tmp_path / "agent.yaml")], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        sub.loop_stop()
        sub.disconnect()
    text = prom.read_text()
    frames = re.search(r'^edge_agent_frames_total\{device="metrics-pi",camera="door"\} (\d+)$',
                       text, re.M)
    assert states and states[-1]["frames"] >= 50  # 2 s at 25 fps
    assert frames and int(frames[1]) == states[-1]["frames"], text  # the last state, also here

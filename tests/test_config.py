"""Configuration: typed, validated once, errors that name the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import config
from edge_agent.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_is_valid() -> None:
    cfg = config.load(REPO / "config" / "edge-agent.yaml")
    assert cfg.device_id == "pi-kitchen-01"
    assert cfg.detect.every_n_frames == 5
    assert cfg.memory.ceiling_mb == 200.0
    assert config.topic_base(cfg) == "edge-agent/pi-kitchen-01"


def test_defaults_fill_everything_but_the_source() -> None:
    cfg = config.from_dict({"source": {"uri": "rtsp://cam/stream"}})
    assert cfg.device_id  # the host name
    assert cfg.mqtt.port == 1883 and cfg.mqtt.drain_timeout_s == 10.0
    assert cfg.source.realtime is True and cfg.source.loop is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"detect": {"every_n_frames": "five"}},
         "detect.every_n_frames: expected an integer >= 1, got 'five'"),
        ({"detect": {"every_n_frames": 0}},
         "detect.every_n_frames: expected an integer >= 1, got 0"),
        ({"detect": {"every_n_frames": True}}, "detect.every_n_frames: expected an integer"),
        ({"mqtt": {"port": 70000}}, "mqtt.port: expected an integer from 1 to 65535, got 70000"),
        ({"detect": {"backend": "haar"}}, "detect.backend: expected one of 'yunet', 'ultraface'"),
        ({"source": {"uri": "x", "realtime": "yes"}}, "source.realtime: expected true or false"),
        ({"source": {"uri": "x", "fourcc": "MJPEG"}},
         "source.fourcc: expected a string of 4 characters, got 'MJPEG'"),
        ({"memory": {"ceiling_mb": 10}}, "memory.ceiling_mb: expected a number >= 32.0, got 10"),
        ({"mqtt": {"hots": "x"}}, "mqtt.hots: unknown key"),
        ({"mqtt": "broker"}, "mqtt: expected a mapping, got 'broker'"),
        ({"source": {"uri": ""}}, "source.uri: expected a device"),
        ({"mqtt": {"topic_prefix": "a/#"}}, "mqtt.topic_prefix: expected topic levels"),
        ({"device_id": "pi/1"}, "device_id: expected a non-empty name without '#', '+', '/'"),
        ({"track": {"max_unseen_s": float("nan")}}, "track.max_unseen_s: expected a number >= 0.0"),
        ({"memory": {"ceiling_mb": float("inf")}}, "memory.ceiling_mb: expected a number >= 32.0"),
        ({"mqtt": {"reconnect_min_s": 5, "reconnect_max_s": 1}},
         "mqtt.reconnect_max_s: expected a number >= mqtt.reconnect_min_s (5.0), got 1.0"),
        ({"classify": {"samples": 5, "window": 3}}, "classify.window: expected an integer >= "),
        ({"source": {"uri": "x", "reconnect_min_s": 5, "reconnect_max_s": 1}},
         "source.reconnect_max_s: expected a number >= source.reconnect_min_s"),
    ],
)
def test_errors_name_the_key(data: dict, message: str) -> None:
    data = {"source": {"uri": "clip.mp4"}} | data
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert str(e.value).startswith(message)


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("source: {uri: clip.mp4}\nmodels: {dir: m}\nspool: {path: s.db}\n")
    cfg = config.load(f)
    assert cfg.source.uri == str(tmp_path / "clip.mp4")
    assert cfg.models.dir == str(tmp_path / "m")
    assert cfg.spool.path == str(tmp_path / "s.db")
    assert config.from_dict({"source": {"uri": "rtsp://h/x"}}, tmp_path).source.uri == "rtsp://h/x"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_MQTT_HOST", "broker.lan")
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "pi-07")
    monkeypatch.setenv("EDGE_AGENT_MQTT_PORT", "nope")
    with pytest.raises(ConfigError, match="EDGE_AGENT_MQTT_PORT: expected an integer"):
        config.from_dict({"source": {"uri": "x"}})
    monkeypatch.setenv("EDGE_AGENT_MQTT_PORT", "8883")
    cfg = config.from_dict({"source": {"uri": "x"}, "device_id": "from-yaml"})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.device_id) == ("broker.lan", 8883, "pi-07")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    ok = _cli("check-config", "-c", str(REPO / "config" / "edge-agent.yaml"))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: {uri: /dev/video0}\ndetect: {every_n_frames: five}\n")
    r = _cli("check-config", "-c", str(bad))
    assert r.returncode == 2
    assert "detect.every_n_frames: expected an integer >= 1, got 'five'" in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("source: [unclosed\n")
    r = _cli("check-config", "-c", str(broken))
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    r = _cli("check-config", "-c", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_check_config_reads_the_mqtt_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    cfg = tmp_path / "a.yaml"
    cfg.write_text("source: {uri: /dev/video0}\n"
                   "mqtt: {username: cam, password_file: password}\n")
    r = _cli("check-config", "-c", str(cfg))
    assert r.returncode == 2 and "mqtt.password_file" in r.stderr
    secret.chmod(0o600)
    assert _cli("check-config", "-c", str(cfg)).returncode == 0

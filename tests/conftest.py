"""Shared test fixtures: where the shared models and data live, and a real mosquitto."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.broker import free_port, start_mosquitto, wait_port

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EDGE_AGENT_SHARED", REPO.parent / "shared")).resolve()
MODELS = SHARED / "models"
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
DEBIAN_PYTHON = "/usr/bin/python3"  # the one with Debian's `gi` for gst-rtsp-server
FACES = SHARED / "data" / "faces"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    if not (MODELS / "face_detection_yunet_2023mar.onnx").exists():
        pytest.fail(f"shared models not found in {MODELS} (set EDGE_AGENT_SHARED)")
    return MODELS


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if not (FACES / "labels.csv").exists():
        pytest.fail(f"shared face data not found in {FACES} (set EDGE_AGENT_SHARED)")
    return FACES


@dataclass
class Broker:
    """A mosquitto on a loopback port that a test can stop and start again."""

    port: int
    workdir: Path
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_mosquitto(self.workdir, self.port, self.extra_conf)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if not shutil.which("mosquitto"):
        pytest.fail("mosquitto is not installed (run .ci/run or apt-get install mosquitto)")
    b = Broker(port=free_port(), workdir=tmp_path)
    b.start()
    yield b
    b.stop()


@dataclass
class RtspServer:
    """tests/rtsp_server.py serving an H.264 mp4 at /clip on a loopback port."""

    port: int
    clip: Path
    proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/clip"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [DEBIAN_PYTHON, str(RTSP_SERVER), "--port", str(self.port), "--mount", "/clip",
             "--file", str(self.clip)],
            stdout=subprocess.PIPE, text=True,
        )
        wait_port(self.port)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == f"READY {self.url}"

    def stop(self) -> int | None:
        code = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            code = self.proc.wait(5)
        self.proc = None
        return code


EVENT_SCHEMA = REPO / "docs" / "event.schema.json"


@functools.cache
def _event_validator() -> Any:
    import jsonschema

    schema = json.loads(EVENT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def event_errors(event: Any) -> list[str]:
    """Why `event` breaks docs/event.schema.json (CONTRACT.md's face event); [] if it is fine."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(event)'}: {e.message}"
            for e in _event_validator().iter_errors(event)]

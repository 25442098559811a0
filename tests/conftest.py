"""Shared test fixtures: the models (per-user cache, as the demo), the sample clip, the optional
research-only face data (EDGE_AGENT_SHARED), and a real mosquitto."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools import assets
from devtools.broker import free_port, start_mosquitto, wait_port
from edge_agent import models

REPO = Path(__file__).resolve().parent.parent
# The research-only data folder (data/faces/: labelled UTKFace crops, group photos), never
# shipped and never guessed: only where EDGE_AGENT_SHARED names it.
SHARED: Path | None = (Path(os.environ["EDGE_AGENT_SHARED"]).resolve()
                       if os.environ.get("EDGE_AGENT_SHARED") else None)
FACES: Path | None = SHARED / "data" / "faces" if SHARED else None
NO_SHARED = ("needs the research-only labelled face data: set EDGE_AGENT_SHARED to the folder "
             "that holds data/faces/")
MODELS = models.cache_dir()  # filled by fetch_models(), the same cache the demo uses
SAMPLE_CLIP = assets.SAMPLE_CLIP
SAMPLE_FACES = 2  # one person, who turns away and back: two face tracks
RTSP_SERVER = Path(__file__).with_name("rtsp_server.py")
DEBIAN_PYTHON = "/usr/bin/python3"  # the one with Debian's `gi` for gst-rtsp-server


def fetch_models(names: list[str] | None = None) -> Path:
    """The per-user model cache with `names` (default: the default pipeline's) in it, filled
    as the demo fills it; with EDGE_AGENT_SHARED, its models/ is tried first as a mirror."""
    mirror = str(SHARED / "models") if SHARED and (SHARED / "models").is_dir() else None
    return assets.models_dir(names, mirror, say=lambda m: print(m, file=sys.stderr))


def wait_for(pred: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll `pred` until it is true or `timeout` seconds have passed; whether it came true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return fetch_models()


@pytest.fixture(scope="session")
def every_model_dir() -> Path:
    """The cache with every model of the manifest, the alternative detector too. That one comes
    from its upstream URL (or EDGE_AGENT_SHARED's models/); offline without either, skip."""
    try:
        return fetch_models([e.name for e in models.load_manifest()])
    except models.ModelError as e:
        if SHARED:
            raise
        missing = [n for n in (m.name for m in models.load_manifest())
                   if f"could not fetch {models.cache_dir() / n}" in str(e)]
        pytest.skip(f"{', '.join(missing)}: upstream URL not reachable here; set "
                    "EDGE_AGENT_SHARED to a folder whose models/ holds it")


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    if FACES is None:
        pytest.skip(NO_SHARED)
    if not (FACES / "labels.csv").exists():
        pytest.fail(f"EDGE_AGENT_SHARED: no labelled face data in {FACES}")
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
    """Why `event` breaks docs/event.schema.json (docs/contract.md's face event), or []."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(event)'}: {e.message}"
            for e in _event_validator().iter_errors(event)]

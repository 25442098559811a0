"""The fault soak, short: a minute of broker stops and SIGKILLs, SIGHUP storms, MQTT 5
refusals and RTSP server restarts, hangs and resolution changes against a real agent; every
event produced is received (after dedupe by device, spool_id, seq) or still in the spool, and
threads and descriptors stay flat."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from devtools import assets

pytestmark = pytest.mark.slow


def test_short_fault_soak_loses_nothing(tmp_path: Path, models_dir: Path) -> None:
    clip = assets.busy_clip(tmp_path / "busy.mp4")  # H.264, a face every 2 s: events keep coming
    r = subprocess.run(
        [sys.executable, "-m", "devtools.soak", "--minutes", "1.25", "--warmup", "0.25",
         "--faults", "--rtsp", "--fault-every", "5", "--limit-mb", "10", "--clip", str(clip)],
        capture_output=True, text=True, timeout=170, cwd=REPO)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LOST 0" in r.stdout

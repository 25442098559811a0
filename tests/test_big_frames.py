"""Big cameras: a generated 1080p H.264 scene runs under the default memory ceiling, scaled once
at capture (source.max_width), with an event for every face; a restart loop on the ceiling is
recognised at the next start."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import scenario
from edge_agent import config
from edge_agent.health import CeilingExits, adapt_to_exits

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg")


def test_1080p_scene_runs_under_the_default_ceiling_with_every_face(
        tmp_path: Path, models_dir: Path, faces_dir: Path) -> None:
    scn = scenario.scaled(scenario.plan(faces_dir, people=2, seed=11), 1920, 1080)
    clip = scenario.render_camera(scn, faces_dir, tmp_path / "hd.mp4")
    out = subprocess.run([sys.executable, "-m", "devtools.bench", "agent", str(clip),
                          str(models_dir), "0"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["frames"] == scn.frames
    assert r["peak_rss_mb"] < config.MemoryConfig().ceiling_mb
    assert "people 2, found 2 " in r["score"] and "false 0" in r["score"], r["score"]


def test_ceiling_exits_soon_after_start_are_named_and_the_next_start_scales_down(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config.from_dict({"source": {"uri": "rtsp://cam/main"},
                            "spool": {"path": str(tmp_path / "spool.db")}})
    exits = CeilingExits.beside(cfg.spool.path)
    assert adapt_to_exits(cfg, exits) is cfg
    exits.record(uptime_s=4.0, rss_mb=233.0)
    assert adapt_to_exits(cfg, CeilingExits.beside(cfg.spool.path)) is cfg  # a one-off
    exits.record(uptime_s=3.0, rss_mb=231.0)
    again = CeilingExits.beside(cfg.spool.path)
    assert again.looping and len(again.exits) == 2
    with caplog.at_level(logging.ERROR):
        adapted = adapt_to_exits(cfg, again)
    assert adapted.source.max_width == 640
    assert "sub-stream" in caplog.text and "memory.ceiling_mb" in caplog.text
    stale = CeilingExits(again.path, now=again.exits[-1]["ts"] + 7200)
    assert not stale.looping

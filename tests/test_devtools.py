"""The development package: every script imports and runs on tiny inputs, the commands that need
it fail clearly without it, and the wheel a Pi installs holds the daemon only."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_CLIP

import devtools
from devtools import demo


def test_every_devtools_module_imports() -> None:
    names = [m.name for m in pkgutil.iter_modules(devtools.__path__)]
    assert {"assets", "bench", "broker", "demo", "scenario", "soak", "spool_outage",
            "track_flow"} <= set(names)
    for name in names:
        importlib.import_module(f"devtools.{name}")


def _dev(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_track_flow_runs_on_seconds_of_the_sample_clip(models_dir: Path) -> None:
    r = _dev("devtools.track_flow", "--seconds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{SAMPLE_CLIP.name}: 50 frames, 50 faces" in r.stdout
    for mode in ("hold", "kalman", "flow"):
        assert f"  {mode}" in r.stdout


def test_soak_and_spool_outage_parse_their_arguments() -> None:
    for module in ("devtools.soak", "devtools.spool_outage"):
        r = _dev(module, "--help", timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


def test_bench_on_a_second_of_video(tmp_path: Path, models_dir: Path) -> None:
    clip = tmp_path / "short.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(SAMPLE_CLIP), "-t", "1", "-c",
                    "copy", str(clip)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_SHARED"}

    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_agent", "bench", "--clip", str(clip),
                               "--modes", "decode,agent", *args], capture_output=True,
                              text=True, timeout=300, cwd=REPO, env=env)

    r = bench("--rounds", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.findall(r"^(\w+) +\d+ ", r.stdout, re.M) == ["decode", "agent"] * 2, r.stdout
    assert re.search(r"agent / decode CPU: [\d.]+x \(median of 2 rounds, each round: "
                     r"[\d.]+, [\d.]+\)", r.stdout), r.stdout
    r = bench("--rounds", "0")
    assert r.returncode == 2 and "--rounds: expected an integer >= 1" in r.stdout, r.stdout


def test_demo_summary() -> None:
    ev = [{"type": "new", "track_id": "1-1", "gender": None, "age_bucket": None},
          {"type": "update", "track_id": "1-1", "gender": "male", "age_bucket": "25-34"},
          {"type": "new", "track_id": "1-2", "gender": "female", "age_bucket": "18-24"},
          {"type": "end", "track_id": "1-1", "gender": "male", "age_bucket": "25-34"},
          {"type": "end", "track_id": "1-2", "gender": "female", "age_bucket": "18-24"}]
    assert demo.summary(ev).splitlines() == [
        "summary: 2 tracks; events: end 2, new 2, update 1",
        "  gender: female 1, male 1",
        "  age:    18-24 1, 25-34 1"]


def test_demo_scene_without_research_data_says_how(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_SHARED"}
    r = subprocess.run([sys.executable, "-m", "edge_agent", "demo", "--scene"],
                       capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert r.returncode == 2 and "EDGE_AGENT_SHARED" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_demo_and_bench_without_devtools_fail_clearly(tmp_path: Path) -> None:
    """Outside a checkout (the wheel on a Pi) devtools is absent: exit 2 and say why."""
    for command in ("demo", "bench"):
        r = subprocess.run([sys.executable, "-m", "edge_agent", command], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": ""})
        assert r.returncode == 2, r.stderr
        assert "development package `devtools`" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_wheel_holds_the_daemon_and_yunet_only(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", str(tmp_path), str(REPO)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("edge_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"edge_agent", wheel.name.split("-py3")[0]
                                                + ".dist-info"}
    for bad in ("devtools", "scenario", "scorer", "broker", "conftest", "samples", ".mp4"):
        assert not any(bad in n for n in names), bad
    assert {"edge_agent/manifest.json", "edge_agent/data/face_detection_yunet_2023mar.onnx",
            "edge_agent/data/face_detection_yunet_2023mar.LICENSE.txt"} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA")))
    assert b"License-Expression: MIT" in metadata

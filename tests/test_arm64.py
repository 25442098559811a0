"""The arm64 tier (`make test-arm64`): the agent installed the way a Raspberry Pi owner installs
it, into Debian bookworm arm64 (scripts/arm64-root, run under qemu-user-static), runs a short
clip against the root's own arm64 mosquitto; its events must match the same run on this x86
machine: the same tracks, the same genders, ages within a few years.

Emulation proves the aarch64 wheels and the code paths on aarch64 (OpenCV's aarch64 build with
its NEON/carotene kernels, FFmpeg decode, paho, sqlite), not speed or memory: qemu's
translation makes it ~30x slower than native and its RSS includes the emulator, and there is no
camera (V4L2) or systemd boot in it. docs/performance.md projects the Pi's CPU from instruction
counts instead.

Runs only when EDGE_AGENT_ARM64=1 (the Makefile's test-arm64 target sets it); needs root,
qemu-user-static, binfmt-support, debootstrap, systemd-nspawn, ffmpeg and mosquitto. Caches live
in /var/cache/edge-agent-test (root, wheels, venv); a warm run takes about two minutes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, SAMPLE_CLIP, fetch_models

pytestmark = [
    pytest.mark.timeout(1800),  # a cold cache debootstraps the root under emulation (~5 min)
    pytest.mark.skipif(os.environ.get("EDGE_AGENT_ARM64") != "1",
                       reason="the arm64 tier runs with `make test-arm64` (EDGE_AGENT_ARM64=1)"),
]

CACHE = Path(os.environ.get("TEST_ROOT_CACHE", "/var/cache/edge-agent-test"))
CLIP_SECONDS = 4
VENV = "/opt/edge-agent/venv"
AARCH64 = ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
           "--platform", "manylinux2014_aarch64", "--python-version", "3.11",
           "--only-binary=:all:"]
AGE_TOLERANCE = 3.0  # years; float differences in the arm64 kernels move a chip's age slightly


def _run(cmd: list[str], timeout: float = 900, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _cached(name: str, key: str, build: Any) -> Path:
    final = CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if final.exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    if final.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(final)
    return final


def _pinned_requirements() -> list[str]:
    """The project's dependencies at the versions installed here, so that both runs use the
    same OpenCV, numpy and paho (a Pi owner's pip picks the newest that has an aarch64 wheel)."""
    meta = importlib.metadata.metadata("edge-agent")
    names = [re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0] for r in meta.get_all("Requires-Dist") or []
             if "extra ==" not in r]
    return [f"{n}=={importlib.metadata.version(n)}" for n in names]


@pytest.fixture(scope="module")
def arm64_root() -> Path:
    missing = [t for t in ("systemd-nspawn", "debootstrap", "update-binfmts", "ffmpeg",
                           "mosquitto") if not shutil.which(t)]
    if os.geteuid() != 0 or missing or not Path("/usr/bin/qemu-aarch64-static").exists():
        pytest.fail(f"the arm64 tier needs root and {missing or 'qemu-user-static'} "
                    "(scripts/install-system-deps)")
    r = _run([str(REPO / "scripts" / "arm64-root")], timeout=1500)
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """aarch64 wheels downloaded on this host (pip inside the root cannot reach the registry
    with this host's TLS setup, and a Pi fleet installs from a wheelhouse anyway)."""
    reqs = _pinned_requirements()
    deps = _cached("arm64-wheels", "\n".join(reqs), lambda d: _run(
        [sys.executable, "-m", "pip", "download", "-q", *AARCH64, "--dest", str(d), *reqs]))
    house = tmp_path_factory.mktemp("arm64-wheels")
    for whl in deps.glob("*.whl"):
        shutil.copy(whl, house / whl.name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(house),
          str(REPO)])
    return house


def _nspawn(root: Path, *args: str) -> list[str]:
    return ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit",
            "--private-network", "--volatile=overlay", "-E", "PYTHONDONTWRITEBYTECODE=1", *args]


@pytest.fixture(scope="module")
def arm64_venv(arm64_root: Path, wheelhouse: Path) -> Path:
    """`python3 -m venv` + `pip install --no-index --find-links`, with Debian's arm64 Python."""
    reqs = _pinned_requirements()

    def build(d: Path) -> None:
        _run(_nspawn(arm64_root, f"--bind={d}:{VENV}", f"--bind-ro={wheelhouse}:/wheels",
                     "sh", "-c", f"python3 -m venv {VENV} && {VENV}/bin/pip install -q "
                     "--no-index --find-links /wheels " + " ".join(f"'{r}'" for r in reqs)))

    path = _cached("arm64-venv", arm64_root.name + "\n" + "\n".join(reqs), build)
    _run(_nspawn(arm64_root, f"--bind={path}:{VENV}", f"--bind-ro={wheelhouse}:/wheels",
                 f"{VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps",
                 "--force-reinstall", "--find-links", "/wheels", "edge-agent"))
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "clip.mp4"
    _run(["ffmpeg", "-loglevel", "error", "-i", str(SAMPLE_CLIP), "-t", str(CLIP_SECONDS),
          "-c", "copy", str(out)])
    return out


# Broker, subscriber and agent in one shell: the same script on x86 and inside the arm64 root.
RUN = """set -e
{mosquitto} -c {work}/mosquitto.conf & broker=$!
sleep 0.5
{sub} -h 127.0.0.1 -v -t 'edge-agent/#' > {work}/sub.log & sub=$!
sleep 0.3
start=$(date +%s.%N)
{agent} run -c {work}/agent.yaml
end=$(date +%s.%N)
echo "$start $end" > {work}/wall
sleep 0.5
kill $sub $broker 2>/dev/null || true
"""


def _agent_run(work: Path, models: str, clip: str, ceiling_mb: int, mosquitto: str, sub: str,
               agent: str, wrap: list[str], root_work: str) -> tuple[list[dict[str, Any]], float]:
    """Run RUN with paths as the runner sees them (root_work); the events and the wall time."""
    (work / "mosquitto.conf").write_text("listener 1883 127.0.0.1\nallow_anonymous true\n"
                                         + ("user root\n" if os.geteuid() == 0 else ""))
    (work / "agent.yaml").write_text(yaml.safe_dump({
        "device_id": "arm64-test", "camera": "clip",
        "source": {"uri": clip, "realtime": False},
        "models": {"dir": models},
        "mqtt": {"host": "127.0.0.1", "port": 1883},
        "spool": {"path": f"{root_work}/spool.db"},
        "memory": {"ceiling_mb": ceiling_mb},
    }))
    script = RUN.format(mosquitto=mosquitto, sub=sub, agent=agent, work=root_work)
    _run([*wrap, "sh", "-c", script], timeout=1200)
    events = [json.loads(line.split(" ", 1)[1]) for line in (work / "sub.log").read_text()
              .splitlines() if line.startswith("edge-agent/arm64-test/events ")]
    start, end = map(float, (work / "wall").read_text().split())
    return events, end - start


def _tracks(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each track's final attributes (its last new/update event), in order of appearance."""
    last: dict[str, dict[str, Any]] = {}
    for e in events:
        if e["type"] in ("new", "update"):
            last[e["track_id"]] = e
    return sorted(last.values(), key=lambda e: e["first_frame"])


def test_arm64_events_match_x86(arm64_root: Path, arm64_venv: Path, clip: Path,
                                tmp_path: Path) -> None:
    models = fetch_models()
    x86, arm = tmp_path / "x86", tmp_path / "arm64"
    x86.mkdir()
    arm.mkdir()
    x86_events, x86_wall = _agent_run(
        x86, str(models), str(clip), 200, shutil.which("mosquitto") or "mosquitto",
        "mosquitto_sub", f"{sys.executable} -m edge_agent", [], str(x86))
    t0 = time.monotonic()
    arm_events, arm_wall = _agent_run(
        arm, "/models", "/clip/clip.mp4", 600, "/usr/sbin/mosquitto", "/usr/bin/mosquitto_sub",
        f"{VENV}/bin/edge-agent",
        _nspawn(arm64_root, f"--bind-ro={arm64_venv}:{VENV}", f"--bind-ro={models}:/models",
                f"--bind-ro={clip.parent}:/clip", f"--bind={arm}:/work"), "/work")
    print(f"\nx86: {len(x86_events)} events, agent {x86_wall:.1f} s wall; arm64 under qemu: "
          f"{len(arm_events)} events, agent {arm_wall:.1f} s wall "
          f"({time.monotonic() - t0:.1f} s with the container)")
    machine = _run(["systemd-nspawn", "-q", "-D", str(arm64_root), "--register=no",
                    "--keep-unit", "--volatile=overlay", "uname", "-m"]).stdout.strip()
    assert machine == "aarch64"

    x86_tracks, arm_tracks = _tracks(x86_events), _tracks(arm_events)
    detail = json.dumps({"x86": x86_tracks, "arm64": arm_tracks}, indent=1)
    assert x86_tracks, "the x86 run found no face in the clip"
    assert len(arm_tracks) == len(x86_tracks), detail
    assert sorted(e["type"] for e in arm_events if e["type"] in ("new", "end")) == \
        sorted(e["type"] for e in x86_events if e["type"] in ("new", "end")), detail
    for a, x in zip(arm_tracks, x86_tracks, strict=True):
        print(f"track from frame {x['first_frame']}/{a['first_frame']}: x86 {x['gender']} "
              f"{x['age']}, arm64 {a['gender']} {a['age']}")
        assert a["gender"] == x["gender"], detail
        assert abs(a["first_frame"] - x["first_frame"]) <= 5, detail
        if x["age"] is not None:
            assert a["age"] is not None and abs(a["age"] - x["age"]) <= AGE_TOLERANCE, detail

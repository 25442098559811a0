"""Project the agent's CPU share of one Raspberry Pi 4 core from guest instruction counts.

Emulation cannot time a Pi, but it can count what a Pi would execute. Each measurement runs one
`devtools.bench` mode (decode only, or the agent at its defaults) in a fresh Debian arm64
Python under `qemu-aarch64 -cpu cortex-a72` (the Pi 4's core) with the counting plugin
devtools/qemu_icount.c, on a scene and on its first few frames; the difference divided by the
difference in frames is the cost per frame without start-up. YuNet at 320x320, counted the same
way, turns instructions into Pi 4 seconds with the published Pi 4 timing of that same call.

    python -m devtools.pi_projection --root ARM64_ROOT --venv ARM64_VENV [--shared DIR]

ARM64_ROOT and ARM64_VENV are what the arm64 tier builds (scripts/arm64-root, and the venv that
tests/test_arm64.py caches next to it). Needs Debian's `qemu-user` (its dynamically linked
qemu-aarch64 loads plugins), gcc and ffmpeg.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from devtools import assets, scenario

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SRC = Path(__file__).with_name("qemu_icount.c")
PI4_YUNET_320_S = (0.054, 0.059)  # published: YuNet 320x320, one thread, Raspberry Pi 4
PI4_HZ = 1.5e9  # Pi 4 (BCM2711) at its stock clock
FPS = 15.0
HEAD_FRAMES = 3  # the short run that measures start-up

YUNET_SNIPPET = """
import sys, cv2, numpy as np
cv2.setNumThreads(1)
d = cv2.FaceDetectorYN.create(sys.argv[1], "", (320, 320), 0.7, 0.3, 5000)
img = np.random.default_rng(1).integers(0, 255, (320, 320, 3), dtype=np.uint8)
for _ in range(int(sys.argv[2])):
    d.detect(img)
"""


class Emulator:
    """Runs arm64 Python code under qemu-aarch64 with the counting plugin."""

    def __init__(self, root: Path, venv: Path, work: Path) -> None:
        self.root, self.work = root, work
        qemu = shutil.which("qemu-aarch64")
        if not qemu:
            raise SystemExit("pi_projection: qemu-aarch64 not found (apt-get install qemu-user)")
        self.qemu = qemu
        self.plugin = work / "libicount.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(self.plugin), str(PLUGIN_SRC)],
                       check=True)
        site = next(venv.glob("lib/python3*/site-packages"))
        self.env = {**os.environ, "PYTHONPATH": f"{REPO}:{site}", "PYTHONDONTWRITEBYTECODE": "1",
                    "OPENCV_LOG_LEVEL": "ERROR"}
        self.python = root / "usr" / "bin" / "python3"
        self.runs = 0

    def count(self, *args: str) -> int:
        """Guest instructions of `python3 ARGS` in the arm64 root, every thread included."""
        self.runs += 1
        out = self.work / f"count-{self.runs}.txt"
        subprocess.run([self.qemu, "-cpu", "cortex-a72", "-L", str(self.root), "-plugin",
                        f"{self.plugin},out={out}", str(self.python.resolve()), *args],
                       check=True, env=self.env, stdout=subprocess.DEVNULL)
        fields = dict(line.split() for line in out.read_text().splitlines())
        return int(fields["instructions"])


def quiet_clip(out: Path, frames: int, fps: float = FPS) -> Path:
    """An empty room: the scenes' backdrop with fresh sensor noise on every frame, H.264 like
    render(): what a camera sends when nobody is there (noise keeps decode honest)."""
    bg = scenario.background(640, 480).astype(np.int16)
    rng = np.random.default_rng(3)
    enc = subprocess.Popen(["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt",
                            "bgr24", "-s", "640x480", "-r", str(fps), "-i", "-", "-c:v",
                            "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt",
                            "yuv420p", "-g", str(int(fps * 2)), str(out)], stdin=subprocess.PIPE)
    assert enc.stdin
    for _ in range(frames):
        noisy = bg + rng.integers(-3, 4, bg.shape, dtype=np.int16)
        enc.stdin.write(np.clip(noisy, 0, 255).astype(np.uint8).tobytes())
    enc.stdin.close()
    if enc.wait():
        raise RuntimeError("ffmpeg failed")
    return out


def head(clip: Path, frames: int) -> Path:
    out = clip.with_name(clip.stem + f"-head{frames}.mp4")
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(clip), "-frames:v",
                    str(frames), "-c", "copy", str(out)], check=True)
    return out


def frame_count(clip: Path) -> int:
    import cv2
    cap = cv2.VideoCapture(str(clip))
    n = 0
    while cap.grab():
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--venv", required=True, type=Path)
    ap.add_argument("--shared")
    ap.add_argument("--people", type=int, default=30)
    ap.add_argument("--seed", type=int, default=11, help="the benchmark's scene by default")
    ap.add_argument("--quiet-frames", type=int, default=300,
                    help="length of the empty scene (its frames all cost the same)")
    args = ap.parse_args()
    base = scenario.shared_dir(args.shared)
    models = assets.models_dir()
    with tempfile.TemporaryDirectory(prefix="edge-agent-pi-") as tmp:
        work = Path(tmp)
        emu = Emulator(args.root.resolve(), args.venv.resolve(), work)
        busy = scenario.render(scenario.plan(base / "data" / "faces", people=args.people,
                                             seed=args.seed),
                               base / "data" / "faces", work / "busy.mp4", h264=True)
        n_busy = frame_count(busy)
        quiet = quiet_clip(work / "quiet.mp4", args.quiet_frames)
        scenes = {"busy": (busy, n_busy), "quiet": (quiet, frame_count(quiet))}
        result: dict[str, dict[str, float]] = {}
        for name, (clip, frames) in scenes.items():
            short = head(clip, HEAD_FRAMES)
            for mode in ("decode", "agent"):
                full = emu.count("-m", "devtools.bench", mode, str(clip), str(models), "0")
                start = emu.count("-m", "devtools.bench", mode, str(short), str(models), "0")
                per_frame = (full - start) / (frames - HEAD_FRAMES)
                result.setdefault(name, {})[mode] = per_frame
                print(f"{name:6} {mode:7} {frames} frames: {full / 1e9:.2f} G, start-up "
                      f"{start / 1e9:.2f} G, {per_frame / 1e6:.2f} M instructions per frame",
                      flush=True)
        yunet_file = str(models / "face_detection_yunet_2023mar.onnx")
        few = emu.count("-c", YUNET_SNIPPET, yunet_file, "2")
        many = emu.count("-c", YUNET_SNIPPET, yunet_file, "12")
        yunet = (many - few) / 10
    print(f"YuNet 320x320: {yunet / 1e6:.1f} M instructions per call")
    report: dict[str, object] = {"yunet_320_instructions": yunet, "per_frame": result}
    rates = [yunet / t for t in PI4_YUNET_320_S]  # Pi 4 instructions per second, this code
    print(f"calibration: {min(rates) / 1e9:.2f}-{max(rates) / 1e9:.2f} G instructions/s "
          f"(IPC {min(rates) / PI4_HZ:.2f}-{max(rates) / PI4_HZ:.2f} at 1.5 GHz)")
    for name, modes in result.items():
        for mode, ipf in modes.items():
            share = [100 * FPS * ipf / r for r in (max(rates), min(rates))]
            report[f"{name}_{mode}_pi4_core_percent"] = share
            print(f"{name:6} {mode:7} at {FPS:g} fps: {share[0]:.0f}-{share[1]:.0f} % of one "
                  f"Pi 4 core")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

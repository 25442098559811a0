"""`edge-agent bench`: CPU seconds per frame, frames per second and peak RSS of decode only, the
agent at its defaults, and the naive pipeline (full-size detection and classification of every
face on every frame), each in a fresh process so peak RSS is its own; on the generated scene also
recall, duplicates, attribute accuracy and latency against the ground truth. Without the
research face data (--shared or EDGE_AGENT_SHARED) and without --clip it runs on the sample clip."""

from __future__ import annotations

import compileall
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2

import devtools
import edge_agent
from devtools import assets, scenario
from edge_agent import config, openssl
from edge_agent.capture import Blank, Frame, FrameSource, open_source

# ungated: the agent without its motion gate; uncropped: with it, but never detecting on crops
MODES = ("decode", "agent", "naive", "ungated", "uncropped")


def main(shared: str | None, clip: str | None, people: int, seed: int, modes: list[str],
         every_n: int | None, scene: str = "busy", size: str | None = None,
         b_frames: bool = True, rounds: int = 1) -> int:
    unknown = set(modes) - set(MODES)
    if unknown:
        print(f"edge-agent bench: unknown mode {sorted(unknown)}; choose from {MODES}")
        return 2
    if rounds < 1:
        print(f"edge-agent bench: --rounds: expected an integer >= 1, got {rounds}")
        return 2
    faces = None
    if clip is None and (shared or os.environ.get("EDGE_AGENT_SHARED")):
        try:
            faces = scenario.shared_dir(shared) / "data" / "faces"
        except FileNotFoundError as e:
            print(f"edge-agent bench: {e}", file=sys.stderr)
            return 2
    models_dir = assets.models_dir()
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-") as work:
        if faces is not None and scene == "quiet":
            scn = scenario.quiet_door(faces, people=people, seed=seed)
            clip = str(scenario.render_camera(scn, faces, Path(work) / "quiet.mp4"))
        elif faces is not None and size:
            w, h = (int(v) for v in size.lower().split("x"))
            scn = scenario.scaled(scenario.plan(faces, people=people, seed=seed), w, h)
            clip = str(scenario.render_camera(scn, faces, Path(work) / f"scene{w}x{h}.mp4",
                                              b_frames=b_frames))
        elif faces is not None:
            scn = scenario.plan(faces, people=people, seed=seed)
            # without an encoder: MPEG-4 part 2 and no sensor noise, which decodes cheaper
            render = scenario.render_camera if shutil.which("ffmpeg") else scenario.render
            clip = str(render(scn, faces, Path(work) / "scene.mp4"))
        elif clip is None:
            clip = str(assets.SAMPLE_CLIP)
        print(f"clip: {clip}")
        print(f"{'mode':8} {'frames':>7} {'cpu ms/frame':>13} {'fps':>8} {'peak RSS MB':>12} "
              f"{'peak private MB':>16}")
        _byte_compile()
        runs: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(rounds):
            for mode in modes:
                out = subprocess.run(
                    [sys.executable, "-m", "devtools.bench", mode, clip, str(models_dir),
                     str(every_n or 0)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs[mode].append(r["cpu_ms_per_frame"])
                print(f"{mode:8} {r['frames']:>7} {r['cpu_ms_per_frame']:>13.2f} "
                      f"{r['fps']:>8.1f} {r['peak_rss_mb']:>12.1f} {r['peak_private_mb']:>16.1f}")
                if "detector_runs" in r:
                    print(f"         detector runs {r['detector_runs']}, skipped (nothing moved) "
                          f"{r['detector_skipped']}, on a crop {r['detector_cropped']}")
                if "score" in r:
                    print(f"         {r['score']}")
    cpu = {m: statistics.median(v) for m, v in runs.items()}
    for m in ("agent", "ungated", "uncropped"):
        if m in cpu and "decode" in cpu:
            each = ", ".join(f"{a / d:.2f}" for a, d in zip(runs[m], runs["decode"], strict=True))
            print(f"{m} / decode CPU: {cpu[m] / cpu['decode']:.2f}x"
                  + (f" (median of {rounds} rounds, each round: {each})" if rounds > 1 else ""))
    if "agent" in cpu and "naive" in cpu:
        print(f"naive / agent CPU: {cpu['naive'] / cpu['agent']:.2f}x")
    return 0


def _byte_compile() -> None:
    """Measure the agent as pip installs it, byte-compiled. Run from a checkout with
    PYTHONDONTWRITEBYTECODE set, each process compiles the modules from source, and what the
    compiler leaves behind raised the agent's peak RSS by 0.4 MB."""
    for package in (edge_agent, devtools):
        compileall.compile_dir(package.__path__[0], quiet=2)


def measure(mode: str, clip: str, models_dir: str, every_n: int) -> dict[str, Any]:
    """One mode over every frame of the clip, in this process."""
    openssl.keep_out()  # as `edge-agent run` does without mqtt.tls
    from edge_agent.agent import Pipeline
    from edge_agent.classify import AGE_FILE, GENDER_FILE, FaceClassifier
    from edge_agent.detect import make_detector

    cfg = config.from_dict({"source": {"uri": clip, "realtime": False},
                            "models": {"dir": models_dir}})
    if every_n:
        cfg = dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect,
                                                                  every_n_frames=every_n))
    if mode == "ungated":
        cfg = dataclasses.replace(cfg, detect=dataclasses.replace(
            cfg.detect, motion=dataclasses.replace(cfg.detect.motion, enabled=False)))
    cv2.setNumThreads(cfg.threads)
    events: list[dict[str, Any]] = []
    step: Any = None
    pipe: Any = None
    if mode == "uncropped":
        cfg = dataclasses.replace(cfg, detect=dataclasses.replace(
            cfg.detect, motion=dataclasses.replace(cfg.detect.motion, crop=False)))
    if mode in ("agent", "ungated", "uncropped"):
        pipe = Pipeline(cfg, events.append, "bench")
        step = pipe.step
    elif mode == "naive":
        detector = make_detector(dataclasses.replace(cfg.detect, width=1 << 16), models_dir)
        classifier = FaceClassifier(f"{models_dir}/{GENDER_FILE}", f"{models_dir}/{AGE_FILE}")

        def step(frame: Any) -> None:
            for det in detector.detect(frame.image):
                classifier.predict(frame.image, det)

    source = open_source(cfg.source)
    frames = 0
    private = _private_mb()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    # Decode-only and naive convert every frame; the agent only those it looks at.
    for frame in each_frame(source, lambda: pipe is None or pipe.needs_image):
        frames += 1
        if step is not None:
            step(frame)
        if frames % 10 == 0:
            private = max(private, _private_mb())
    if pipe is not None:
        pipe.finish()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    source.close()
    out: dict[str, Any] = {
        "mode": mode, "frames": frames,
        "cpu_ms_per_frame": 1e3 * cpu / max(frames, 1), "fps": frames / wall if wall else 0.0,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_private_mb": private,
    }
    if pipe is not None:
        out["detector_runs"] = pipe.stats.detections
        out["detector_skipped"] = pipe.stats.detect_skipped
        out["detector_cropped"] = pipe.detect_cropped
    truth = Path(clip + ".json")
    if pipe is not None and truth.exists():
        scn = scenario.Scenario.load(truth)
        out["score"] = scenario.evaluate(scn, [_in_source_pixels(e, scn.width)
                                               for e in events]).summary()
    return out


def each_frame(source: FrameSource,
               image: Callable[[], bool] = lambda: True) -> Iterator[Frame | Blank]:
    """Every frame of a file source, waiting out slow reads, until it has delivered its last;
    `image()` says before each read whether it is to be converted to colour."""
    while True:
        frame = source.read(5.0, image())
        if frame is not None:
            yield frame
        elif source.finished:
            return


def _private_mb() -> float:
    """RssAnon: the process's own memory. RSS also counts the library pages it maps, and those
    depend on the page cache: right after the libraries were written (a fresh install), Linux
    6.18 maps them in large folios and cv2's code alone showed 48 MB instead of 18."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    """VmHWM, this process's own peak: ru_maxrss would carry over the peak of the bench parent
    that forked it (Linux keeps it across exec), which had just rendered the scene."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_source_pixels(event: dict[str, Any], width: int) -> dict[str, Any]:
    """Boxes of frames scaled down at capture (source.max_width), in the clip's pixels."""
    k = width / event["frame_size"][0]
    return event if k == 1 else {**event, "box": [v * k for v in event["box"]]}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))

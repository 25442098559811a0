"""Does optical flow help the tracker between detections, and what does an update cost?

YuNet on every frame is the reference; the tracker gets YuNet's faces only every Nth frame. On
the frames in between, each reference face is compared with the best-overlapping track box:
Kalman prediction only ("kalman"), with optical flow ("flow"), and, for scale, the last
detection simply held ("hold"). Sources: the real clip(s), and a real group photo seen through
a moving 960x540 window shown at 640x360 (a smooth pan, and a hand-held style shake), limited
to its 5 best faces, which also gives the per-update time for 5 faces. The video defaults to the
sample clip; the group photo (--scene) is research data and only used when given.

    python3 -m devtools.track_flow [--video CLIP ...] [--scene JPG] [--seconds S] [--every 5]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from devtools import assets
from edge_agent.capture import Frame
from edge_agent.config import TrackConfig
from edge_agent.detect import Detection
from edge_agent.track import Tracker, iou

FPS = 25.0


def yunet(model: str, score: float, top: int) -> Callable[[np.ndarray], list[Detection]]:
    net = cv2.FaceDetectorYN.create(model, "", (320, 320), score, 0.3, 50)

    def detect(img: np.ndarray) -> list[Detection]:
        net.setInputSize((img.shape[1], img.shape[0]))
        _, faces = net.detect(img)
        rows = sorted(faces if faces is not None else [], key=lambda f: -f[14])[:top]
        return [Detection((float(f[0]), float(f[1]), float(f[2]), float(f[3])), float(f[14]),
                          f[4:14].reshape(5, 2)) for f in rows]

    return detect


def video(path: str, seconds: float) -> Iterator[Frame]:
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or FPS
    i = 0
    while i < seconds * fps:
        ok, img = cap.read()
        if not ok:
            return
        yield Frame(img, i, 1000.0 + i / fps, i / fps)
        i += 1


def moving(scene: str, path: Callable[[float], tuple[float, float]], seconds: float
           ) -> Iterator[Frame]:
    img = cv2.imread(scene)
    if img is None:
        raise FileNotFoundError(scene)
    img = cv2.copyMakeBorder(img, 200, 200, 200, 200, cv2.BORDER_CONSTANT, value=(90, 90, 90))
    for i in range(int(seconds * FPS)):
        dx, dy = path(i / FPS)
        x, y = round(130 + dx), round(100 + dy)
        out = cv2.resize(img[y:y + 540, x:x + 960], (640, 360), interpolation=cv2.INTER_AREA)
        yield Frame(out, i, 1000.0 + i / FPS, i / FPS)


def pan(t: float) -> tuple[float, float]:
    return 100 * np.sin(2 * np.pi * t / 3), 0.0


def shake(t: float) -> tuple[float, float]:
    s = np.sin
    return (25 * s(2 * np.pi * t / 1.1) + 15 * s(2 * np.pi * t / 0.7 + 1),
            20 * s(2 * np.pi * t / 0.9 + 2))


def evaluate(frames: Callable[[], Iterator[Frame]], truth: list[list[Detection]], every: int,
             mode: str) -> dict[str, float]:
    tracker = Tracker(TrackConfig(optical_flow=mode == "flow"))
    held: list[Detection] = []
    ious: list[float] = []
    errs: list[float] = []
    det_ms: list[float] = []
    mid_ms: list[float] = []
    misses = 0
    for f in frames():
        gt = truth[f.index]
        is_det = f.index % every == 0
        t0 = time.perf_counter()
        tracker.update(f, gt if is_det else None)
        (det_ms if is_det else mid_ms).append((time.perf_counter() - t0) * 1e3)
        if is_det:
            held = gt
        if is_det or not gt:
            continue
        boxes = np.array([d.box for d in held] if mode == "hold"
                         else [t.box for t in tracker.tracks]).reshape(-1, 4)
        for d in gt:
            overlap = iou(np.array([d.box]), boxes)[0] if len(boxes) else np.zeros(1)
            k = int(overlap.argmax())
            if overlap[k] < 0.3:
                misses += 1
                continue
            ious.append(float(overlap[k]))
            g, b = np.array(d.box), boxes[k]
            errs.append(float(np.linalg.norm(g[:2] + g[2:] / 2 - b[:2] - b[2:] / 2) / g[3]))
    return {"iou": float(np.mean(ious)), "err": 100 * float(np.mean(errs)),
            "p90": 100 * float(np.percentile(errs, 90)), "misses": misses, "n": len(ious) + misses,
            "det_ms": float(np.mean(det_ms)), "mid_ms": float(np.mean(mid_ms))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", nargs="+", default=[str(assets.SAMPLE_CLIP)])
    ap.add_argument("--scene", help="a group photo seen through a moving window (optional)")
    ap.add_argument("--model", help="YuNet ONNX (default: the per-user model cache)")
    ap.add_argument("--seconds", type=float, default=60.0, help="at most this much of each source")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--score", type=float, default=0.7)
    a = ap.parse_args(argv)
    yunet_file = assets.default_models()[0]
    model = a.model or str(assets.models_dir([yunet_file]) / yunet_file)
    sources: dict[str, tuple[Callable[[], Iterator[Frame]], int]] = {}
    for v in a.video:
        sources[Path(v).name] = (functools.partial(video, v, a.seconds), 50)
    if a.scene:
        sources["scene pan"] = functools.partial(moving, a.scene, pan, min(a.seconds, 10)), 5
        sources["scene shake"] = functools.partial(moving, a.scene, shake, min(a.seconds, 10)), 5
    print(f"detector every {a.every} frames; box error on the frames in between (IoU with YuNet, "
          "centre error in % of face height); update time on detector/other frames")
    for name, (frames, top) in sources.items():
        detect = yunet(model, a.score, top)
        truth = [detect(f.image) for f in frames()]
        print(f"{name}: {len(truth)} frames, {sum(map(len, truth))} faces")
        for mode in ("hold", "kalman", "flow"):
            r = evaluate(frames, truth, a.every, mode)
            timing = "" if mode == "hold" else f"  update {r['det_ms']:.3f}/{r['mid_ms']:.3f} ms"
            print(f"  {mode:6s} IoU {r['iou']:.3f}  centre err {r['err']:4.1f}% "
                  f"(p90 {r['p90']:4.1f}%)  lost {r['misses']:3d}/{r['n']}{timing}")


if __name__ == "__main__":
    main()

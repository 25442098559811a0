"""Does optical flow help the tracker between detections, and what does an update cost?

YuNet on every frame is the reference; the tracker gets YuNet's faces only every Nth frame. On
the frames in between, each reference face is compared with the best-overlapping track box:
Kalman prediction only ("kalman"), with optical flow ("flow"), and, for scale, the last
detection simply held ("hold"). Sources: the real clip(s), and a real group photo seen through
a moving 960x540 window shown at 640x360 (a smooth pan, and a hand-held style shake), limited
to its 5 best faces, which also gives the per-update time for 5 faces.

    python3 devtools/track_flow.py [--video CLIP ...] [--scene JPG] [--model ONNX] [--every 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from edge_agent.capture import Frame
from edge_agent.config import TrackConfig
from edge_agent.detect import Detection
from edge_agent.track import Tracker, _iou

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FPS = 25.0


def yunet(model: str, score: float, top: int) -> Callable[[np.ndarray], list[Detection]]:
    net = cv2.FaceDetectorYN.create(model, "", (320, 320), score, 0.3, 50)

    def detect(img: np.ndarray) -> list[Detection]:
        net.setInputSize((img.shape[1], img.shape[0]))
        _, faces = net.detect(img)
        faces = sorted(faces if faces is not None else [], key=lambda f: -f[14])[:top]
        return [Detection(tuple(map(float, f[:4])), float(f[14]), f[4:14].reshape(5, 2))
                for f in faces]

    return detect


def video(path: str) -> Iterator[Frame]:
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or FPS
    i = 0
    while True:
        ok, img = cap.read()
        if not ok:
            return
        yield Frame(img, i, 1000.0 + i / fps)
        i += 1


def moving(scene: str, path: Callable[[float], tuple[float, float]], n: int = 250):
    img = cv2.imread(scene)
    img = cv2.copyMakeBorder(img, 200, 200, 200, 200, cv2.BORDER_CONSTANT, value=(90, 90, 90))
    for i in range(n):
        dx, dy = path(i / FPS)
        x, y = round(130 + dx), round(100 + dy)
        out = cv2.resize(img[y:y + 540, x:x + 960], (640, 360), interpolation=cv2.INTER_AREA)
        yield Frame(out, i, 1000.0 + i / FPS)


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
    ious, errs, misses, det_ms, mid_ms = [], [], 0, [], []
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
            iou = _iou(np.array([d.box]), boxes)[0] if len(boxes) else np.zeros(1)
            k = int(iou.argmax())
            if iou[k] < 0.3:
                misses += 1
                continue
            ious.append(iou[k])
            g, b = np.array(d.box), boxes[k]
            errs.append(np.linalg.norm(g[:2] + g[2:] / 2 - b[:2] - b[2:] / 2) / g[3])
    return {"iou": float(np.mean(ious)), "err": 100 * float(np.mean(errs)),
            "p90": 100 * float(np.percentile(errs, 90)), "misses": misses, "n": len(ious) + misses,
            "det_ms": float(np.mean(det_ms)), "mid_ms": float(np.mean(mid_ms))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", nargs="+",
                    default=[str(SHARED / "data/faces/video/pexels-8090198-sd_640_338_25fps.mp4")])
    ap.add_argument("--scene", default=str(SHARED / "data/faces/scenes/ulfd_18.jpg"))
    ap.add_argument("--model", default=str(SHARED / "models/face_detection_yunet_2023mar.onnx"))
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--score", type=float, default=0.7)
    a = ap.parse_args()
    sources: dict[str, tuple[Callable[[], Iterator[Frame]], int]] = {
        Path(v).name: ((lambda v=v: video(v)), 50) for v in a.video}
    sources["scene pan"] = (lambda: moving(a.scene, pan)), 5
    sources["scene shake"] = (lambda: moving(a.scene, shake)), 5
    print(f"detector every {a.every} frames; box error on the frames in between (IoU with YuNet, "
          "centre error in % of face height); update time on detector/other frames")
    for name, (frames, top) in sources.items():
        detect = yunet(a.model, a.score, top)
        truth = [detect(f.image) for f in frames()]
        print(f"{name}: {len(truth)} frames, {sum(map(len, truth))} faces")
        for mode in ("hold", "kalman", "flow"):
            r = evaluate(frames, truth, a.every, mode)
            timing = "" if mode == "hold" else f"  update {r['det_ms']:.3f}/{r['mid_ms']:.3f} ms"
            print(f"  {mode:6s} IoU {r['iou']:.3f}  centre err {r['err']:4.1f}% "
                  f"(p90 {r['p90']:4.1f}%)  lost {r['misses']:3d}/{r['n']}{timing}")


if __name__ == "__main__":
    main()

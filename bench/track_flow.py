"""Does optical flow help the tracker between detections, and what does an update cost?

YuNet on every frame is the reference; the tracker sees YuNet only every Nth frame. On the frames
in between, each reference face is compared with the best-overlapping track box, with flow off
and on (and, for scale, with the last detection simply held).

    python3 bench/track_flow.py [--video CLIP ...] [--model ONNX] [--every 5] [--scene JPG]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from edge_agent.capture import Frame
from edge_agent.config import TrackConfig
from edge_agent.detect import Detection
from edge_agent.track import Tracker, _iou

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def yunet(model: str, score: float):
    net = cv2.FaceDetectorYN.create(model, "", (320, 320), score, 0.3, 50)

    def detect(img: np.ndarray) -> list[Detection]:
        net.setInputSize((img.shape[1], img.shape[0]))
        _, faces = net.detect(img)
        return [Detection(tuple(map(float, f[:4])), float(f[14]), f[4:14].reshape(5, 2))
                for f in (faces if faces is not None else [])]

    return detect


def frames(path: str):
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    i = 0
    while True:
        ok, img = cap.read()
        if not ok:
            return
        yield Frame(img, i, 1000.0 + i / fps)
        i += 1


def evaluate(path: str, truth: list[list[Detection]], every: int, mode: str) -> dict[str, float]:
    tracker = Tracker(TrackConfig(optical_flow=mode == "flow"))
    held: list[Detection] = []
    ious, errs, misses, det_ms, mid_ms, ids = [], [], 0, [], [], set()
    for f in frames(path):
        gt = truth[f.index]
        is_det = f.index % every == 0
        t0 = time.perf_counter()
        tracker.update(f, gt if is_det else None)
        (det_ms if is_det else mid_ms).append((time.perf_counter() - t0) * 1e3)
        if is_det:
            held = gt
        if is_det or not gt:
            continue
        boxes = ([d.box for d in held] if mode == "hold"
                 else [t.box for t in tracker.tracks if t.confirmed])
        ids.update(t.id for t in tracker.tracks if t.confirmed)
        for d in gt:
            iou = _iou(np.array([d.box]), np.array(boxes))[0] if boxes else np.zeros(1)
            k = int(iou.argmax())
            if iou[k] < 0.3:
                misses += 1
                continue
            ious.append(iou[k])
            g, b = np.array(d.box), np.array(boxes[k])
            errs.append(np.linalg.norm(g[:2] + g[2:] / 2 - b[:2] - b[2:] / 2) / g[3])
    return {"iou": float(np.mean(ious)), "centre_err_pct": 100 * float(np.mean(errs)),
            "centre_err_p90": 100 * float(np.percentile(errs, 90)), "misses": misses,
            "n": len(ious), "ids": len(ids),
            "det_ms": float(np.mean(det_ms)), "mid_ms": float(np.mean(mid_ms))}


def pan(scene: str, n: int = 150):
    """A 640x360 window panning across a group photo: several faces moving together."""
    img = cv2.imread(scene)
    xs = np.abs(np.linspace(-1, 1, n)) * (img.shape[1] - 640)
    for i, x in enumerate(xs):
        yield Frame(np.ascontiguousarray(img[:360, int(x):int(x) + 640]), i, 1000.0 + i / 25)


def timing(scene: str, model: str, every: int) -> None:
    detect = yunet(model, 0.7)
    fr = list(pan(scene))
    dets = [sorted(detect(f.image), key=lambda d: -d.score)[:5] for f in fr]
    for flow in (False, True):
        tracker = Tracker(TrackConfig(optical_flow=flow))
        det_ms, mid_ms, faces = [], [], []
        for f, d in zip(fr, dets, strict=True):
            is_det = f.index % every == 0
            t0 = time.perf_counter()
            tracker.update(f, d if is_det else None)
            (det_ms if is_det else mid_ms).append((time.perf_counter() - t0) * 1e3)
            faces.append(sum(t.confirmed for t in tracker.tracks))
        print(f"  pan {Path(scene).name}, flow={flow}: {np.mean(faces):.1f} confirmed faces, "
              f"update {np.mean(det_ms):.3f} ms on detector frames, "
              f"{np.mean(mid_ms):.3f} ms between")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", nargs="+",
                    default=[str(SHARED / "data/faces/video/pexels-8090198-sd_640_338_25fps.mp4")])
    ap.add_argument("--model", default=str(SHARED / "models/face_detection_yunet_2023mar.onnx"))
    ap.add_argument("--scene", default=str(SHARED / "data/faces/scenes/ulfd_18.jpg"))
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--score", type=float, default=0.7)
    a = ap.parse_args()
    detect = yunet(a.model, a.score)
    for path in a.video:
        truth = [detect(f.image) for f in frames(path)]
        print(f"{Path(path).name}: {len(truth)} frames, {sum(map(bool, truth))} with a face, "
              f"detector every {a.every}")
        for mode in ("hold", "kalman", "flow"):
            r = evaluate(path, truth, a.every, mode)
            print(f"  {mode:6s} IoU {r['iou']:.3f}  centre err {r['centre_err_pct']:.1f}% of h "
                  f"(p90 {r['centre_err_p90']:.1f}%)  missed {r['misses']}/{r['n'] + r['misses']}"
                  f"  ids {r['ids']}  update {r['det_ms']:.3f}/{r['mid_ms']:.3f} ms")
    timing(a.scene, a.model, a.every)


if __name__ == "__main__":
    main()

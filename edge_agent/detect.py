"""Face detectors behind one small interface."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from edge_agent.config import DetectConfig

# File names as in models/manifest.json (a test keeps the two in step).
DETECTOR_FILES = {
    "yunet": "face_detection_yunet_2023mar.onnx",
    "ultraface": "version-RFB-320.onnx",
}


@dataclass(slots=True)
class Detection:
    box: tuple[float, float, float, float]  # x, y, w, h in full-frame pixels
    score: float
    landmarks: np.ndarray | None  # 5x2 float32 (subject's right eye, left eye, nose, mouth R, L)


Box = tuple[float, float, float, float]  # x, y, w, h
# A region's edges lie on YuNet's coarsest grid (32 net pixels): inside it the net then sees the
# whole frame's pixels on the whole frame's cells (unsnapped, marginal faces came and went).
_YUNET_STRIDE = 32


class Detector(Protocol):
    def detect(self, image: np.ndarray, region: Box | None = None) -> list[Detection]:
        """Faces in a full-size BGR frame, boxes and landmarks in that frame's pixels; with a
        `region`, only faces wholly inside it, where the backend can look at part of a frame
        (else the whole frame)."""


def _downscale(
    image: np.ndarray, k: float, interpolation: int = cv2.INTER_AREA
) -> tuple[np.ndarray, float, float]:
    """The image scaled by `k` <= 1 and the x, y factors back to its own pixels."""
    h, w = image.shape[:2]
    if k >= 1.0:
        return image, 1.0, 1.0
    sw, sh = max(1, round(w * k)), max(1, round(h * k))
    small = cv2.resize(image, (sw, sh), interpolation=interpolation)
    return small, w / sw, h / sh


def _crop(shape: tuple[int, ...], region: Box | None, step: int) -> tuple[int, int, int, int]:
    """`region` inside the frame (x0, y0, x1, y1), its edges on multiples of `step`; None: the
    whole frame."""
    fh, fw = shape[:2]
    if region is None:
        return 0, 0, fw, fh
    x, y, w, h = region

    def down(v: float) -> int:
        return max(0, math.floor(v / step) * step)

    return down(x), down(y), min(fw, math.ceil((x + w) / step) * step), \
        min(fh, math.ceil((y + h) / step) * step)


class YuNetDetector:
    """YuNet 2023mar via cv2.FaceDetectorYN on a `width`-px copy of the frame, with landmarks.

    INTER_AREA by default: at 320 px it finds 51 crowd faces in ulfd_1 before the size filter
    (LINEAR: 50), box IoU and video hit rates are the same, and 640->320 costs the same 0.06 ms.
    From 1080p it costs 1.7 ms against LINEAR's 0.26 ms (x86): pass cv2.INTER_LINEAR for large
    frames on a Pi.
    """

    def __init__(
        self,
        model_path: str,
        width: int = 320,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        min_face_px: int = 20,
        top_k: int = 5000,
        interpolation: int = cv2.INTER_AREA,
    ) -> None:
        self.width = width
        self.interpolation = interpolation
        self.min_face_px = min_face_px
        self._size = (width, width * 3 // 4)
        self._net = cv2.FaceDetectorYN.create(
            model_path, "", self._size, score_threshold, nms_threshold, top_k
        )

    def detect(self, image: np.ndarray, region: Box | None = None) -> list[Detection]:
        """A `region` is looked at with the frame's own scale (`width` px across the whole
        frame): faces are as large to the net as without it, and the net's cost is about its
        share of the frame's area."""
        k = self.width / image.shape[1]
        x0, y0, x1, y1 = _crop(image.shape, region, max(1, round(1 / k)) * _YUNET_STRIDE)
        small, sx, sy = _downscale(image[y0:y1, x0:x1], k, self.interpolation)
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, faces = self._net.detect(small)
        if faces is None:
            return []
        faces[:, :14] *= np.array((sx, sy) * 7, np.float32)
        faces[:, :2] += (x0, y0)
        faces[:, 4:14] += np.array((x0, y0) * 5, np.float32)
        fh, fw = image.shape[:2]
        out = []
        for f in faces:
            if min(f[2], f[3]) < self.min_face_px:
                continue
            if ((x0 > 0 and f[0] <= x0 + 1) or (y0 > 0 and f[1] <= y0 + 1)
                    or (x1 < fw and f[0] + f[2] >= x1 - 1) or (y1 < fh and f[1] + f[3] >= y1 - 1)):
                continue  # cut by the region's edge: the box would be the cut, not the face
            box = (float(f[0]), float(f[1]), float(f[2]), float(f[3]))
            out.append(Detection(box, float(f[14]), f[4:14].reshape(5, 2).copy()))
        return out


class UltraFaceDetector:
    """Ultra-Light RFB-320 (docs/models.md); boxes only, landmarks=None.

    The graph has its priors baked in for a 320x240 input, so there is no width setting:
    every frame is resized (stretched) to 320x240 as in the model's own demo. blobFromImage's
    own linear resize found 46 crowd faces, an INTER_AREA pre-resize only 44.
    """

    INPUT = (320, 240)

    def __init__(
        self,
        model_path: str,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        min_face_px: int = 20,
    ) -> None:
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.min_face_px = min_face_px
        self._net = cv2.dnn.readNet(model_path)
        self._outs = ["scores", "boxes"]

    def detect(self, image: np.ndarray, region: Box | None = None) -> list[Detection]:
        """Always the whole frame: the graph's priors are baked in for 320x240."""
        h, w = image.shape[:2]
        blob = cv2.dnn.blobFromImage(image, 1 / 128, self.INPUT, (127, 127, 127), swapRB=True)
        self._net.setInput(blob)
        scores, boxes = self._net.forward(self._outs)
        scores, boxes = scores[0, :, 1], boxes[0]
        keep = scores > self.score_threshold
        if not keep.any():
            return []
        scores = scores[keep]
        xyxy = boxes[keep] * np.array((w, h, w, h), np.float32)
        xywh = np.concatenate((xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]), axis=1)
        idx = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), self.score_threshold,
                               self.nms_threshold)
        out = []
        for i in np.asarray(idx).reshape(-1):
            x, y, bw, bh = (float(v) for v in xywh[i])
            if min(bw, bh) >= self.min_face_px:
                out.append(Detection((x, y, bw, bh), float(scores[i]), None))
        return out


def make_detector(cfg: DetectConfig, models_dir: str) -> Detector:
    """The configured backend; min_face_px is on the face's shorter box side, in frame pixels."""
    path = os.path.join(models_dir, DETECTOR_FILES[cfg.backend])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detect.backend {cfg.backend!r}: model file missing: {path}")
    if cfg.backend == "ultraface":
        return UltraFaceDetector(path, cfg.score_threshold, cfg.nms_threshold, cfg.min_face_px)
    return YuNetDetector(path, cfg.width, cfg.score_threshold, cfg.nms_threshold, cfg.min_face_px)

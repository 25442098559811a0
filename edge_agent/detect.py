"""Face detectors behind one small interface."""

from __future__ import annotations

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


class Detector(Protocol):
    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a full-size BGR frame, boxes and landmarks in that frame's pixels."""


def _downscale(
    image: np.ndarray, width: int, interpolation: int = cv2.INTER_AREA
) -> tuple[np.ndarray, float, float]:
    """The frame at `width` (never upscaled) and the x, y factors back to full-frame pixels."""
    h, w = image.shape[:2]
    if w <= width:
        return image, 1.0, 1.0
    sh = max(1, round(h * width / w))
    small = cv2.resize(image, (width, sh), interpolation=interpolation)
    return small, w / width, h / sh


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

    def detect(self, image: np.ndarray) -> list[Detection]:
        small, sx, sy = _downscale(image, self.width, self.interpolation)
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, faces = self._net.detect(small)
        if faces is None:
            return []
        faces[:, :14] *= np.array((sx, sy) * 7, np.float32)
        out = []
        for f in faces:
            if min(f[2], f[3]) < self.min_face_px:
                continue
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

    def detect(self, image: np.ndarray) -> list[Detection]:
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

"""Motion gate: while no face is tracked, the detector runs only on frames where something moves.

A quiet shop camera sees nobody most of the day; YuNet on every Nth empty frame was most of
the agent's CPU there. The gate compares a small grey copy of the frame (``width`` px wide)
with a slowly updated background. What must never count as motion:

- sensor noise and compression flicker: the small copy (every 4th pixel at 640 px: INTER_AREA
  would average more but costs 15x as much at 4:1 in OpenCV 5.0) is smoothed by a 3x3 box
  filter, which divides the noise by 3, and a change must exceed ``threshold`` grey levels;
- a global brightness change (auto exposure, a light switched on): the background is scaled
  to the frame's mean brightness before differencing, and a change covering more than
  ``_GLOBAL_FRACTION`` of the picture is taken as lighting, not as someone walking in; the
  background then restarts from the new picture.

The gate is consulted only on frames where the detector is due (every N frames), so the
detector runs on the same frames as without the gate whenever something moves: a face walking
in is detected no later than before. (Consulting it on every quiet frame, to detect on the
first frame that moves, cost 5x the gate's CPU and did not shorten the first `new` on the quiet
scene.) The gate costs one small resize and difference per consulted frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from edge_agent.config import MotionConfig
from edge_agent.detect import Box

_GLOBAL_FRACTION = 0.6  # more of the picture than this changed at once: lighting, not a person
_LEARN = 0.05  # background weight of each consulted frame: ~20 of them, 7 s at 15 fps, N=5
_MIN_REGION_PX = 12  # a moving blob smaller than this (gate pixels) is noise, not a new face
_MARGIN = 1.0  # around a tracked face, in face sizes: where it can be by the next run
_MOVED_MARGIN = 0.05  # around what moved, in frame widths: a head whose edge alone moved
_MAX_SHARE = 0.5  # a region larger than this share of the frame: look at all of it


def focus(faces: list[Box], moved: list[Box] | None, width: int, height: int) -> Box | None:
    """Where the detector needs to look: around each tracked face and around whatever moves
    (someone walking in), as one box; None for the whole frame (what moved is unknown, or the
    box would cover most of it anyway)."""
    if moved is None:
        return None
    pad = _MOVED_MARGIN * width
    grown = [(b, _MARGIN * max(b[2], b[3])) for b in faces] + [(b, pad) for b in moved]
    if not grown:
        return None
    boxes = [(x - m, y - m, x + w + m, y + h + m) for (x, y, w, h), m in grown]
    x0 = max(0.0, min(b[0] for b in boxes))
    y0 = max(0.0, min(b[1] for b in boxes))
    x1 = min(float(width), max(b[2] for b in boxes))
    y1 = min(float(height), max(b[3] for b in boxes))
    if (x1 - x0) * (y1 - y0) > _MAX_SHARE * width * height:
        return None
    return x0, y0, x1 - x0, y1 - y0


class MotionGate:
    """`moving(image)`: did anything move since the background was learnt? Updates it too."""

    def __init__(self, cfg: MotionConfig) -> None:
        self.cfg = cfg
        self._bg: np.ndarray | None = None
        self._small: np.ndarray | None = None
        self._grey: np.ndarray | None = None
        self._smooth: np.ndarray | None = None
        self._diff: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._mask_scale: float | None = None  # frame pixels per mask pixel; None: no mask

    def moving(self, image: np.ndarray) -> bool:
        grey = self._shrink(image)
        self._mask_scale = None
        bg = self._bg
        if bg is None or bg.shape != grey.shape:
            self._bg = grey.astype(np.float32)
            return True  # nothing to compare with yet: look
        mean_bg = cv2.mean(bg)[0]
        gain = cv2.mean(grey)[0] / mean_bg if mean_bg > 1.0 else 1.0
        self._diff = cv2.absdiff(grey, cv2.convertScaleAbs(bg, alpha=gain), dst=self._diff)
        _, self._mask = cv2.threshold(self._diff, self.cfg.threshold, 255, cv2.THRESH_BINARY,
                                      dst=self._mask)
        changed = cv2.countNonZero(self._mask) / grey.size
        if changed > _GLOBAL_FRACTION:
            self._bg = grey.astype(np.float32)
            return False
        cv2.accumulateWeighted(grey, bg, _LEARN)
        self._mask_scale = image.shape[1] / grey.shape[1]
        return changed >= self.cfg.min_area

    def regions(self) -> list[Box] | None:
        """Boxes (frame pixels) of what moved at the last `moving` call; None when that is not
        known (nothing to compare with yet, or the light changed)."""
        if self._mask_scale is None or self._mask is None:
            return None
        n, _, stats, _ = cv2.connectedComponentsWithStats(self._mask, connectivity=8)
        k = self._mask_scale
        return [(x * k, y * k, w * k, h * k) for x, y, w, h, area in stats[1:n].tolist()
                if area >= _MIN_REGION_PX]

    def _shrink(self, image: np.ndarray) -> np.ndarray:
        """A smoothed `width`-px grey copy in reused buffers (resize first: fewer pixels to
        convert)."""
        h, w = image.shape[:2]
        width = min(self.cfg.width, w)
        size = (width, max(1, round(h * width / w)))
        small = image
        if size != (w, h):
            if self._small is not None and self._small.shape[1::-1] != size:
                self._small = self._grey = self._smooth = self._diff = self._mask = None
            small = self._small = cv2.resize(image, size, dst=self._small,
                                             interpolation=cv2.INTER_NEAREST)
        grey = small
        if small.ndim == 3:
            grey = self._grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY, dst=self._grey)
        self._smooth = cv2.blur(grey, (3, 3), dst=self._smooth)
        return self._smooth

"""The motion gate: noise, flicker and lighting never count; a face-sized thing walking in does."""

from __future__ import annotations

import numpy as np
import pytest

from devtools import scenario
from edge_agent import config
from edge_agent.config import ConfigError, MotionConfig
from edge_agent.motion import MotionGate, focus


def _scene(rng: np.random.Generator, noise: float = 3.0, gain: float = 1.0) -> np.ndarray:
    bg = scenario.background(640, 480).astype(np.float32) * gain
    return np.clip(bg + rng.normal(0, noise, bg.shape), 0, 255).astype(np.uint8)


def test_sensor_noise_and_a_lighting_change_are_not_motion() -> None:
    rng = np.random.default_rng(0)
    gate = MotionGate(MotionConfig())
    assert gate.moving(_scene(rng))  # no background yet: look
    assert not any(gate.moving(_scene(rng)) for _ in range(50))
    assert not any(gate.moving(_scene(rng, gain=g)) for g in (1.3, 1.3, 1.3, 0.6, 0.6, 0.6))


def test_a_face_sized_patch_walking_in_is_motion() -> None:
    rng = np.random.default_rng(1)
    gate = MotionGate(MotionConfig())
    for _ in range(10):
        gate.moving(_scene(rng))
    face = np.kron(np.indices((6, 6)).sum(0) % 2, np.ones((10, 10)))[..., None] * 180 + 30
    seen = []
    for x in range(-60, 200, 20):
        img = _scene(rng)
        if x + 60 > 0:
            img[200:260, max(x, 0):x + 60] = face[:, max(-x, 0):].astype(np.uint8)
        seen.append(gate.moving(img))
    assert seen[0] is False  # still off screen
    assert all(seen[2:])


def test_motion_config_is_validated_with_its_key_path() -> None:
    cfg = config.from_dict({"source": {"uri": "x.mp4"}, "detect": {"motion": {"width": 80}}})
    assert cfg.detect.motion.width == 80 and cfg.detect.motion.enabled
    with pytest.raises(ConfigError, match=r"^detect\.motion\.min_area: "):
        config.from_dict({"source": {"uri": "x.mp4"}, "detect": {"motion": {"min_area": 2}}})


def test_regions_box_what_moved_in_frame_pixels() -> None:
    rng = np.random.default_rng(2)
    gate = MotionGate(MotionConfig())
    assert gate.regions() is None  # nothing compared yet
    gate.moving(_scene(rng))
    assert gate.regions() is None  # the first frame only starts the background
    for _ in range(5):
        gate.moving(_scene(rng))
        assert gate.regions() == []
    img = _scene(rng)
    img[200:280, 400:460] = 250
    assert gate.moving(img)
    [(x, y, w, h)] = gate.regions() or [None]
    assert 390 <= x <= 400 and 190 <= y <= 200 and 460 <= x + w <= 470 and 280 <= y + h <= 290
    assert not gate.moving(255 - _scene(rng))  # all of it changed at once
    assert gate.regions() is None  # so what moved is not known


def test_focus_covers_the_faces_and_what_moved_or_gives_the_whole_frame() -> None:
    face = (300.0, 200.0, 40.0, 50.0)
    x, y, w, h = focus([face], [], 640, 480) or (0, 0, 0, 0)
    assert (x, y, x + w, y + h) == (250, 150, 390, 300)  # one face size around it
    walker = (40.0, 100.0, 30.0, 200.0)
    x, y, w, h = focus([face], [walker], 640, 480) or (0, 0, 0, 0)
    assert x < 40 and x + w >= 390 and y <= 100 and y + h >= 300
    assert focus([face], None, 640, 480) is None  # unknown motion: everything
    assert focus([face, (0.0, 0.0, 200.0, 200.0)], [], 640, 480) is None  # most of the frame

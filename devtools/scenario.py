"""Synthetic scenes with exact ground truth: labelled face crops walking through a frame.

The demo, the end-to-end tests and the benchmark all need a clip in which we know who is where
on every frame; no such multi-person clip with a usable licence exists, so we make one from the
labelled UTKFace crops (research use only: the clips are generated locally, never shipped).
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_agent.track import iou


def shared_dir(given: str | None) -> Path:
    """The folder with models/ and data/faces/ (MANIFEST.md's layout)."""
    for cand in (given, os.environ.get("EDGE_AGENT_SHARED"), "../shared", "shared"):
        if cand and (Path(cand) / "models").is_dir():
            return Path(cand).resolve()
    raise SystemExit("edge-agent: cannot find the shared folder; pass --shared DIR")


@dataclass(frozen=True)
class Person:
    file: str
    gender: str
    age: int
    size: int  # sprite side in pixels
    start: int  # first frame the sprite is drawn
    frames: int  # frames from entering on one side to leaving on the other
    x0: float
    y0: float
    x1: float
    y1: float

    def origin(self, frame: int) -> tuple[float, float] | None:
        t = (frame - self.start) / (self.frames - 1)
        if not 0.0 <= t <= 1.0:
            return None
        return self.x0 + (self.x1 - self.x0) * t, self.y0 + (self.y1 - self.y0) * t

    def box(self, frame: int) -> tuple[float, float, float, float] | None:
        """Where the face is on `frame` (the pasted oval's square), or None when off screen."""
        o = self.origin(frame)
        return None if o is None else (o[0], o[1], float(self.size), float(self.size))

    def fully_visible(self, frame: int, width: int, height: int) -> bool:
        b = self.box(frame)
        return b is not None and b[0] >= 0 and b[1] >= 0 and b[0] + b[2] <= width and (
            b[1] + b[3] <= height
        )


@dataclass(frozen=True)
class Scenario:
    width: int
    height: int
    fps: float
    frames: int
    people: list[Person]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(path: Path) -> Scenario:
        d = json.loads(path.read_text())
        people = [Person(**p) for p in d.pop("people")]
        return Scenario(people=people, **d)


def plan(faces_dir: Path, people: int = 6, seed: int = 7, width: int = 640, height: int = 480,
         fps: float = 15.0, cross_every: int = 3) -> Scenario:
    """Adults walk across the frame, two or three at a time; every `cross_every`-th pair walks
    towards each other with their faces overlapping as they pass."""
    rng = random.Random(seed)
    rows = [r for r in csv.DictReader((faces_dir / "labels.csv").open())
            if 18 <= int(r["age"]) <= 75]
    rng.shuffle(rows)
    out: list[Person] = []
    start = 5
    for i in range(people):
        r = rows[i % len(rows)]
        size = rng.randint(110, 160)
        frames = rng.randint(int(4 * fps), int(6 * fps))
        lane = rng.uniform(0.05, 0.55) * height
        left_to_right = rng.random() < 0.5
        if i % 2 == 1 and (i // 2) % cross_every == 0:
            prev = out[-1]
            left_to_right = prev.x1 < prev.x0
            lane = prev.y0 + rng.choice((-0.45, 0.45)) * prev.size
            lane = min(max(lane, 0.0), height - size)
            start = prev.start + (prev.frames - frames) // 2
        xa, xb = -size + 1.0, width - 1.0
        x0, x1 = (xa, xb) if left_to_right else (xb, xa)
        drift = rng.uniform(-0.1, 0.1) * height
        y1 = min(max(lane + drift, 0.0), height - size)
        out.append(Person(r["file"], r["gender"], int(r["age"]), size, max(start, 0), frames,
                          x0, lane, x1, y1))
        start += frames // 2 + rng.randint(0, int(fps))
    total = max(p.start + p.frames for p in out) + int(fps)
    return Scenario(width, height, fps, total, out)


def background(width: int, height: int, seed: int = 1) -> np.ndarray:
    """A face-free room-like backdrop: gradient wall, a few blurred shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = (np.array([90, 110, 125], np.float32) + 60 * y).repeat(width, axis=1)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        color = [int(c) for c in rng.integers(40, 200, 3)]
        cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(30, 200)),
                                      y0 + int(rng.integers(30, 200))), color, -1)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scn: Scenario, faces_dir: Path, out: Path, h264: bool = False) -> Path:
    """Write the clip and its ground truth next to it as `<out>.json`. OpenCV writes MPEG-4
    part 2; with `h264`, ffmpeg re-encodes it as H.264, what cameras stream (and RTSP serves)."""
    bg = background(scn.width, scn.height)
    sprites = {}
    for p in scn.people:
        img = cv2.imread(str(faces_dir / p.file))
        if img is None:
            raise FileNotFoundError(faces_dir / p.file)
        sprites[p.file, p.size] = cv2.resize(img, (p.size, p.size), interpolation=cv2.INTER_AREA)
    raw = out.with_suffix(".mp4v.mp4") if h264 else out
    writer = cv2.VideoWriter(str(raw), cv2.VideoWriter_fourcc(*"mp4v"), scn.fps,
                             (scn.width, scn.height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {out}")
    masks: dict[int, np.ndarray] = {}
    for f in range(scn.frames):
        frame = bg.copy()
        for p in scn.people:
            o = p.origin(f)
            if o is not None:
                _paste(frame, sprites[p.file, p.size], _mask(masks, p.size), int(o[0]), int(o[1]))
        writer.write(frame)
    writer.release()
    if h264:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-c:v", "libx264",
                        "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g",
                        str(int(scn.fps * 2)), str(out)], check=True)
        raw.unlink()
    scn.save(out.with_suffix(out.suffix + ".json"))
    return out


def _mask(cache: dict[int, np.ndarray], size: int) -> np.ndarray:
    """A soft-edged oval so a pasted crop reads as a head, not a square."""
    if size not in cache:
        m = np.zeros((size, size), np.float32)
        cv2.ellipse(m, (size // 2, size // 2), (int(size * 0.46), int(size * 0.5)), 0, 0, 360,
                    1.0, -1)
        cache[size] = cv2.GaussianBlur(m, (0, 0), size * 0.03)[..., None]
    return cache[size]


def _paste(frame: np.ndarray, sprite: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    h, w = frame.shape[:2]
    s = sprite.shape[0]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, w), min(y + s, h)
    if x0 >= x1 or y0 >= y1:
        return
    sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    a = mask[sub]
    roi = frame[y0:y1, x0:x1]
    roi[:] = (sprite[sub] * a + roi * (1.0 - a)).astype(np.uint8)


@dataclass
class Score:
    people: int
    found: int  # people with at least one track
    tracks: int
    duplicates: int  # tracks beyond the first per person
    false_tracks: int  # tracks that match nobody
    gender_correct: int
    gender_known: int
    age_errors: list[float]
    latencies: list[int]  # frames from fully entering to the `new` event
    events_ok: bool  # one new and one end per track, seq without gaps

    @property
    def recall(self) -> float:
        return self.found / self.people if self.people else 1.0

    @property
    def gender_accuracy(self) -> float:
        return self.gender_correct / self.gender_known if self.gender_known else 0.0

    @property
    def age_mae(self) -> float:
        return sum(self.age_errors) / len(self.age_errors) if self.age_errors else float("nan")

    def summary(self) -> str:
        lat = sorted(self.latencies)
        return (f"people {self.people}, found {self.found} (recall {self.recall:.0%}), "
                f"tracks {self.tracks}, duplicates {self.duplicates}, false {self.false_tracks}, "
                f"gender {self.gender_accuracy:.0%} of {self.gender_known}, "
                f"age MAE {self.age_mae:.1f} y, first `new` after full entry: median "
                f"{lat[len(lat) // 2] if lat else 'n/a'} max {lat[-1] if lat else 'n/a'} frames")


def evaluate(scn: Scenario, events: list[dict]) -> Score:
    """Match each track's `new` event to the person whose true box overlaps it most."""
    by_track: dict[str, list[dict]] = {}
    for ev in events:
        by_track.setdefault(ev["track_id"], []).append(ev)
    seqs = sorted(ev["seq"] for ev in events if "seq" in ev)
    events_ok = seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    owners: dict[int, list[list[dict]]] = {}
    false_tracks = 0
    for evs in by_track.values():
        kinds = [e["type"] for e in evs]
        events_ok &= kinds.count("new") == 1 and kinds.count("end") == 1 and kinds[0] == "new" \
            and kinds[-1] == "end"
        new = evs[0]
        best, best_iou = -1, 0.3
        for i, p in enumerate(scn.people):
            b = p.box(new["frame"])
            if b is not None and (v := float(iou(np.array([b]), np.array([new["box"]]))[0, 0])
                                  ) > best_iou:
                best, best_iou = i, v
        if best < 0:
            false_tracks += 1
        else:
            owners.setdefault(best, []).append(evs)
    score = Score(len(scn.people), len(owners), len(by_track),
                  sum(len(v) - 1 for v in owners.values()), false_tracks, 0, 0, [], [], events_ok)
    for i, tracks in owners.items():
        p = scn.people[i]
        evs = min(tracks, key=lambda t: t[0]["frame"])
        last = evs[-1]  # `end` carries the final answer
        if last["gender"] is not None:
            score.gender_known += 1
            score.gender_correct += last["gender"] == p.gender
        if last["age"] is not None:
            score.age_errors.append(abs(last["age"] - p.age))
        entry = next((f for f in range(p.start, p.start + p.frames)
                      if p.fully_visible(f, scn.width, scn.height)), p.start)
        score.latencies.append(evs[0]["frame"] - entry)
    return score


def quiet_door(faces_dir: Path, people: int = 20, minutes: float = 5.0, seed: int = 21,
               width: int = 640, height: int = 480, fps: float = 15.0,
               follow: float = 0.35) -> Scenario:
    """A shop door: long empty stretches (about 80% of the frames at the defaults) and now and
    then someone walking through the same spot, a `follow` share of them right behind another
    person (0.7-1.5 s later, same lane)."""
    rng = random.Random(seed)
    rows = [r for r in csv.DictReader((faces_dir / "labels.csv").open())
            if 18 <= int(r["age"]) <= 75]
    rng.shuffle(rows)
    total = int(minutes * 60 * fps)
    groups: list[int] = []
    left = people
    while left:
        n = 2 if left >= 2 and rng.random() < follow else 1
        groups.append(n)
        left -= n
    slot = total // len(groups)
    out: list[Person] = []
    for g, n in enumerate(groups):
        start = g * slot + rng.randint(int(fps), max(int(fps), slot - int(7 * fps)))
        lane = rng.uniform(0.1, 0.35) * height
        left_to_right = rng.random() < 0.5
        frames = rng.randint(int(3.5 * fps), int(4.5 * fps))
        for k in range(n):
            r = rows[len(out) % len(rows)]
            size = rng.randint(100, 150)
            y0 = min(max(lane + rng.uniform(-0.1, 0.1) * size, 0.0), height - size)
            xa, xb = -size + 1.0, width - 1.0
            x0, x1 = (xa, xb) if left_to_right else (xb, xa)
            s = start + (k * rng.randint(int(0.7 * fps), int(1.5 * fps)))
            out.append(Person(r["file"], r["gender"], int(r["age"]), size, s, frames, x0, y0, x1,
                              y0 + rng.uniform(-0.05, 0.05) * height))
    total = max(total, max(p.start + p.frames for p in out) + int(fps))
    return Scenario(width, height, fps, total, out)


def render_camera(scn: Scenario, faces_dir: Path, out: Path, noise: float = 2.5,
                  seed: int = 3) -> Path:
    """Like `render` (H.264), with fresh sensor noise on every frame (`noise`: standard
    deviation in grey levels), piped raw into ffmpeg so no intermediate codec smooths it away:
    a flat synthetic picture would decode, and hide motion, unrealistically well."""
    bg = background(scn.width, scn.height).astype(np.float32)
    sprites = {}
    for p in scn.people:
        img = cv2.imread(str(faces_dir / p.file))
        if img is None:
            raise FileNotFoundError(faces_dir / p.file)
        sprites[p.file, p.size] = cv2.resize(img, (p.size, p.size), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    enc = subprocess.Popen(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s",
         f"{scn.width}x{scn.height}", "-r", str(scn.fps), "-i", "-", "-c:v", "libx264", "-preset",
         "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g", str(int(scn.fps * 2)), str(out)],
        stdin=subprocess.PIPE)
    assert enc.stdin is not None
    masks: dict[int, np.ndarray] = {}
    for f in range(scn.frames):
        grain = rng.standard_normal((scn.height, scn.width, 1), dtype=np.float32) * noise
        frame = np.clip(bg + grain, 0, 255).astype(np.uint8)
        for p in scn.people:
            o = p.origin(f)
            if o is not None:
                _paste(frame, sprites[p.file, p.size], _mask(masks, p.size), int(o[0]), int(o[1]))
        enc.stdin.write(frame.tobytes())
    enc.stdin.close()
    if enc.wait():
        raise RuntimeError(f"ffmpeg could not write {out}")
    scn.save(out.with_suffix(out.suffix + ".json"))
    return out


def scaled(scn: Scenario, width: int, height: int) -> Scenario:
    """The same people on the same paths in a `width` x `height` picture (faces scale with the
    height), to compare resolutions on one scene."""
    fx, fy = width / scn.width, height / scn.height
    people = [Person(p.file, p.gender, p.age, round(p.size * fy), p.start, p.frames,
                     p.x0 * fx if p.x0 >= 0 else -round(p.size * fy) + 1.0, p.y0 * fy,
                     p.x1 * fx if p.x1 >= 0 else -round(p.size * fy) + 1.0, p.y1 * fy)
              for p in scn.people]
    return Scenario(width, height, scn.fps, scn.frames, people)

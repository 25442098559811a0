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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge_agent.track import iou


def shared_dir(given: str | None) -> Path:
    """The research data folder holding data/faces/ (the labelled UTKFace crops): `given`, else
    $EDGE_AGENT_SHARED; never guessed from the working directory."""
    cand = given or os.environ.get("EDGE_AGENT_SHARED")
    if not cand:
        raise FileNotFoundError(
            "the labelled face data (research use only) is not part of the repository; pass "
            "--shared DIR or set EDGE_AGENT_SHARED to the folder that holds data/faces/")
    path = Path(cand).resolve()
    if not (path / "data" / "faces" / "labels.csv").is_file():
        raise FileNotFoundError(f"{path}: no data/faces/labels.csv (the labelled face crops)")
    return path


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
    lines: list[dict] = field(default_factory=list)  # count.lines entries: name, a, b

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


DOOR_LINES = [{"name": "door", "a": [0.3, 1.0], "b": [0.3, 0.0]},
              {"name": "shelf", "a": [0.8, 1.0], "b": [0.8, 0.55]}]


def plan_followers(faces_dir: Path, episodes: int = 12, seed: int = 11, width: int = 640,
                   height: int = 480, fps: float = 15.0) -> Scenario:
    """People following each other through the same spot, as at a shop door, with two
    counting lines (`door` across the whole height, `shelf` only the lower part). Episodes,
    in turn: the next person enters at the edge where the previous one just left, walking
    back (within a second); the previous one vanishes mid-frame (through a doorway) and the
    next appears at that spot within a second, going on the same way or turning back; two
    walk towards each other with overlapping faces; one follows another a second behind.
    Between episodes the room is empty for a while."""
    rng = random.Random(seed)
    rows = [r for r in csv.DictReader((faces_dir / "labels.csv").open())
            if 18 <= int(r["age"]) <= 75]
    rng.shuffle(rows)
    out: list[Person] = []
    start = 5

    def person(size: int, first: int, frames: int, x0: float, y0: float, x1: float,
               y1: float) -> Person:
        r = rows[len(out) % len(rows)]
        y0, y1 = (min(max(v, 0.0), height - size) for v in (y0, y1))
        p = Person(r["file"], r["gender"], int(r["age"]), size, max(first, 0), frames, x0, y0,
                   x1, y1)
        out.append(p)
        return p

    def speed_frames(dist: float) -> int:  # 100..160 px/s, as people walk past a camera
        return max(int(dist / rng.uniform(100, 160) * fps), 2)

    for e in range(episodes):
        kind = e % 5
        size = rng.randint(90, 140)
        lane = rng.uniform(0.1, 0.5) * height
        ltr = rng.random() < 0.5
        xa, xb = -size + 1.0, width - 1.0
        if kind == 0:  # out by an edge, the next in by that edge within a second, walking back
            x0, x1 = (xa, xb) if ltr else (xb, xa)
            a = person(size, start, speed_frames(width + size), x0, lane, x1, lane)
            b_size = rng.randint(90, 140)
            gap = rng.randint(-int(0.3 * fps), int(fps))
            b = person(b_size, a.start + a.frames + gap, speed_frames(width + b_size),
                       x1, lane + rng.uniform(-0.2, 0.2) * size, x0, lane)
            end = b.start + b.frames
        elif kind in (1, 2):  # vanishes mid-frame; the next appears there, same way or back
            spot = rng.uniform(0.55, 0.7) * width if ltr else rng.uniform(0.3, 0.45) * width
            x0 = xa if ltr else xb
            a = person(size, start, speed_frames(abs(spot - x0)), x0, lane, spot, lane)
            b_size = rng.randint(90, 140)
            far = (xb if ltr else xa) if kind == 1 else x0
            b = person(b_size, a.start + a.frames + rng.randint(2, int(fps)),
                       speed_frames(abs(far - spot)), spot, lane + rng.uniform(-0.1, 0.1) * size,
                       far, lane)
            end = b.start + b.frames
        elif kind == 3:  # two walk towards each other, faces overlapping as they pass
            a = person(size, start, speed_frames(width + size), xa, lane, xb, lane)
            frames = speed_frames(width + size)
            b = person(rng.randint(90, 140), a.start + (a.frames - frames) // 2, frames, xb,
                       lane + rng.choice((-0.45, 0.45)) * size, xa, lane)
            end = max(a.start + a.frames, b.start + b.frames)
        else:  # a close follower, a second behind in the same lane
            x0, x1 = (xa, xb) if ltr else (xb, xa)
            a = person(size, start, speed_frames(width + size), x0, lane, x1, lane)
            b = person(rng.randint(90, 140), a.start + rng.randint(int(0.7 * fps), int(1.2 * fps)),
                       a.frames, x0, lane + rng.uniform(-0.2, 0.2) * size, x1, lane)
            end = b.start + b.frames
        start = end + rng.randint(int(1 * fps), int(4 * fps))  # an empty room for a while
    return Scenario(width, height, fps, start, out, [dict(d) for d in DOOR_LINES])


def line_truth(scn: Scenario) -> dict[str, dict[str, int]]:
    """Crossings of each line by each person's face centre (docs/contract.md's direction rule)."""
    out: dict[str, dict[str, int]] = {}
    for ln in scn.lines:
        ax, ay = ln["a"][0] * scn.width, ln["a"][1] * scn.height
        dx, dy = ln["b"][0] * scn.width - ax, ln["b"][1] * scn.height - ay
        counts = out[ln["name"]] = {"in": 0, "out": 0}
        for p in scn.people:
            h = p.size / 2
            c0, c1 = (p.x0 + h, p.y0 + h), (p.x1 + h, p.y1 + h)
            s0, s1 = (dx * (c[1] - ay) - dy * (c[0] - ax) for c in (c0, c1))
            if s0 * s1 >= 0:
                continue
            k = s0 / (s0 - s1)  # where the path meets the line ...
            px, py = c0[0] + k * (c1[0] - c0[0]), c0[1] + k * (c1[1] - c0[1])
            u = ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)
            if 0 <= u <= 1:  # ... within the segment
                counts["in" if s1 > 0 else "out"] += 1
    return out


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
    blurred: np.ndarray = cv2.GaussianBlur(img, (0, 0), 3)
    blurred += rng.normal(0, 3, blurred.shape).astype(np.float32)
    return np.clip(blurred, 0, 255).astype(np.uint8)


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
    writer = cv2.VideoWriter(str(raw), cv2.VideoWriter.fourcc(*"mp4v"), scn.fps,
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
    mixed: int = 0  # tracks whose events show two different people (carry-over or swap)
    lines: dict[str, dict[str, int]] = field(default_factory=dict)  # `cross` events counted
    lines_truth: dict[str, dict[str, int]] = field(default_factory=dict)
    answers: dict[int, tuple[str | None, float | None]] = field(default_factory=dict)

    @property
    def recall(self) -> float:
        return self.found / self.people if self.people else 1.0

    @property
    def gender_accuracy(self) -> float:
        return self.gender_correct / self.gender_known if self.gender_known else 0.0

    @property
    def line_error(self) -> float:
        """Sum of |counted - true| over lines and directions, over the true total."""
        truth = sum(sum(d.values()) for d in self.lines_truth.values())
        err = sum(abs(self.lines.get(n, {}).get(k, 0) - v)
                  for n, d in self.lines_truth.items() for k, v in d.items())
        return err / truth if truth else 0.0

    @property
    def age_mae(self) -> float:
        return sum(self.age_errors) / len(self.age_errors) if self.age_errors else float("nan")

    def summary(self) -> str:
        lat = sorted(self.latencies)
        return (f"people {self.people}, found {self.found} (recall {self.recall:.0%}), "
                f"tracks {self.tracks}, duplicates {self.duplicates}, false {self.false_tracks}, "
                f"gender {self.gender_accuracy:.0%} of {self.gender_known}, "
                f"age MAE {self.age_mae:.1f} y, first `new` after full entry: median "
                f"{lat[len(lat) // 2] if lat else 'n/a'} max {lat[-1] if lat else 'n/a'} frames"
                + (f", mixed tracks {self.mixed}" if self.mixed else "")
                + (f", lines {self.lines} vs truth {self.lines_truth} (error "
                   f"{self.line_error:.1%})" if self.lines_truth else ""))


def _owner(scn: Scenario, ev: dict, clear: bool = False) -> int:
    """The person whose true box overlaps the event's box most (IoU > 0.3), else -1. With
    `clear`, -1 also where a second person's box overlaps it too (faces passing each other:
    the box cannot tell whose it is)."""
    ious = sorted(((float(iou(np.array([b]), np.array([ev["box"]]))[0, 0]), i)
                   for i, p in enumerate(scn.people) if (b := p.box(ev["frame"])) is not None),
                  reverse=True)
    if not ious or ious[0][0] <= 0.3 or (clear and len(ious) > 1 and ious[1][0] > 0.3):
        return -1
    return ious[0][1]


def evaluate(scn: Scenario, events: list[dict]) -> Score:
    """A track belongs to the person whose true box overlaps its events' boxes most often
    (events where two people's boxes overlap are left out, else its `new`); a track whose
    events clearly show two different people holds two people (`mixed`)."""
    by_track: dict[str, list[dict]] = {}
    for ev in events:
        by_track.setdefault(ev["track_id"], []).append(ev)
    seqs = sorted(ev["seq"] for ev in events if "seq" in ev)
    events_ok = seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    owners: dict[int, list[list[dict]]] = {}
    false_tracks = mixed = 0
    for evs in by_track.values():
        kinds = [e["type"] for e in evs]
        events_ok &= kinds.count("new") == 1 and kinds.count("end") == 1 and kinds[0] == "new" \
            and kinds[-1] == "end"
        clear = [o for e in evs if (o := _owner(scn, e, clear=True)) >= 0]
        best = max(set(clear), key=clear.count) if clear else _owner(scn, evs[0])
        mixed += len(set(clear)) > 1
        if best < 0:
            false_tracks += 1
        else:
            owners.setdefault(best, []).append(evs)
    score = Score(len(scn.people), len(owners), len(by_track),
                  sum(len(v) - 1 for v in owners.values()), false_tracks, 0, 0, [], [], events_ok,
                  mixed, {}, line_truth(scn))
    for ev in events:
        if ev["type"] == "cross":
            d = score.lines.setdefault(ev["line"], {"in": 0, "out": 0})
            d[ev["direction"]] += 1
    for i, tracks in owners.items():
        p = scn.people[i]
        evs = min(tracks, key=lambda t: t[0]["frame"])
        last = evs[-1]  # `end` carries the final answer
        score.answers[i] = (last["gender"], last["age"])
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
                  seed: int = 3, b_frames: bool = True) -> Path:
    """Like `render` (H.264), with fresh sensor noise on every frame (`noise`: standard
    deviation in grey levels), piped raw into ffmpeg so no intermediate codec smooths it away:
    a flat synthetic picture would decode, and hide motion, unrealistically well.

    `b_frames=False` encodes I and P frames only, as IP cameras usually stream: the decoder
    then holds fewer frames (at 4K ~48 MB less, docs/performance.md)."""
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
         "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g", str(int(scn.fps * 2)),
         *([] if b_frames else ["-bf", "0"]), str(out)],
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

"""Counting benchmark: generated door scenes (followers through the same spot, crossings,
counting lines) through the agent's Pipeline, scored against the ground truth: recall, tracks
holding two people, duplicates, line counts, the per-track gender/age answers against the same
models on the stills of the same faces, and the CPU time counting adds per frame.

    python -m devtools.counting [--shared DIR] [--seeds 11 12 13] [--episodes 12]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from devtools import scenario
from devtools.bench import each_frame
from edge_agent import config
from edge_agent.capture import open_source
from edge_agent.classify import AGE_FILE, GENDER_FILE, FaceClassifier, _expected_age


def run_scene(clip: Path, scn: scenario.Scenario, models: Path,
              overrides: dict[str, Any] | None = None, flip_age: bool = True
              ) -> tuple[scenario.Score, float, int]:
    """The Pipeline over every frame; returns the score, counting CPU ms in all, frames."""
    from edge_agent.agent import Pipeline

    raw: dict[str, dict[str, Any]] = {
        "source": {"uri": str(clip), "realtime": False}, "models": {"dir": str(models)},
        "count": {"lines": scn.lines}}
    for k, v in (overrides or {}).items():
        raw.setdefault(k, {}).update(v)
    cfg = config.from_dict(raw)
    cv2.setNumThreads(cfg.threads)
    events: list[dict[str, Any]] = []

    def publish(ev: dict[str, Any]) -> None:
        events.append({**ev, "seq": len(events) + 1})

    pipe = Pipeline(cfg, publish, "bench")
    if pipe.classifier.classifier is not None:
        pipe.classifier.classifier.flip_age = flip_age
    counting_ns = 0
    count_lines, tick = pipe._count_lines, pipe.totals.tick

    def timed_count(frame: Any) -> None:
        nonlocal counting_ns
        t0 = time.process_time_ns()
        count_lines(frame)
        counting_ns += time.process_time_ns() - t0

    def timed_tick() -> None:
        nonlocal counting_ns
        t0 = time.process_time_ns()
        tick()
        counting_ns += time.process_time_ns() - t0

    pipe._count_lines = timed_count  # type: ignore[method-assign]
    pipe.totals.tick = timed_tick  # type: ignore[method-assign]
    source = open_source(cfg.source)
    frames = 0
    for frame in each_frame(source, lambda: pipe.needs_image):
        frames += 1
        pipe.step(frame)
    pipe.finish()
    source.close()
    return scenario.evaluate(scn, events), counting_ns / 1e6, frames


def stills(scn: scenario.Scenario, faces: Path, models: Path, scene_size: bool = False
           ) -> dict[str, tuple[str, float]]:
    """The same models, as they are (one pass each), on each person's original still crop
    (or, with `scene_size`, that crop resized to its size in the scene): file -> (gender,
    age)."""
    from edge_agent.detect import make_detector

    cfg = config.from_dict({"source": {"uri": "x"}, "models": {"dir": str(models)}})
    detector = make_detector(cfg.detect, str(models))
    clf = FaceClassifier(str(models / GENDER_FILE), str(models / AGE_FILE), flip_age=False)
    out = {}
    for p in scn.people:
        img = cv2.imread(str(faces / p.file))
        if img is None:
            raise FileNotFoundError(faces / p.file)
        if scene_size:
            img = cv2.resize(img, (p.size, p.size), interpolation=cv2.INTER_AREA)
        pad = img.shape[0] // 4
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                 value=(110, 120, 130))
        dets = detector.detect(img)
        if not dets:
            continue
        det = max(dets, key=lambda d: d.score)
        p_male, ages = clf.predict(img, det)
        out[p.file] = ("male" if p_male >= 0.5 else "female", _expected_age(ages))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared")
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--samples", type=int, help="classify.samples")
    ap.add_argument("--window", type=int, help="classify.window")
    ap.add_argument("--no-flip", action="store_true", help="age model without flip averaging")
    a = ap.parse_args()
    base = scenario.shared_dir(a.shared)
    faces, models = base / "data" / "faces", base / "models"
    overrides: dict[str, Any] = {"classify": {k: v for k, v in (
        ("samples", a.samples), ("window", a.window)) if v is not None}}
    total: dict[str, float] = dict.fromkeys(
        ("people", "found", "tracks", "dup", "mixed", "false", "line_err", "line_true",
         "count_ms", "frames"), 0)
    track_g, track_a, still_g, still_a, small_g, small_a = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="edge-agent-counting-") as work:
        for seed in a.seeds:
            scn = scenario.plan_followers(faces, episodes=a.episodes, seed=seed)
            clip = scenario.render(scn, faces, Path(work) / f"door{seed}.mp4",
                                   h264=shutil.which("ffmpeg") is not None)
            score, count_ms, frames = run_scene(clip, scn, models, overrides, not a.no_flip)
            print(f"seed {seed}: {frames} frames, {score.summary()}")
            truth = sum(sum(d.values()) for d in score.lines_truth.values())
            for k, v in (("people", score.people), ("found", score.found),
                         ("tracks", score.tracks), ("dup", score.duplicates),
                         ("mixed", score.mixed), ("false", score.false_tracks),
                         ("line_err", score.line_error * truth), ("line_true", truth),
                         ("count_ms", count_ms), ("frames", frames)):
                total[k] += v
            still = stills(scn, faces, models)
            small = stills(scn, faces, models, scene_size=True)
            for i, p in enumerate(scn.people):
                ans = score.answers.get(i)
                if (ans is None or p.file not in still or p.file not in small or ans[0] is None
                        or ans[1] is None):
                    continue
                small_g.append(small[p.file][0] == p.gender)
                small_a.append(abs(small[p.file][1] - p.age))
                track_g.append(ans[0] == p.gender)
                track_a.append(abs(ans[1] - p.age))
                still_g.append(still[p.file][0] == p.gender)
                still_a.append(abs(still[p.file][1] - p.age))
    n = total["people"]
    print(f"\nall: people {n:.0f}, recall {total['found'] / n:.1%}, tracks holding two people "
          f"{total['mixed']:.0f}, duplicates {total['dup'] / n:.1%}, false tracks "
          f"{total['false']:.0f}, line counts off by {total['line_err']:.0f} of "
          f"{total['line_true']:.0f} ({total['line_err'] / max(total['line_true'], 1):.1%})")
    print(f"counting: {total['count_ms'] / total['frames'] * 1e3:.1f} us CPU per frame")
    m = len(track_g)
    print(f"demographics on the same {m} people: per-track gender {np.mean(track_g):.1%}, "
          f"age MAE {np.mean(track_a):.2f}; stills gender {np.mean(still_g):.1%}, age MAE "
          f"{np.mean(still_a):.2f}; gap {100 * (np.mean(still_g) - np.mean(track_g)):+.1f} "
          f"points, {np.mean(track_a) - np.mean(still_a):+.2f} years; stills at their size in "
          f"the scene: gender {np.mean(small_g):.1%}, age MAE {np.mean(small_a):.2f}")


if __name__ == "__main__":
    main()

"""What the demo, the benchmarks and the tests need beside the code: the sample clip in the
repository, the model files in the per-user cache, and (optionally) the research-only face data."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from edge_agent import config, models

REPO = Path(__file__).resolve().parent.parent
# Pexels video 8090198 (Pexels licence), 640x338 at 25 fps, 45.8 s: see samples/README.md.
SAMPLE_CLIP = REPO / "samples" / "pexels-8090198-sd_640_338_25fps.mp4"


def default_models() -> list[str]:
    """The files the default configuration needs: YuNet, gender and age."""
    return models.required_models(config.DetectConfig().backend, True)


def models_dir(names: list[str] | None = None, mirror: str | None = None,
               say: Callable[[str], None] | None = print) -> Path:
    """The per-user model cache with `names` (the default set if None) in it, fetched and
    checked against the manifest's sha256 where missing or corrupt; `say` hears each download."""
    cache = models.cache_dir()
    models.fetch(cache, default_models() if names is None else names, mirror, say=say)
    return cache


def busy_clip(out: Path, cycles: int = 10) -> Path:
    """A clip cut from the sample clip in which a face comes and goes every 2 s (20 frames with
    the face, 30 with the back of the head), `cycles` times: one `new` and one `end` per cycle,
    many events per second at full speed, for delivery tests. H.264, made with ffmpeg."""
    one = out.with_suffix(".one.mp4")
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(SAMPLE_CLIP), "-an", "-vf",
         r"select='lt(n\,20)+between(n\,400\,429)',setpts=N/25/TB", "-c:v", "libx264",
         "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g", "40", str(one)],
        check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-stream_loop", str(cycles - 1), "-i",
                    str(one), "-c", "copy", str(out)], check=True)
    one.unlink()
    return out

"""What the demo, the benchmarks and the tests need beside the code: the sample clip in the
repository, the model files in the per-user cache, and (optionally) the research-only face data."""

from __future__ import annotations

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

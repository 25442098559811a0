"""edge_agent/openssl.py: OpenSSL kept out of the process, run in a fresh interpreter each."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_kept_out_ssl_is_missing_and_sha256_still_right() -> None:
    out = _python(
        "from edge_agent import openssl\n"
        "print(openssl.keep_out(), openssl.kept_out())\n"
        "import hashlib\n"
        "print(hashlib.sha256(b'abc').hexdigest())\n"
        "try:\n"
        "    import ssl\n"
        "except ImportError:\n"
        "    print('no ssl')\n"
        "import urllib.request, paho.mqtt.client\n"
        "print(paho.mqtt.client.ssl)\n"
        "print(openssl.keep_out())\n")
    assert out.splitlines() == [
        "True True",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "no ssl", "None", "False"]


def test_too_late_when_openssl_is_loaded_already() -> None:
    out = _python("import hashlib\nfrom edge_agent import openssl\n"
                  "print(openssl.keep_out(), openssl.kept_out())\nimport ssl\nprint('ssl')")
    assert out.splitlines() == ["False False", "ssl"]


def test_the_agent_modules_do_not_load_openssl_before_run_decides() -> None:
    """`edge-agent run` decides after reading the configuration; what it imported by then must
    not have loaded OpenSSL, or the decision comes too late."""
    out = _python("import sys\nfrom edge_agent import cli, config, models\n"
                  "print(sorted({'_ssl', '_hashlib', 'ssl', 'hashlib'} & set(sys.modules)))")
    assert out == "[]"

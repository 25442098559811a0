"""OpenSSL in the process only when MQTT uses TLS.

paho imports `ssl` and `hashlib`, and `urllib.request` imports `ssl`, whether or not anything
uses them. Loading libssl and libcrypto costs 4.5 MB of RSS, about 5 % of what the agent needs
at 640x480 (docs/performance.md). Without `mqtt.tls`, `edge-agent run` marks OpenSSL's two
modules absent before anything imports them: `ssl` is then missing (paho and urllib run without
TLS) and `hashlib` falls back to Python's own SHA-256 for the models' checksums (61 ms instead
of 14 ms for the 10.8 MB age model on the development machine, once per start).
"""

from __future__ import annotations

import importlib.util
import sys

_MODULES = ("_ssl", "_hashlib")
_OWN_SHA256 = ("_sha2", "_sha256")  # Python 3.12 on, and 3.11


def keep_out() -> bool:
    """Mark OpenSSL's modules absent. False, and nothing done, if something has imported them
    already or this Python has no SHA-256 of its own to fall back on."""
    if any(name in sys.modules for name in (*_MODULES, "ssl", "hashlib")):
        return False
    if not any(importlib.util.find_spec(name) for name in _OWN_SHA256):
        return False
    for name in _MODULES:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "absent"
    return True


def kept_out() -> bool:
    """True if this process runs without OpenSSL (TLS cannot be turned on until a restart)."""
    return all(name in sys.modules and sys.modules[name] is None for name in _MODULES)

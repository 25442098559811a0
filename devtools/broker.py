"""A real mosquitto on a loopback port, and port helpers: fixtures for the demo, the tests and
the benchmarks."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class BrokerMissing(RuntimeError):
    """Debian's mosquitto is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def start_mosquitto(work: Path, port: int, extra_conf: str = "") -> subprocess.Popen[bytes]:
    """Debian's mosquitto on a loopback port, for the demo and the tests."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        raise BrokerMissing("mosquitto is not installed (make system-deps)")
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    f"log_dest file {work / 'mosquitto.log'}\n"
                    + ("user root\n" if os.geteuid() == 0 else "") + extra_conf)
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc

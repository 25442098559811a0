"""Living under systemd: readiness, watchdog and status notifications, and journal logging.

systemd-python is used where it is installed; otherwise a few lines of the same datagram
protocols (sd_notify(3) on $NOTIFY_SOCKET, the journal's native protocol on its socket) stand
in, so a plain venv still reports READY, feeds the watchdog and logs structured fields.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

try:
    from systemd import daemon as sd_daemon
    from systemd import journal as sd_journal
except ImportError:  # the fallbacks below speak the same protocols
    sd_daemon = sd_journal = None

log = logging.getLogger(__name__)

JOURNAL_SOCKET = "/run/systemd/journal/socket"
STATUS_INTERVAL_S = 5.0  # STATUS= at most this often: systemctl status is read by people
_MAX_MESSAGE = 32 * 1024  # a journal datagram must fit the socket's buffer
_PLAIN = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
# WARNING and above from these loggers say what failed, for `journalctl ERROR_KIND=source`.
_KIND_BY_LOGGER = {"edge_agent.capture": "source", "edge_agent.mqtt": "mqtt",
                   "edge_agent.spool": "spool", "edge_agent.models": "model"}


class Notifier:
    """sd_notify(3): a no-op without $NOTIFY_SOCKET; never raises, never blocks."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        addr = env.get("NOTIFY_SOCKET", "")
        self.enabled = addr.startswith(("/", "@"))
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self._warned = False

    def send(self, *lines: str) -> bool:
        if not self.enabled:
            return False
        message = "\n".join(lines)
        try:
            if sd_daemon is not None:
                return bool(sd_daemon.notify(message))
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), socket.MSG_DONTWAIT, self._addr)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd on %s: %s", self._addr.lstrip("\0"), e)
            return False


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when systemd runs no
    watchdog for this very process."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Service:
    """What the agent tells systemd: READY once set up, WATCHDOG=1 from the frame loop while it
    turns and its source is not hung, a STATUS= summary now and then, STOPPING=1 at the end."""

    def __init__(self, env: Mapping[str, str] = os.environ,
                 status_interval: float = STATUS_INTERVAL_S) -> None:
        self.notifier = Notifier(env)
        self.watchdog_s = watchdog_interval(env)
        self.status_interval = status_interval
        self._next_ping = 0.0
        self._next_status = 0.0

    def ready(self, status: str) -> None:
        self._next_status = time.monotonic() + self.status_interval
        self.notifier.send("READY=1", f"STATUS={status}")

    def beat(self, now: float, healthy: bool, status: Callable[[], str]) -> None:
        """Called once per loop turn; `status` is only built when it is due."""
        if not self.notifier.enabled:
            return
        if self.watchdog_s and healthy and now >= self._next_ping:
            self._next_ping = now + self.watchdog_s
            self.notifier.send("WATCHDOG=1")
        if now >= self._next_status:
            self._next_status = now + self.status_interval
            self.notifier.send(f"STATUS={status()}")

    def reloading(self) -> None:
        self.notifier.send("RELOADING=1", "STATUS=reloading the configuration")

    def stopping(self, status: str) -> None:
        self.notifier.send("STOPPING=1", f"STATUS={status}")


def status_line(state: Mapping[str, Any]) -> str:
    """One line for `systemctl status` from the `T/state` snapshot."""
    source = state["source"]
    if source != "open" and state.get("source_error"):
        source += f" ({state['source_error']})"
    fps = f"{state['fps']:.1f} fps"
    if state.get("pace") == "behind":
        fps += f" of {state['source_fps']:.0f} (behind)" if state.get("source_fps") else " (behind)"
    return (f"{fps}, {state['tracks']} faces, rss {state['rss_mb']:.0f} MB, "
            f"source {source}, broker {state['broker']}, spool {state['spool_depth']}")


def under_systemd(env: Mapping[str, str] = os.environ) -> bool:
    """True when our stderr is the journal stream systemd gave us, or when systemd started us
    without one (INVOCATION_ID); a $JOURNAL_STREAM that is not our stderr was inherited by a
    process whose output went elsewhere (a shell in a terminal, a test capturing stderr)."""
    stream = env.get("JOURNAL_STREAM")
    if stream:
        try:
            st = os.fstat(sys.stderr.fileno())
        except (OSError, ValueError):
            return False
        return stream == f"{st.st_dev}:{st.st_ino}"
    return bool(env.get("INVOCATION_ID"))


def _priority(levelno: int) -> int:
    """syslog priorities: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def journal_datagram(fields: Mapping[str, str]) -> bytes:
    """The journal's native protocol: KEY=value lines; values with a newline are sent as KEY,
    newline, 64-bit little-endian length, bytes, newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """One journal entry per record: MESSAGE, PRIORITY, CODE_*, LOGGER, the handler's fields
    (DEVICE, CAMERA) and the record's own UPPERCASE `extra=` names (TRACK, ERROR_KIND, ...)."""

    def __init__(self, fields: Mapping[str, str], path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.fields = dict(fields)
        self._path = path
        self._sock: socket.socket | None = None
        self._use_lib = sd_journal is not None and path == JOURNAL_SOCKET

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.entry(record))
        except OSError:  # journald restarting or backed up: the stream still reaches it
            sys.stderr.write(_PLAIN.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def entry(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + (self.formatter or _PLAIN).formatException(record.exc_info)
        fields = {
            **self.fields,
            "MESSAGE": message[:_MAX_MESSAGE],
            "PRIORITY": str(_priority(record.levelno)),
            "LOGGER": record.name,
            "THREAD_NAME": record.threadName or "",
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
        }
        kind = _KIND_BY_LOGGER.get(record.name)
        if kind and record.levelno >= logging.WARNING:
            fields["ERROR_KIND"] = kind
        for key, value in record.__dict__.items():
            if _FIELD.fullmatch(key) and value is not None:
                fields[key] = str(value)
        return fields

    def _send(self, fields: dict[str, str]) -> None:
        if self._use_lib:
            assert sd_journal is not None
            sd_journal.send(**{**fields, "CODE_LINE": int(fields["CODE_LINE"])})
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(journal_datagram(fields), socket.MSG_DONTWAIT, self._path)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


def setup_logging(level: str, fields: Mapping[str, str],
                  env: Mapping[str, str] = os.environ) -> logging.Handler:
    """Journal (with `fields` on every entry) under systemd, plain lines on stderr otherwise."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if under_systemd(env) and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler({"SYSLOG_IDENTIFIER": "edge-agent", **fields})
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PLAIN)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def update_logging(level: str, fields: Mapping[str, str]) -> None:
    """On reload: the new level, and new DEVICE/CAMERA on journal entries; handlers stay."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in root.handlers:
        if isinstance(handler, JournalHandler):
            handler.fields.update(fields)

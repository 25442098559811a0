"""MQTT delivery: the spool drained to the broker in order, at least once, never blocking.

Topics under ``T = base_topic``: ``T/events`` (QoS 1), ``T/status`` (retained ``online`` /
``offline``, the latter also the Last Will) and ``T/state`` (retained health snapshot), plus
Home Assistant discovery (edge_agent/discovery.py). docs/mqtt.md describes them all.

Security: TLS with a CA file (or the system's CAs), optional client certificate and key, the
broker's host name checked unless ``mqtt.tls_insecure``; the password comes from a private file,
a systemd credential or the environment, never from the YAML. The agent only connects out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import discovery, redact
from edge_agent.config import ConfigError, MqttConfig
from edge_agent.spool import Spool

try:
    import ssl
except ImportError:  # left out of the process when mqtt.tls is off: edge_agent/openssl.py
    ssl = None  # type: ignore[assignment]


class _NoTLS:
    """paho runs without `ssl` in name, but its socket reads and writes still catch these two
    (paho 2.2): plain sockets never raise them."""

    class SSLWantReadError(Exception):
        pass

    class SSLWantWriteError(Exception):
        pass


if mqtt.ssl is None:
    mqtt.ssl = _NoTLS

log = logging.getLogger(__name__)

PASSWORD_ENV = "EDGE_AGENT_MQTT_PASSWORD"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
_RESERVE = 8  # paho queue slots that events may not take: status and state must still fit
_AUTH_REFUSALS = {134, 135}  # bad user name or password, not authorized
CONNACK_TIMEOUT_S = 10.0  # a broker that accepts TCP but never answers CONNECT: give up then
MAX_INCOMING_BYTES = 16 * 1024  # MQTT 5 Maximum Packet Size: all we subscribe to is tiny
MAX_HA_STATUS_BYTES = 16  # `online` / `offline`


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _private(path: str, key: str) -> None:
    """A secret that every local user can read is no secret: refuse it rather than use it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    if mode & stat.S_IROTH:
        raise ConfigError(f"{key}: {path} is readable by every user (mode "
                          f"{stat.S_IMODE(mode):04o}); run chmod 600 (or 640 for the agent's "
                          f"group) on it")


def _read_secret(path: Path | str, key: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {getattr(e, 'strerror', None) or e}"
                          ) from None


def password(cfg: MqttConfig) -> tuple[str | None, str]:
    """The broker password and where it came from: ``mqtt.password_file``, else the systemd
    credential ``$CREDENTIALS_DIRECTORY/{mqtt.password_credential}``, else the environment
    variable. Never the YAML, which is often world-readable or kept in version control.
    Whatever is found is remembered by edge_agent.redact, so no output shows it."""
    secret, source = _password(cfg)
    redact.remember(secret)
    return secret, source


def _password(cfg: MqttConfig) -> tuple[str | None, str]:
    if cfg.password_file:
        _private(cfg.password_file, "mqtt.password_file")
        return _read_secret(cfg.password_file, "mqtt.password_file"), "mqtt.password_file"
    creds = os.environ.get(CREDENTIALS_ENV)
    if creds and (Path(creds) / cfg.password_credential).is_file():
        return (_read_secret(Path(creds) / cfg.password_credential, "mqtt.password_credential"),
                f"systemd credential {cfg.password_credential}")
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV], PASSWORD_ENV
    return None, "nowhere"


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    """Verify the broker against ``mqtt.ca_file`` (or the system's CAs) and its host name
    unless ``mqtt.tls_insecure``; present a client certificate for mutual TLS if configured."""
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"mqtt.{key}: cannot read {path}")
    if cfg.key_file:
        _private(cfg.key_file, "mqtt.key_file")
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"mqtt.ca_file: not a usable CA certificate: {e}") from None
    if cfg.cert_file:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file, password="")
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"mqtt.cert_file: cannot use {cfg.cert_file} with mqtt.key_file "
                              f"{cfg.key_file} (PEM, key not encrypted): {e}") from None
    ctx.check_hostname = not cfg.tls_insecure
    return ctx


class Publisher:
    """Sends spooled events to ``T/events`` and keeps ``T/status`` and ``T/state`` current.

    paho's network thread does all I/O. A sender thread owns the window of in-flight events
    (mid -> seq): paho runs ``on_publish`` under its own message lock, which ``publish()`` also
    takes, so callbacks only queue and wake, and nothing waits on a lock across a paho call.
    Each (re)connect restarts from the oldest unacknowledged event: order is kept, and what
    was in flight is sent again (paho also resends its own copies: duplicates, never gaps).
    Home Assistant discovery is sent by the sender thread too, whenever a callback asks.
    """

    def __init__(self, cfg: MqttConfig, base_topic: str, spool: Spool,
                 device_id: str | None = None, start: bool = True) -> None:
        self._cfg = cfg
        self._spool = spool
        self._t_events = f"{base_topic}/events"
        self._t_status = f"{base_topic}/status"
        self._t_state = f"{base_topic}/state"
        self._t_counts = f"{base_topic}/counts"
        self._counts: str | None = None  # the latest T/counts, sent again on every connect
        self._t_ha_status = f"{cfg.discovery_prefix}/status"
        device_id = device_id or base_topic.rsplit("/", 1)[-1]
        self._t_base, self._device_id = base_topic, device_id
        self._discovery = (discovery.messages(cfg.discovery_prefix, base_topic, device_id)
                           if cfg.discovery else [])
        self._discovery_asked = 0  # bumped by callbacks
        self._discovery_sent = 0  # sender thread only
        self._failures = 0  # connection attempts failed in a row
        self._window = cfg.max_inflight
        self._queue_max = 2 * self._window + _RESERVE
        self._inflight: dict[int, int] = {}  # sender thread only
        self._cursor = 0  # highest seq sent in the current session
        self._generation = spool.generation  # the spool's keys moved when this changes
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._count_lock = threading.Lock()
        self._outstanding = 0  # messages paho holds until acknowledged, all topics
        self._session = 0
        self._connected = False
        self._stopping = False
        self._reconnects = 0
        self._warned_rejects = False
        self._ignored = 0  # messages received and ignored (oversized, not `online`/`offline`)
        self._socket_opened = 0.0  # monotonic time of the last TCP connect without CONNACK yet
        self._net: threading.Thread | None = None
        self._started = False

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or base_topic.replace("/", "-"),
            protocol=mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311,
        )
        c.max_inflight_messages_set(self._window)
        c.max_queued_messages_set(self._queue_max)
        # paho takes float seconds; its annotation says int
        c.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        c.will_set(self._t_status, "offline", qos=1, retain=True)
        if cfg.tls:
            c.tls_set_context(tls_context(cfg))
            c.tls_insecure_set(cfg.tls_insecure)
            if cfg.tls_insecure:
                log.warning("mqtt.tls_insecure: the broker's host name is not checked")
        secret, source = password(cfg)
        if cfg.username:
            c.username_pw_set(cfg.username, secret)
            log.info("mqtt user %s, password from %s", cfg.username, source)
        elif secret is not None:
            log.warning("mqtt: a password is set (%s) but no mqtt.username; connecting "
                        "without both", source)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        self._client = c
        self._sender = threading.Thread(target=self._run, name="mqtt-sender", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Connect and send. Built first, started second: a reload checks the new publisher
        fully while the old one still runs."""
        if self._started:
            return
        self._started = True
        props = None
        if self._cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.MaximumPacketSize = MAX_INCOMING_BYTES  # the broker drops larger ones for us
        self._sender.start()
        self._client.connect_async(self._cfg.host, self._cfg.port,
                                   keepalive=self._cfg.keepalive_s, properties=props)
        self._client.loop_start()
        self._net = self._client._thread  # paho keeps no other handle on its network thread

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def reconnects(self) -> int:
        """Successful connects after the first one."""
        return self._reconnects

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def ignored(self) -> int:
        """Messages from the broker that were ignored: oversized, binary, unexpected."""
        return self._ignored

    def network_alive(self) -> bool:
        """False once paho's network thread has died without a stop (it then never reconnects:
        an exception inside paho ends it silently)."""
        return (not self._started or self._stopping
                or (self._net is not None and self._net.is_alive()))

    def publish_event(self, event: dict[str, Any]) -> int:
        """Spool `event` and wake the sender; returns its ``seq``. Disk only, no network wait."""
        seq = self._spool.append(event)
        self._wake.set()
        return seq

    def publish_state(self, state: dict[str, Any]) -> None:
        """Retained snapshot; dropped while offline since a newer one will follow."""
        if self._connected and self._outstanding < self._queue_max - _RESERVE // 2:
            self._send(self._t_state, redact.redact(_compact(state)), retain=True)

    def set_discovery_lines(self, lines: list[str]) -> None:
        """Announce sensors for these counting lines too (sent again now)."""
        msgs = discovery.messages(self._cfg.discovery_prefix, self._t_base, self._device_id,
                                  lines)
        if self._cfg.discovery and msgs != self._discovery:
            self._discovery = msgs
            self._discovery_asked += 1
            self._wake.set()

    def publish_counts(self, payload: str) -> None:
        """Retained ``T/counts``; the latest is also sent at every (re)connect."""
        self._counts = payload
        if self._connected:
            self._send(self._t_counts, payload, retain=True)

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s until the broker has acknowledged every spooled event."""
        deadline = time.monotonic() + timeout
        while self._spool.depth() > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.02, left))
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Announce ``offline``, disconnect cleanly; unacknowledged events stay spooled. Takes
        at most about `timeout` seconds in all, whatever the network does."""
        if self._stopping:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout
        self._wake.set()
        if self._started:
            self._sender.join(timeout / 2)
        if self._connected:
            info = self._send(self._t_status, "offline", retain=True)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                with contextlib.suppress(RuntimeError):  # paho gave up: the connection is gone
                    info.wait_for_publish(max(0.05, deadline - time.monotonic()))
        self._client.disconnect()
        closer = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        closer.start()  # loop_stop joins paho's thread, which may sit in a TCP connect
        closer.join(max(0.05, deadline - time.monotonic()))
        if not self._sender.is_alive():
            self._apply_acks()

    def _send(self, topic: str, payload: str, retain: bool = False) -> mqtt.MQTTMessageInfo:
        with self._count_lock:
            self._outstanding += 1
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            with self._count_lock:
                self._outstanding -= 1
        return info

    def _run(self) -> None:
        session = 0
        while not self._stopping:
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._check_connack()
                session = self._pump(session)
            except Exception:
                log.exception("mqtt sender failed; retrying in 1 s")
                time.sleep(1.0)

    def _pump(self, session: int) -> int:
        """Apply acks, then fill the window from the spool, oldest first."""
        self._apply_acks()
        current = self._session
        if current != session or self._generation != self._spool.generation:
            # a new session, or the spool went from memory back to disk: start from the oldest
            self._generation = self._spool.generation
            self._inflight.clear()
            self._cursor = 0
        if current != session:
            back = self._spool.requeue_refused()
            if back:
                log.info("mqtt: retrying %d events the broker refused before", back)
        if not self._connected or self._stopping or not self._send_discovery():
            return current
        room = min(self._window - len(self._inflight),
                   self._queue_max - _RESERVE - self._outstanding)
        if room <= 0:
            return current
        for seq, payload in self._spool.pending(self._cursor, room):
            info = self._send(self._t_events, payload)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            self._inflight[info.mid] = seq
            self._cursor = seq
        return current

    def _send_discovery(self) -> bool:
        """Send the discovery configs if asked since the last time; False while they wait for
        room in paho's queue (events then wait too, so that room comes)."""
        asked = self._discovery_asked
        if asked == self._discovery_sent or not self._discovery:
            return True
        if self._queue_max - self._outstanding < len(self._discovery) + _RESERVE // 2:
            return False
        for topic, payload in self._discovery:
            if self._send(topic, payload, retain=True).rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return False
        self._discovery_sent = asked
        return True

    def _apply_acks(self) -> None:
        done: list[int] = []
        refused: list[int] = []
        while len(done) + len(refused) < 10 * self._window:
            try:
                mid, failed = self._acks.get_nowait()
            except queue.Empty:
                break
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue
            if failed:
                if not self._warned_rejects:
                    self._warned_rejects = True
                    log.warning("mqtt broker refused event seq %d (not authorized?); kept "
                                "with the refused events, retried at the next connect", seq)
                refused.append(seq)
            else:
                done.append(seq)
        if refused:
            self._spool.refuse_many(refused)
        if done:
            self._spool.ack_many(done)
        if (done or refused) and not self._acks.empty():
            self._wake.set()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._socket_opened = time.monotonic()

    def _check_connack(self) -> None:
        """A broker that accepts TCP but never answers: paho would wait for the keep-alive,
        silently. Say so, and close the socket: paho then backs off and retries as usual."""
        opened = self._socket_opened
        if self._connected or not opened or time.monotonic() - opened < CONNACK_TIMEOUT_S:
            return
        self._socket_opened = 0.0
        log.warning("mqtt %s:%d: connected but no CONNACK within %.0f s; retrying in %.1f s",
                    self._cfg.host, self._cfg.port, CONNACK_TIMEOUT_S, self._next_delay())
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        self._socket_opened = 0.0  # a CONNACK came, whatever it says
        if reason.is_failure:
            hint = (" (check mqtt.username and the password)"
                    if reason.value in _AUTH_REFUSALS else "")
            log.error("mqtt %s:%d refused the connection: %s%s; retrying in %.1f s",
                      self._cfg.host, self._cfg.port, reason, hint, self._next_delay())
            return
        self._failures = 0
        self._send(self._t_status, "online", retain=True)
        if self._discovery:
            client.subscribe(self._t_ha_status, qos=1)
            self._discovery_asked += 1
        if self._session:
            self._reconnects += 1
        self._session += 1
        self._connected = True
        if self._counts is not None:
            self._send(self._t_counts, self._counts, retain=True)
        self._warned_rejects = False
        log.info("mqtt connected to %s:%d%s", self._cfg.host, self._cfg.port,
                 " (TLS)" if self._cfg.tls else "")
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        """paho calls this inside its ``except OSError``: the exception says why (refused,
        unreachable, TLS certificate or host name)."""
        err = sys.exception()
        tls = ssl is not None and isinstance(err, ssl.SSLError)
        what = "TLS handshake failed" if tls else "cannot connect"
        log.warning("mqtt %s:%d %s: %s; retrying in %.1f s", self._cfg.host, self._cfg.port,
                    what, err or "unknown error", self._next_delay())

    def _next_delay(self) -> float:
        """paho's wait before the next attempt: min, doubling per failure, up to max."""
        self._failures += 1
        return min(self._cfg.reconnect_min_s * 2 ** min(self._failures - 1, 30),
                   self._cfg.reconnect_max_s)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Home Assistant (re)started: resend discovery. A retained ``online`` is only the
        broker replaying it on our subscribe, already covered by the connect."""
        payload = msg.payload
        if (msg.topic != self._t_ha_status or len(payload) > MAX_HA_STATUS_BYTES
                or payload not in (b"online", b"offline")):
            self._ignored += 1
            if self._ignored in (1, 10) or self._ignored % 1000 == 0:
                log.warning("mqtt: ignored %d unexpected messages so far (last: %d bytes on %s)",
                            self._ignored, len(payload), msg.topic[:100])
            return
        if payload == b"online" and not msg.retain:
            self._discovery_asked += 1
            self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        was, self._connected = self._connected, False
        opened, self._socket_opened = self._socket_opened, 0.0
        if was and not self._stopping:
            log.warning("mqtt connection to %s:%d lost: %s; reconnecting in %.1f s",
                        self._cfg.host, self._cfg.port, reason, self._cfg.reconnect_min_s)
            self._failures = 1  # paho waits reconnect_min_s before its first attempt
        elif opened and not self._stopping:
            log.warning("mqtt %s:%d closed before CONNACK: %s; retrying in %.1f s",
                        self._cfg.host, self._cfg.port, reason, self._next_delay())
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self._count_lock:
            self._outstanding -= 1
        self._acks.put((mid, reason.is_failure))
        self._wake.set()
